//! Every metric imagegate records, in one list: name, kind, labels and what it means (the
//! `# HELP` line and the README's table say the same). Also the series that exist before
//! their first event: the process-wide ones at start, and those of each provider and model a
//! routing table names, for as long as a table names them ([`Named`]).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use crate::config::Config;

/// A metric's kind, as `# TYPE` writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric: its name, kind, label names and help text.
#[derive(Debug)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

const fn metric(
    name: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    help: &'static str,
) -> Metric {
    Metric {
        name,
        kind,
        labels,
        help,
    }
}

use Kind::{Counter, Gauge, Histogram};

/// What a provider call's latency is grouped by (`outcome`): it answered with a success,
/// with an error status, or not at all, for one of [`crate::upstream::Cause`]'s reasons.
pub const ATTEMPT_OUTCOMES: [&str; 9] = [
    "success",
    "error_status",
    "refused",
    "dns",
    "tls",
    "timeout",
    "reset",
    "connect",
    "other",
];

/// Every metric imagegate records (the process's own figures apart: see `process.rs`).
pub const METRICS: &[Metric] = &[
    metric(
        "imagegate_build_info",
        Gauge,
        &["version", "os", "arch"],
        "Always 1; the labels say which imagegate build runs.",
    ),
    metric(
        "imagegate_config_info",
        Gauge,
        &["hash"],
        "1 for the hash of the configuration in force, 0 for those it replaced.",
    ),
    metric(
        "imagegate_config_reloads_total",
        Counter,
        &["trigger", "result"],
        "Configuration reloads by what asked for them (admin_api, sighup, notice: another replica's reload) and how they ended (applied, refused).",
    ),
    metric(
        "imagegate_http_requests_total",
        Counter,
        &["path", "status"],
        "HTTP requests answered, by route template and status.",
    ),
    metric(
        "imagegate_http_response_seconds",
        Histogram,
        &["path"],
        "Time from a request's arrival to its response head, by route template.",
    ),
    metric(
        "imagegate_upstream_requests_total",
        Counter,
        &["model", "provider", "status"],
        "Provider calls by model, provider and the status the client got from them (502/504 when the provider gave no answer).",
    ),
    metric(
        "imagegate_upstream_duration_seconds",
        Histogram,
        &["model", "provider", "outcome"],
        "Provider calls from sending to the end of their answer, by outcome: success, error_status, or the reason no answer came (refused, dns, tls, timeout, reset, connect, other).",
    ),
    metric(
        "imagegate_upstream_first_byte_seconds",
        Histogram,
        &["model", "provider", "outcome"],
        "Provider calls from sending (an upload's body included) to the provider's response head (what providers.first_byte_timeout bounds), by outcome: success or error_status.",
    ),
    metric(
        "imagegate_upstream_errors_total",
        Counter,
        &["provider", "kind"],
        "Provider calls that did not complete, by kind: upstream_error (an error status) or failed (no answer, or a broken one).",
    ),
    metric(
        "imagegate_provider_circuit_open",
        Gauge,
        &["provider"],
        "1 while the provider's circuit breaker is open (the provider is skipped), else 0.",
    ),
    metric(
        "imagegate_input_tokens_total",
        Counter,
        &["model", "provider"],
        "Input tokens providers reported, by model and provider.",
    ),
    metric(
        "imagegate_output_tokens_total",
        Counter,
        &["model", "provider"],
        "Output tokens providers reported, by model and provider.",
    ),
    metric(
        "imagegate_images_total",
        Counter,
        &["model", "provider"],
        "Images providers returned, by model and provider.",
    ),
    metric(
        "imagegate_cost_nanousd_total",
        Counter,
        &["model", "provider"],
        "Cost of provider calls in billionths of a US dollar, by model and provider.",
    ),
    metric(
        "imagegate_usage_rows_written_total",
        Counter,
        &[],
        "Usage rows written to the database.",
    ),
    metric(
        "imagegate_usage_rows_rescued_total",
        Counter,
        &[],
        "Usage rows written straight to the database because the usage journal could not take them.",
    ),
    metric(
        "imagegate_usage_rows_lost_total",
        Counter,
        &[],
        "Usage rows neither the journal nor the database could take.",
    ),
    metric(
        "imagegate_usage_rows_refused_total",
        Counter,
        &[],
        "Usage rows the database refused (set aside in refused.jsonl in the journal's folder).",
    ),
    metric(
        "imagegate_usage_journal_backlog_rows",
        Gauge,
        &[],
        "Usage rows journaled and not yet in the database.",
    ),
    metric(
        "imagegate_usage_journal_errors_total",
        Counter,
        &[],
        "Failures to write to the usage journal (each marks it unavailable until a probe passes).",
    ),
    metric(
        "imagegate_usage_journal_unavailable",
        Gauge,
        &[],
        "1 while the usage journal cannot be written (the replica is not ready), else 0.",
    ),
    metric(
        "imagegate_notice_subscriptions_total",
        Counter,
        &[],
        "Subscriptions to other replicas' notices; more than one means the listener reconnected.",
    ),
    metric(
        "imagegate_key_in_flight_refused_total",
        Counter,
        &[],
        "Requests refused (429) by their key's cap on requests in flight.",
    ),
    metric(
        "imagegate_key_share_refused_total",
        Counter,
        &["quota"],
        "Requests refused because their key held its limits.max_share_per_key of a quota (json_memory, spool).",
    ),
    metric(
        "imagegate_spool_full_total",
        Counter,
        &[],
        "Uploads refused because the upload spool held server.spool_max_bytes.",
    ),
    metric(
        "imagegate_json_memory_full_total",
        Counter,
        &[],
        "JSON requests refused because JSON bodies in memory held server.json_memory_max_bytes.",
    ),
    metric(
        "imagegate_rate_limit_local_fallback_total",
        Counter,
        &[],
        "Requests whose rpm was counted by this replica alone because the database did not answer in time.",
    ),
    metric(
        "imagegate_duplicate_registration_seconds",
        Histogram,
        &[],
        "How long an original call took to be registered for retries on other replicas (in the background, never before its provider call).",
    ),
    metric(
        "imagegate_key_requests_total",
        Counter,
        &["key", "status"],
        "Requests by key name and status (metrics.per_key only).",
    ),
    metric(
        "imagegate_key_cost_nanousd_total",
        Counter,
        &["key"],
        "Cost of provider calls in billionths of a US dollar, by key name (metrics.per_key only).",
    ),
    metric(
        "imagegate_key_budget_remaining_nanousd",
        Gauge,
        &["key"],
        "What is left of the key's budget for its period, in billionths of a US dollar (metrics.per_key only).",
    ),
];

/// Gives the recorder each metric's help text.
pub(super) fn describe() {
    for m in METRICS {
        match m.kind {
            Counter => metrics::describe_counter!(m.name, m.help),
            Gauge => metrics::describe_gauge!(m.name, m.help),
            Histogram => metrics::describe_histogram!(m.name, m.help),
        }
    }
}

/// The series that exist from start, at zero: every metric without labels, the reload
/// counters, the quotas' refusals; and the build's `imagegate_build_info` at 1.
pub(super) fn process_wide_series() {
    for m in METRICS.iter().filter(|m| m.labels.is_empty()) {
        match m.kind {
            Counter => drop(metrics::counter!(m.name)),
            Gauge => drop(metrics::gauge!(m.name)),
            Histogram => drop(metrics::histogram!(m.name)),
        }
    }
    for trigger in ["admin_api", "sighup", "notice"] {
        for result in ["applied", "refused"] {
            drop(
                metrics::counter!("imagegate_config_reloads_total", "trigger" => trigger, "result" => result),
            );
        }
    }
    for quota in ["json_memory", "spool"] {
        drop(metrics::counter!("imagegate_key_share_refused_total", "quota" => quota));
    }
    metrics::gauge!(
        "imagegate_build_info",
        "version" => env!("CARGO_PKG_VERSION"),
        "os" => std::env::consts::OS,
        "arch" => std::env::consts::ARCH,
    )
    .set(1.0);
}

/// The providers and models a routing table names, each claimed for as long as the table,
/// or a call it started, lives. When the last claim on a name goes (a reload removed it and
/// the calls still on it ended), its series are removed from `/metrics`. Counted across the
/// process: two gateways in one process (tests) keep a name while either names it.
pub struct Named {
    names: Vec<(&'static str, String)>,
}

/// Claims per (label, value): `("provider", "openai")`.
static CLAIMS: LazyLock<Mutex<HashMap<(&'static str, String), usize>>> =
    LazyLock::new(Mutex::default);

impl Named {
    /// Claims `config`'s providers and models, and gives each its series at zero: the
    /// circuit gauge and error counters of each provider (the breaker's state kept: an
    /// open circuit stays 1 across a reload). Each route's own series are registered by its
    /// [`crate::usage::meter::RouteMetrics`].
    pub fn claim(config: &Config) -> Arc<Named> {
        let names: Vec<_> = config
            .providers
            .keys()
            .map(|name| ("provider", name.clone()))
            .chain(config.models.values().map(|m| ("model", m.name.clone())))
            .collect();
        {
            let mut claims = CLAIMS.lock().unwrap_or_else(|e| e.into_inner());
            for name in &names {
                *claims.entry(name.clone()).or_default() += 1;
            }
        }
        for provider in config.providers.keys() {
            drop(
                metrics::gauge!("imagegate_provider_circuit_open", "provider" => provider.clone()),
            );
            for kind in ["upstream_error", "failed"] {
                drop(
                    metrics::counter!("imagegate_upstream_errors_total", "provider" => provider.clone(), "kind" => kind),
                );
            }
        }
        Arc::new(Named { names })
    }
}

impl Drop for Named {
    fn drop(&mut self) {
        let mut claims = CLAIMS.lock().unwrap_or_else(|e| e.into_inner());
        for name in self.names.drain(..) {
            let Some(count) = claims.get_mut(&name) else {
                continue;
            };
            *count -= 1;
            if *count == 0 {
                claims.remove(&name);
                // Under the lock: a table claiming the name again registers its series
                // after these are gone.
                if let Some(handle) = super::HANDLE.get() {
                    handle.remove_labelled(name.0, &name.1);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metric names the code records, read off its `counter!`, `gauge!` and
    /// `histogram!` calls.
    fn recorded_in(dir: &std::path::Path, found: &mut Vec<(String, String)>) {
        for entry in std::fs::read_dir(dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                recorded_in(&path, found);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read");
            for call in ["counter!(", "gauge!(", "histogram!("] {
                for (at, _) in text.match_indices(call) {
                    let rest = &text[at + call.len()..];
                    let rest = rest.trim_start();
                    let Some(literal) = rest.strip_prefix('"') else {
                        continue;
                    };
                    let name = &literal[..literal.find('"').expect("closing quote")];
                    // imagegate's own (the tests here record made-up names).
                    if name.starts_with("imagegate_") {
                        found.push((name.to_owned(), path.display().to_string()));
                    }
                }
            }
        }
    }

    #[test]
    fn every_metric_the_code_records_is_described_here() {
        let mut found = Vec::new();
        recorded_in(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut found,
        );
        assert!(found.len() > 20, "the scan found the calls: {found:?}");
        for (name, file) in found {
            assert!(
                METRICS.iter().any(|m| m.name == name),
                "{name} (recorded in {file}) is not in the catalogue: give it a help text there"
            );
        }
    }

    #[test]
    fn names_are_unique_and_help_texts_are_one_line() {
        for (i, m) in METRICS.iter().enumerate() {
            assert!(
                METRICS[..i].iter().all(|other| other.name != m.name),
                "{} twice",
                m.name
            );
            assert!(!m.help.is_empty() && !m.help.contains('\n'), "{}", m.name);
            assert_eq!(
                m.name.ends_with("_total"),
                m.kind == Kind::Counter,
                "{}: counters, and only they, end in _total",
                m.name
            );
        }
    }
}
