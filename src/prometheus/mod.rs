//! What `GET /metrics` shows: imagegate's recorder behind the `metrics` facade, rendered in
//! Prometheus's text format, every series described (`# HELP`, `# TYPE`) from one list
//! ([`catalogue`]), and the process's own figures read at each scrape ([`process`]).
//!
//! Its own recorder rather than `metrics-exporter-prometheus`: that exporter can drop a
//! series only when it has gone unchanged for an idle timeout, the same for every series of
//! a kind, so a removed provider's circuit gauge would stay at 1 until restart while a quiet,
//! healthy provider's counters would vanish and restart from 0. Here the series of a
//! provider or model that no routing table names any more are removed when its last table
//! goes ([`catalogue::Named`]); the rest stay, however quiet.

pub mod catalogue;
mod process;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, RwLock};

use metrics::atomics::AtomicU64;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, SharedString, Unit};
use metrics_util::registry::{Registry, Storage};

/// Upper bounds of every histogram's buckets, in seconds: from a fast refusal to the longest
/// image call a provider may take.
const BUCKETS: [f64; 11] = [
    0.005, 0.05, 0.25, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// The recorder every gateway in the process shares (see [`install`]).
static HANDLE: OnceLock<Handle> = OnceLock::new();

/// Installs imagegate's recorder as the process's, once: the first gateway started does;
/// the others share it. With another recorder already installed (an embedding program's),
/// imagegate's page stays empty.
pub fn install() -> Handle {
    HANDLE
        .get_or_init(|| {
            let recorder = Recorder::default();
            let handle = Handle(Arc::clone(&recorder.0));
            if metrics::set_global_recorder(recorder).is_ok() {
                catalogue::describe();
                catalogue::process_wide_series();
            }
            handle
        })
        .clone()
}

/// Reads and renders what the recorder holds.
#[derive(Clone)]
pub struct Handle(Arc<Inner>);

#[derive(Default)]
struct Recorder(Arc<Inner>);

struct Inner {
    registry: Registry<Key, Atomics>,
    /// Name -> help text, from `describe_*`.
    help: RwLock<HashMap<String, SharedString>>,
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            registry: Registry::new(Atomics),
            help: RwLock::default(),
        }
    }
}

/// A histogram as Prometheus reads it: a count per bucket, kept as the samples arrive (no
/// samples held between scrapes), and their sum.
#[derive(Default)]
pub struct Buckets {
    /// One per bound of [`BUCKETS`], then one for the samples above the last.
    counts: [AtomicU64; BUCKETS.len() + 1],
    /// An `f64`'s bits.
    sum: AtomicU64,
}

impl metrics::HistogramFn for Buckets {
    fn record(&self, value: f64) {
        if value.is_nan() {
            return;
        }
        let bucket = BUCKETS.partition_point(|bound| *bound < value);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + value).to_bits())
            });
    }
}

/// Counters and gauges as atomics (a gauge holds an `f64`'s bits), histograms as [`Buckets`].
struct Atomics;

impl Storage<Key> for Atomics {
    type Counter = Arc<AtomicU64>;
    type Gauge = Arc<AtomicU64>;
    type Histogram = Arc<Buckets>;

    fn counter(&self, _: &Key) -> Self::Counter {
        Arc::default()
    }

    fn gauge(&self, _: &Key) -> Self::Gauge {
        Arc::default()
    }

    fn histogram(&self, _: &Key) -> Self::Histogram {
        Arc::default()
    }
}

impl Recorder {
    fn describe(&self, name: KeyName, help: SharedString) {
        let mut described = self.0.help.write().unwrap_or_else(|e| e.into_inner());
        described.entry(name.as_str().to_owned()).or_insert(help);
    }
}

impl metrics::Recorder for Recorder {
    fn describe_counter(&self, name: KeyName, _: Option<Unit>, help: SharedString) {
        self.describe(name, help);
    }

    fn describe_gauge(&self, name: KeyName, _: Option<Unit>, help: SharedString) {
        self.describe(name, help);
    }

    fn describe_histogram(&self, name: KeyName, _: Option<Unit>, help: SharedString) {
        self.describe(name, help);
    }

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.0
            .registry
            .get_or_create_counter(key, |c| Counter::from_arc(Arc::clone(c)))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.0
            .registry
            .get_or_create_gauge(key, |g| Gauge::from_arc(Arc::clone(g)))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.0
            .registry
            .get_or_create_histogram(key, |h| Histogram::from_arc(Arc::clone(h)))
    }
}

/// One metric's series, by their labels as written (`{a="x",b="y"}`, or nothing).
struct Family {
    kind: &'static str,
    series: BTreeMap<String, Sample>,
}

enum Sample {
    Value(f64),
    Buckets { cumulative: Vec<u64>, sum: f64 },
}

impl Handle {
    /// Prometheus's text format (0.0.4): each metric's `# HELP` and `# TYPE`, then its
    /// series, by name; the process's figures last.
    pub fn render(&self) -> String {
        let mut families: BTreeMap<String, Family> = BTreeMap::new();
        let mut add = |key: &Key, kind: &'static str, sample: Sample| {
            families
                .entry(key.name().to_owned())
                .or_insert_with(|| Family {
                    kind,
                    series: BTreeMap::new(),
                })
                .series
                .insert(labels(key.labels().map(|l| (l.key(), l.value()))), sample);
        };
        let registry = &self.0.registry;
        registry.visit_counters(|key, counter| {
            add(
                key,
                "counter",
                Sample::Value(counter.load(Ordering::Relaxed) as f64),
            );
        });
        registry.visit_gauges(|key, gauge| {
            let value = f64::from_bits(gauge.load(Ordering::Relaxed));
            add(key, "gauge", Sample::Value(value));
        });
        registry.visit_histograms(|key, histogram| {
            let mut total = 0;
            let cumulative = histogram
                .counts
                .iter()
                .map(|count| {
                    total += count.load(Ordering::Relaxed);
                    total
                })
                .collect();
            let sum = f64::from_bits(histogram.sum.load(Ordering::Relaxed));
            add(key, "histogram", Sample::Buckets { cumulative, sum });
        });

        let help = self.0.help.read().unwrap_or_else(|e| e.into_inner());
        let mut out = String::with_capacity(16 * 1024);
        for (name, family) in &families {
            header(
                &mut out,
                name,
                help.get(name).map(|h| h.as_ref()),
                family.kind,
            );
            for (labels, sample) in &family.series {
                match sample {
                    Sample::Value(value) => line(&mut out, name, "", labels, None, *value),
                    Sample::Buckets { cumulative, sum } => {
                        for (bound, count) in BUCKETS.iter().zip(cumulative) {
                            let le = number(*bound);
                            line(&mut out, name, "_bucket", labels, Some(&le), *count as f64);
                        }
                        let count = cumulative.last().copied().unwrap_or(0) as f64;
                        line(&mut out, name, "_bucket", labels, Some("+Inf"), count);
                        line(&mut out, name, "_sum", labels, None, *sum);
                        line(&mut out, name, "_count", labels, None, count);
                    }
                }
            }
        }
        for figure in process::figures() {
            header(&mut out, figure.name, Some(figure.help), figure.kind);
            line(&mut out, figure.name, "", "", None, figure.value);
        }
        out
    }

    /// Keeps only the series of the gauge `name` whose `label` has a value `keep` accepts
    /// (the budget gauges of keys that no longer have an active budget go).
    pub fn retain_gauge_series(&self, name: &str, label: &str, keep: impl Fn(&str) -> bool) {
        self.0.registry.retain_gauges(|key, _| {
            key.name() != name || key.labels().any(|l| l.key() == label && keep(l.value()))
        });
    }

    /// Removes every series with `label` = `value` (a removed provider's, or model's).
    fn remove_labelled(&self, label: &str, value: &str) {
        let keep = |key: &Key| !key.labels().any(|l| l.key() == label && l.value() == value);
        let registry = &self.0.registry;
        registry.retain_counters(|key, _| keep(key));
        registry.retain_gauges(|key, _| keep(key));
        registry.retain_histograms(|key, _| keep(key));
    }
}

fn header(out: &mut String, name: &str, help: Option<&str>, kind: &str) {
    if let Some(help) = help {
        let help = help.replace('\\', r"\\").replace('\n', r"\n");
        let _ = writeln!(out, "# HELP {name} {help}");
    }
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// `{a="x",b="y"}` (values escaped as the format asks), or nothing without labels.
fn labels<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::new();
    for (key, value) in pairs {
        out.push(if out.is_empty() { '{' } else { ',' });
        let value = value
            .replace('\\', r"\\")
            .replace('"', "\\\"")
            .replace('\n', r"\n");
        let _ = write!(out, "{key}=\"{value}\"");
    }
    if !out.is_empty() {
        out.push('}');
    }
    out
}

fn line(out: &mut String, name: &str, suffix: &str, labels: &str, le: Option<&str>, value: f64) {
    out.push_str(name);
    out.push_str(suffix);
    match le {
        Some(le) if labels.is_empty() => {
            let _ = write!(out, "{{le=\"{le}\"}}");
        }
        Some(le) => {
            let _ = write!(out, "{},le=\"{le}\"}}", &labels[..labels.len() - 1]);
        }
        None => out.push_str(labels),
    }
    let _ = writeln!(out, " {}", number(value));
}

/// A sample value as Prometheus reads it.
fn number(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value == f64::INFINITY {
        "+Inf".into()
    } else if value == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(record: impl FnOnce()) -> String {
        let recorder = Recorder::default();
        let handle = Handle(Arc::clone(&recorder.0));
        metrics::with_local_recorder(&recorder, || {
            metrics::describe_counter!("t_calls_total", "Calls,\nby \\ kind.");
            metrics::describe_histogram!("t_seconds", "Time.");
            record();
        });
        handle.render()
    }

    #[test]
    fn renders_help_type_escaped_labels_and_cumulative_buckets() {
        let text = rendered(|| {
            metrics::counter!("t_calls_total", "kind" => "a\"b\\c\nd").increment(3);
            metrics::gauge!("t_level").set(-1.5);
            let seconds = metrics::histogram!("t_seconds", "route" => "/x");
            for value in [0.001_953_125, 0.003_906_25, 2.0, 700.0] {
                seconds.record(value);
            }
        });
        let expected = [
            "# HELP t_calls_total Calls,\\nby \\\\ kind.",
            "# TYPE t_calls_total counter",
            r#"t_calls_total{kind="a\"b\\c\nd"} 3"#,
            "# TYPE t_level gauge",
            "t_level -1.5",
            "# HELP t_seconds Time.",
            "# TYPE t_seconds histogram",
            r#"t_seconds_bucket{route="/x",le="0.005"} 2"#,
            r#"t_seconds_bucket{route="/x",le="1"} 2"#,
            r#"t_seconds_bucket{route="/x",le="5"} 3"#,
            r#"t_seconds_bucket{route="/x",le="600"} 3"#,
            r#"t_seconds_bucket{route="/x",le="+Inf"} 4"#,
            r#"t_seconds_sum{route="/x"} 702.005859375"#,
            r#"t_seconds_count{route="/x"} 4"#,
        ];
        for line in expected {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
        let help = text.find("# HELP t_calls_total").expect("help");
        let kind = text.find("# TYPE t_calls_total").expect("type");
        assert!(help < kind, "HELP before TYPE");
    }

    #[test]
    fn a_removed_label_value_takes_its_series_and_nothing_else() {
        let recorder = Recorder::default();
        let handle = Handle(Arc::clone(&recorder.0));
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!("t_total", "provider" => "gone").increment(1);
            metrics::gauge!("t_open", "provider" => "gone").set(1.0);
            metrics::histogram!("t_seconds", "provider" => "gone").record(1.0);
            metrics::counter!("t_total", "provider" => "kept").increment(1);
            metrics::counter!("t_total", "model" => "gone").increment(1);
        });
        handle.remove_labelled("provider", "gone");
        let text = handle.render();
        assert!(!text.contains(r#"provider="gone""#), "{text}");
        assert!(text.contains(r#"t_total{provider="kept"} 1"#), "{text}");
        assert!(text.contains(r#"t_total{model="gone"} 1"#), "{text}");
    }
}
