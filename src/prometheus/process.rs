//! The process's own figures, read from `/proc` at each scrape under the names Prometheus's
//! client libraries use (`process_cpu_seconds_total`, `process_resident_memory_bytes`, ...),
//! so that the usual dashboards and alerts apply. Linux only; elsewhere there are none.
//!
//! Read here rather than through the `metrics-process` crate: that crate counts CPU time in
//! whole seconds (the `metrics` facade's counters are integers) and brings `procfs` and a
//! crate per platform; the figures are a few fields of `/proc/self/stat`.

/// One figure: a series without labels.
pub struct Figure {
    pub name: &'static str,
    pub kind: &'static str,
    pub help: &'static str,
    pub value: f64,
}

/// The names and help texts of the figures, for the README and the tests.
pub const FIGURES: [(&str, &str, &str); 7] = [
    (
        "process_cpu_seconds_total",
        "counter",
        "User and system CPU time the process has used, in seconds.",
    ),
    (
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
    ),
    (
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
    ),
    (
        "process_open_fds",
        "gauge",
        "File descriptors the process has open (connections, journal, spool files).",
    ),
    (
        "process_max_fds",
        "gauge",
        "The process's limit on open file descriptors.",
    ),
    (
        "process_start_time_seconds",
        "gauge",
        "When the process started, in seconds since the Unix epoch.",
    ),
    ("process_threads", "gauge", "Threads in the process."),
];

/// What can be read now; a figure that cannot be read is left out.
pub fn figures() -> Vec<Figure> {
    read().map_or_else(Vec::new, |values| {
        FIGURES
            .iter()
            .zip(values)
            .filter_map(|(&(name, kind, help), value)| {
                Some(Figure {
                    name,
                    kind,
                    help,
                    value: value?,
                })
            })
            .collect()
    })
}

/// The figures in [`FIGURES`]' order.
#[cfg(target_os = "linux")]
fn read() -> Option<[Option<f64>; 7]> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name, in parentheses, may hold spaces: the fields follow its last `)`,
    // starting with the third (`state`).
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    let field =
        |n: usize| -> Option<f64> { fields.get(n - 3)?.parse::<u64>().ok().map(|v| v as f64) };
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    let page = rustix::param::page_size() as f64;
    let cpu = Some(field(14)? / ticks + field(15)? / ticks);
    // The start never changes: /proc/stat is read once, at the first scrape.
    static START: std::sync::OnceLock<Option<f64>> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| {
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        });
        boot.zip(field(22))
            .map(|(boot, since)| boot as f64 + since / ticks)
    });
    let open_fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|dir| dir.count().saturating_sub(1) as f64);
    let max_fds = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .map(|max| max as f64);
    Some([
        cpu,
        field(24).map(|pages| pages * page),
        field(23),
        open_fds,
        max_fds,
        start,
        field(20),
    ])
}

#[cfg(not(target_os = "linux"))]
fn read() -> Option<[Option<f64>; 7]> {
    None
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn every_figure_is_read_on_linux_and_plausible() {
        let figures = figures();
        let names: Vec<_> = figures.iter().map(|f| f.name).collect();
        let expected: Vec<_> = FIGURES.iter().map(|f| f.0).collect();
        assert_eq!(names, expected);
        let value = |name: &str| figures.iter().find(|f| f.name == name).map(|f| f.value);
        assert!(value("process_resident_memory_bytes") > Some(1_000_000.0));
        assert!(value("process_threads") >= Some(1.0));
        assert!(
            value("process_open_fds") >= Some(1.0),
            "the test reads /proc through one"
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        let started = value("process_start_time_seconds").expect("start time");
        assert!(
            started <= now + 1.0 && started > now - 3600.0,
            "{started} vs {now}"
        );
    }
}
