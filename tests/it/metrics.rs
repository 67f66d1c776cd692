//! Who can read `/metrics`, and what it names: on a listener of its own when
//! `server.metrics_listen` is set (the main listener then answers 404), started and stopped
//! with the server, in the library and in the binary; no key's name unless
//! `metrics.per_key` is on; every metric described (`# HELP`, `# TYPE`), the series of the
//! configured providers and models there at zero from start and gone when a reload removes
//! them; reloads counted; provider latency and time to first byte by outcome.

use std::collections::HashMap;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::admin_keys::admin;
use crate::support::binary::{self, SECRET};
use crate::support::*;

/// `server.metrics_listen` on a free port of its own.
fn with_metrics_listener(config: &str) -> String {
    config.replacen(
        "listen = \"127.0.0.1:0\"\n",
        "listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\n",
        1,
    )
}

#[tokio::test]
async fn metrics_listen_serves_metrics_on_its_own_address_and_the_main_listener_does_not() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let config = with_metrics_listener(&test_config(&provider.base_url(), ""));
    let gw = TestGateway::start(Db::Sqlite, &config).await;
    let metrics_addr = gw.metrics_addr.expect("a metrics listener");
    assert_ne!(metrics_addr.port(), gw.addr.port());
    let response = gw
        .post_json("/v1/images/generations", r#"{"prompt":"fox"}"#)
        .await;
    assert_eq!(response.status(), 200);
    response.bytes().await.expect("body");

    // The main listener: /metrics is not a route there, and says so in OpenAI's shape.
    let main = gw
        .client
        .get(gw.url("/metrics"))
        .send()
        .await
        .expect("send");
    assert_eq!(main.status(), 404);
    let body: Value = main.json().await.expect("json");
    assert_eq!(body["error"]["code"], "not_found", "{body}");
    // The rest of the main listener is as it was.
    let healthz = gw
        .client
        .get(gw.url("/healthz"))
        .send()
        .await
        .expect("send");
    assert_eq!(healthz.status(), 200);

    // The metrics listener: Prometheus text, with what the call on the main one counted.
    let scrape = gw
        .client
        .get(format!("http://{metrics_addr}/metrics"))
        .send()
        .await
        .expect("send");
    assert_eq!(scrape.status(), 200);
    assert!(
        scrape.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/plain; version=0.0.4")
    );
    let text = scrape.text().await.expect("text");
    assert!(
        text.contains("# TYPE imagegate_http_requests_total counter")
            && text.contains(
                "imagegate_http_requests_total{path=\"/v1/images/generations\",status=\"200\"}"
            ),
        "{text}"
    );
    // ... and nothing else: no image route, no health, no admin API on the scrape port.
    for path in ["/healthz", "/v1/models", "/admin/keys", "/dashboard"] {
        let other = gw
            .client
            .get(format!("http://{metrics_addr}{path}"))
            .bearer_auth(&gw.key)
            .send()
            .await
            .expect("send");
        assert_eq!(other.status(), 404, "{path} on the metrics listener");
    }

    // Stopped with the server: the port no longer takes connections.
    gw.shutdown().await;
    assert!(
        tokio::net::TcpStream::connect(metrics_addr).await.is_err(),
        "the metrics listener closed with the server"
    );
}

/// The metrics text after a key called `name` (with a budget, so that every per-key series
/// is touched: requests, cost, budget left) made one generation, with `metrics.per_key` as
/// given.
async fn metrics_after_a_call_by(name: &str, per_key: bool) -> String {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let extra = if per_key {
        "[metrics]\nper_key = true\n"
    } else {
        ""
    };
    let gw = TestGateway::start(Db::Sqlite, &test_config(&provider.base_url(), extra)).await;
    let settings = json!({"name": name, "budget_usd": 5.0, "budget_period": "day"});
    let (status, created) = admin(
        &gw,
        Method::POST,
        "/admin/keys",
        Some(&settings.to_string()),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let key = created["key"].as_str().expect("key").to_owned();
    let response = gw
        .post_json_as(&key, "/v1/images/generations", r#"{"prompt":"fox"}"#)
        .await;
    assert_eq!(response.status(), 200);
    response.bytes().await.expect("body");
    gw.usage_rows(1).await;
    let text = gw.metrics().await;
    assert!(!text.contains(&key), "never a key in /metrics");
    gw.shutdown().await;
    text
}

#[tokio::test]
async fn per_key_series_are_not_recorded_unless_metrics_per_key_is_on() {
    // The recorder is the process's: names no other test uses.
    let unique = uuid::Uuid::now_v7().simple().to_string();
    let hidden = format!("svc-secret-name-{unique}");
    let text = metrics_after_a_call_by(&hidden, false).await;
    assert!(
        !text.contains(&hidden),
        "per_key off (the default): the key's name is nowhere in:\n{text}"
    );
    // The aggregates stay: the call is counted, by route and by model.
    assert!(
        text.contains(
            "imagegate_http_requests_total{path=\"/v1/images/generations\",status=\"200\"}"
        ) && text
            .contains("imagegate_cost_nanousd_total{model=\"gpt-image-1\",provider=\"piapi\"}"),
        "{text}"
    );

    let shown = format!("svc-shown-name-{unique}");
    let text = metrics_after_a_call_by(&shown, true).await;
    for series in [
        format!("imagegate_key_requests_total{{key=\"{shown}\",status=\"200\"}} 1"),
        format!("imagegate_key_cost_nanousd_total{{key=\"{shown}\"}}"),
        format!("imagegate_key_budget_remaining_nanousd{{key=\"{shown}\"}}"),
    ] {
        assert!(text.contains(&series), "{series} missing from:\n{text}");
    }
}

#[tokio::test]
async fn the_binary_serves_metrics_on_metrics_listen_and_stops_it_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = binary::write_config(dir.path(), &["gpt-image-1"]);
    let toml = std::fs::read_to_string(&config).expect("read");
    std::fs::write(&config, with_metrics_listener(&toml)).expect("write");
    let mut command = binary::command(&config);
    command.arg("serve").env("CLI_TEST_PROVIDER_KEY", SECRET);
    let serving = binary::serve(command).await;
    let metrics_addr = serving
        .startup_log
        .split("serves /metrics on http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("no metrics address in:\n{}", serving.startup_log))
        .to_owned();
    let (mut child, addr, _log) = serving.into_parts();
    let client = reqwest::Client::new();
    let main = client
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .expect("send");
    assert_eq!(main.status(), 404);
    let scrape = client
        .get(format!("http://{metrics_addr}/metrics"))
        .send()
        .await
        .expect("send");
    assert_eq!(scrape.status(), 200);
    assert_eq!(
        scrape.headers()["content-type"],
        "text/plain; version=0.0.4",
        "Prometheus text"
    );
    let status = binary::terminate(&mut child, Duration::from_secs(15)).await;
    assert!(status.success(), "SIGTERM exits 0");
    assert!(
        tokio::net::TcpStream::connect(&metrics_addr).await.is_err(),
        "the metrics listener closed with the process"
    );
}

/// What a fresh gateway shows before its first request, kept here apart from the code's own
/// list: every one with its `# HELP` and `# TYPE`.
const FROM_START: &[(&str, &str)] = &[
    ("imagegate_build_info", "gauge"),
    ("imagegate_config_info", "gauge"),
    ("imagegate_config_reloads_total", "counter"),
    ("imagegate_upstream_requests_total", "counter"),
    ("imagegate_upstream_duration_seconds", "histogram"),
    ("imagegate_upstream_first_byte_seconds", "histogram"),
    ("imagegate_upstream_errors_total", "counter"),
    ("imagegate_provider_circuit_open", "gauge"),
    ("imagegate_input_tokens_total", "counter"),
    ("imagegate_output_tokens_total", "counter"),
    ("imagegate_images_total", "counter"),
    ("imagegate_cost_nanousd_total", "counter"),
    ("imagegate_usage_rows_written_total", "counter"),
    ("imagegate_usage_rows_rescued_total", "counter"),
    ("imagegate_usage_rows_lost_total", "counter"),
    ("imagegate_usage_rows_refused_total", "counter"),
    ("imagegate_usage_journal_backlog_rows", "gauge"),
    ("imagegate_usage_journal_errors_total", "counter"),
    ("imagegate_usage_journal_unavailable", "gauge"),
    ("imagegate_notice_subscriptions_total", "counter"),
    ("imagegate_key_in_flight_refused_total", "counter"),
    ("imagegate_key_share_refused_total", "counter"),
    ("imagegate_spool_full_total", "counter"),
    ("imagegate_json_memory_full_total", "counter"),
    ("imagegate_rate_limit_local_fallback_total", "counter"),
    ("imagegate_duplicate_registration_seconds", "histogram"),
    ("process_cpu_seconds_total", "counter"),
    ("process_resident_memory_bytes", "gauge"),
    ("process_virtual_memory_bytes", "gauge"),
    ("process_open_fds", "gauge"),
    ("process_max_fds", "gauge"),
    ("process_start_time_seconds", "gauge"),
    ("process_threads", "gauge"),
];

/// A scrape, read: each metric's help and type, and each series' value.
struct Scrape {
    text: String,
    help: HashMap<String, String>,
    kind: HashMap<String, String>,
    values: HashMap<String, f64>,
}

impl Scrape {
    fn parse(text: String) -> Scrape {
        let (mut help, mut kind, mut values) = (HashMap::new(), HashMap::new(), HashMap::new());
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, text) = rest.split_once(' ').expect("help text");
                help.insert(name.to_owned(), text.to_owned());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, text) = rest.split_once(' ').expect("type");
                kind.insert(name.to_owned(), text.to_owned());
            } else if !line.is_empty() {
                let (series, value) = line.rsplit_once(' ').expect("a sample");
                let value = value
                    .parse()
                    .unwrap_or_else(|_| panic!("a number in {line}"));
                values.insert(series.to_owned(), value);
            }
        }
        Scrape {
            text,
            help,
            kind,
            values,
        }
    }

    async fn of(gw: &TestGateway) -> Scrape {
        Scrape::parse(gw.metrics().await)
    }

    /// The value of `series` (`name{labels}` as written), if it is there.
    fn get(&self, series: &str) -> Option<f64> {
        self.values.get(series).copied()
    }

    fn value(&self, series: &str) -> f64 {
        self.get(series)
            .unwrap_or_else(|| panic!("{series} missing from:\n{}", self.text))
    }

    /// Whether any series has `label`="`value`".
    fn mentions(&self, label: &str, value: &str) -> bool {
        let needle = format!("{label}=\"{value}\"");
        self.values.keys().any(|series| series.contains(&needle))
    }
}

/// The metric a series (or a histogram's `_bucket`, `_sum`, `_count` line) belongs to.
fn metric_of(series: &str) -> &str {
    series.split('{').next().expect("name")
}

/// A provider per stand-in base URL and one model on each, named with `unique` (the
/// recorder is the process's: names no other test uses), after [`test_config`]'s own.
fn providers_config(unique: &str, providers: &[(&str, &str)]) -> String {
    let mut extra = String::new();
    for (name, base_url) in providers {
        extra.push_str(&format!(
            "[providers.{name}-{unique}]\nbase_url = \"{base_url}\"\napi_key_env = \"TEST_PIAPI_KEY\"\nbreaker_failures = 1\n\
             [models.\"{name}-model-{unique}\"]\nroutes = [{{ provider = \"{name}-{unique}\", model = \"gpt-image-2-all\" }}]\nfailover = {{ on_status = [] }}\n\
             [pricing.\"{name}-{unique}\".\"gpt-image-2-all\"]\nper_image = 0.03\n"
        ));
    }
    test_config(providers[0].1, &extra)
}

#[tokio::test]
async fn a_fresh_gateway_describes_every_metric_and_shows_its_providers_and_models_at_zero() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let unique = uuid::Uuid::now_v7().simple().to_string();
    let base = provider.base_url();
    let config = providers_config(&unique, &[("one", &base), ("two", &base)]);
    let gw = TestGateway::start(Db::Sqlite, &config).await;
    let scrape = Scrape::of(&gw).await;

    for (name, kind) in FROM_START {
        assert_eq!(
            scrape.kind.get(*name).map(String::as_str),
            Some(*kind),
            "# TYPE of {name} in:\n{}",
            scrape.text
        );
        assert!(
            scrape.help.get(*name).is_some_and(|h| h.len() > 10),
            "# HELP of {name} in:\n{}",
            scrape.text
        );
    }
    // Whatever else the process recorded (the other tests'), each metric is described.
    for series in scrape.values.keys() {
        let name = metric_of(series);
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                let stem = name.strip_suffix(suffix)?;
                (scrape.kind.get(stem).map(String::as_str) == Some("histogram")).then_some(stem)
            })
            .unwrap_or(name);
        assert!(
            scrape.help.contains_key(family) && scrape.kind.contains_key(family),
            "{series} has no # HELP or # TYPE"
        );
    }

    // Each configured provider and model, at zero, before any request.
    for name in ["one", "two"] {
        let (provider, model) = (format!("{name}-{unique}"), format!("{name}-model-{unique}"));
        let route = format!("model=\"{model}\",provider=\"{provider}\"");
        for series in [
            format!("imagegate_upstream_requests_total{{{route},status=\"200\"}}"),
            format!("imagegate_input_tokens_total{{{route}}}"),
            format!("imagegate_output_tokens_total{{{route}}}"),
            format!("imagegate_images_total{{{route}}}"),
            format!("imagegate_cost_nanousd_total{{{route}}}"),
            format!("imagegate_upstream_duration_seconds_count{{{route},outcome=\"success\"}}"),
            format!("imagegate_upstream_first_byte_seconds_count{{{route},outcome=\"success\"}}"),
            format!(
                "imagegate_upstream_first_byte_seconds_bucket{{{route},outcome=\"success\",le=\"+Inf\"}}"
            ),
            format!("imagegate_provider_circuit_open{{provider=\"{provider}\"}}"),
            format!("imagegate_upstream_errors_total{{provider=\"{provider}\",kind=\"failed\"}}"),
            format!(
                "imagegate_upstream_errors_total{{provider=\"{provider}\",kind=\"upstream_error\"}}"
            ),
        ] {
            assert_eq!(scrape.value(&series), 0.0, "{series}");
        }
    }
    // Process-wide series are there too (their values are the process's, shared by tests).
    for series in [
        "imagegate_config_reloads_total{trigger=\"admin_api\",result=\"refused\"}",
        "imagegate_config_reloads_total{trigger=\"sighup\",result=\"applied\"}",
        "imagegate_config_reloads_total{trigger=\"notice\",result=\"refused\"}",
        "imagegate_key_share_refused_total{quota=\"spool\"}",
        "imagegate_usage_rows_lost_total",
    ] {
        scrape.value(series);
    }
    let build = format!(
        "imagegate_build_info{{version=\"{}\",os=\"{}\",arch=\"{}\"}}",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::OS,
        std::env::consts::ARCH
    );
    assert_eq!(scrape.value(&build), 1.0);
    assert!(scrape.value("process_resident_memory_bytes") > 1e6);
    assert!(scrape.value("process_open_fds") >= 3.0);
    assert!(scrape.value("process_max_fds") >= scrape.value("process_open_fds"));
    assert!(scrape.value("process_threads") >= 2.0);
    assert!(scrape.value("process_cpu_seconds_total") > 0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let started = scrape.value("process_start_time_seconds");
    assert!(
        started <= now + 1.0 && started > now - 86_400.0,
        "{started}"
    );
    gw.shutdown().await;
}

/// Waits (up to 10 s) for a scrape that `done` accepts.
async fn scrape_until(gw: &TestGateway, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let scrape = Scrape::of(gw).await;
        if done(&scrape) || tokio::time::Instant::now() > deadline {
            return scrape;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_reload_removing_a_provider_removes_its_series_and_reloads_are_counted() {
    let alive = StandIn::json(200, &image_response(1, USAGE)).await;
    let unique = uuid::Uuid::now_v7().simple().to_string();
    let dead = dead_url();
    let config = providers_config(&unique, &[("kept", &alive.base_url()), ("gone", &dead)]);
    let gw = TestGateway::start(Db::Sqlite, &config).await;
    let gone = format!("gone-{unique}");
    let gone_model = format!("gone-model-{unique}");

    // The provider that goes fails once: its circuit opens (1 failure opens it here).
    let response = gw
        .post_json(
            "/v1/images/generations",
            &format!(r#"{{"model":"{gone_model}","prompt":"fox"}}"#),
        )
        .await;
    assert_eq!(response.status(), 502);
    let before = Scrape::of(&gw).await;
    assert_eq!(
        before.value(&format!(
            "imagegate_provider_circuit_open{{provider=\"{gone}\"}}"
        )),
        1.0
    );
    let applied = "imagegate_config_reloads_total{trigger=\"admin_api\",result=\"applied\"}";
    let refused = "imagegate_config_reloads_total{trigger=\"admin_api\",result=\"refused\"}";

    // A reload without it: every series naming it, or its model, goes.
    let file = std::fs::read_to_string(&gw.config_path).expect("config");
    let start = file
        .find(&format!("[providers.{gone}]"))
        .expect("its section");
    let end = file[start..].find("per_image").expect("its price") + start;
    let end = end + file[end..].find('\n').expect("line end");
    let without = format!("{}{}", &file[..start], &file[end..]);
    std::fs::write(&gw.config_path, &without).expect("write");
    let reload = |token: &'static str| {
        gw.client
            .post(gw.url("/admin/reload"))
            .bearer_auth(token)
            .send()
    };
    let answer = reload(ADMIN_TOKEN).await.expect("reload");
    assert_eq!(
        answer.status(),
        200,
        "{}",
        answer.text().await.unwrap_or_default()
    );
    let after = scrape_until(&gw, |s| !s.mentions("provider", &gone)).await;
    assert!(
        !after.mentions("provider", &gone) && !after.mentions("model", &gone_model),
        "series of the removed provider and model left in:\n{}",
        after.text
    );
    let kept = format!("kept-{unique}");
    assert_eq!(
        after.value(&format!(
            "imagegate_provider_circuit_open{{provider=\"{kept}\"}}"
        )),
        0.0,
        "the provider kept keeps its series"
    );
    assert!(after.value(applied) >= before.value(applied) + 1.0);

    // A refused reload is counted as refused, and the table in force stays.
    std::fs::write(&gw.config_path, "default_model = 3\n").expect("write");
    let answer = reload(ADMIN_TOKEN).await.expect("reload");
    assert_eq!(answer.status(), 400);
    let refusal = Scrape::of(&gw).await;
    assert!(refusal.value(refused) >= after.value(refused) + 1.0);
    assert!(refusal.mentions("provider", &kept));

    // Put back, the provider's series come back at zero, its circuit closed: what was
    // removed was forgotten, the open circuit with it.
    std::fs::write(&gw.config_path, &file).expect("write");
    assert_eq!(reload(ADMIN_TOKEN).await.expect("reload").status(), 200);
    let back = Scrape::of(&gw).await;
    let route = format!("model=\"{gone_model}\",provider=\"{gone}\"");
    assert_eq!(
        back.value(&format!(
            "imagegate_upstream_requests_total{{{route},status=\"200\"}}"
        )),
        0.0
    );
    assert_eq!(
        back.value(&format!(
            "imagegate_provider_circuit_open{{provider=\"{gone}\"}}"
        )),
        0.0
    );
    assert_eq!(gw.readyz().await["checks"]["providers"][&gone], "closed");
    gw.shutdown().await;
}

#[tokio::test]
async fn provider_latency_and_time_to_first_byte_are_kept_apart_by_outcome() {
    let slow = StandIn::json(200, &image_response(1, USAGE)).await;
    slow.set_delay(Duration::from_millis(300));
    let failing = StandIn::json(
        500,
        r#"{"error":{"message":"boom","type":"server_error","param":null,"code":null}}"#,
    )
    .await;
    let unique = uuid::Uuid::now_v7().simple().to_string();
    let dead = dead_url();
    let config = providers_config(
        &unique,
        &[
            ("slow", &slow.base_url()),
            ("failing", &failing.base_url()),
            ("dead", &dead),
        ],
    );
    let gw = TestGateway::start(Db::Sqlite, &config).await;
    for (name, status) in [("slow", 200), ("failing", 502), ("dead", 502)] {
        let response = gw
            .post_json(
                "/v1/images/generations",
                &format!(r#"{{"model":"{name}-model-{unique}","prompt":"fox"}}"#),
            )
            .await;
        assert_eq!(response.status(), status, "{name}");
        response.bytes().await.expect("body");
    }
    gw.usage_rows(3).await;
    let route =
        |name: &str| format!("model=\"{name}-model-{unique}\",provider=\"{name}-{unique}\"");
    let duration = |name: &str, outcome: &str, part: &str| {
        format!(
            "imagegate_upstream_duration_seconds_{part}{{{},outcome=\"{outcome}\"}}",
            route(name)
        )
    };
    let first_byte = |name: &str, outcome: &str, part: &str| {
        format!(
            "imagegate_upstream_first_byte_seconds_{part}{{{},outcome=\"{outcome}\"}}",
            route(name)
        )
    };
    let scrape = scrape_until(&gw, |s| {
        s.get(&duration("slow", "success", "count")) == Some(1.0)
    })
    .await;

    // The success: its whole time, and its head after the provider's 300 ms.
    assert_eq!(scrape.value(&duration("slow", "success", "count")), 1.0);
    assert!(scrape.value(&duration("slow", "success", "sum")) >= 0.3);
    assert_eq!(scrape.value(&first_byte("slow", "success", "count")), 1.0);
    let head = scrape.value(&first_byte("slow", "success", "sum"));
    assert!((0.3..5.0).contains(&head), "{head}");
    // The provider's error status: counted as such, never as a success.
    assert_eq!(
        scrape.value(&duration("failing", "error_status", "count")),
        1.0
    );
    assert_eq!(
        scrape.value(&first_byte("failing", "error_status", "count")),
        1.0
    );
    assert_eq!(scrape.value(&duration("failing", "success", "count")), 0.0);
    // No answer at all (nothing listens): its cause, and no time to a head that never came.
    assert_eq!(scrape.value(&duration("dead", "refused", "count")), 1.0);
    assert_eq!(scrape.value(&duration("dead", "success", "count")), 0.0);
    assert_eq!(scrape.value(&first_byte("dead", "success", "count")), 0.0);
    assert_eq!(scrape.get(&first_byte("dead", "refused", "count")), None);
    assert_eq!(
        scrape.value(&format!(
            "imagegate_upstream_duration_seconds_bucket{{{},outcome=\"refused\",le=\"0.25\"}}",
            route("dead")
        )),
        1.0,
        "a refused connection takes no time"
    );
    gw.shutdown().await;
}

/// The binary (a process of its own: its figures are its alone): its configured provider at
/// zero from start, and each SIGHUP counted, applied or refused.
#[tokio::test]
async fn the_binary_counts_sighup_reloads_applied_and_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = binary::write_config(dir.path(), &["gpt-image-1"]);
    let mut command = binary::command(&config);
    command.arg("serve").env("CLI_TEST_PROVIDER_KEY", SECRET);
    let (mut child, addr, _log) = binary::serve(command).await.into_parts();
    let client = reqwest::Client::new();
    let scrape = || async {
        let text = client
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .expect("send")
            .text()
            .await
            .expect("text");
        Scrape::parse(text)
    };
    let applied = "imagegate_config_reloads_total{trigger=\"sighup\",result=\"applied\"}";
    let refused = "imagegate_config_reloads_total{trigger=\"sighup\",result=\"refused\"}";
    let start = scrape().await;
    assert_eq!((start.value(applied), start.value(refused)), (0.0, 0.0));
    assert_eq!(
        start.value("imagegate_provider_circuit_open{provider=\"real\"}"),
        0.0
    );
    assert!(!start.text.contains(SECRET), "never a provider key");

    let counted = |series: &'static str| {
        let scrape = &scrape;
        async move {
            for _ in 0..200 {
                let now = scrape().await;
                if now.value(series) == 1.0 {
                    return now;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            panic!("{series} never reached 1");
        }
    };
    binary::signal(&child, "-HUP");
    let after = counted(applied).await;
    assert_eq!(after.value(refused), 0.0);
    std::fs::write(&config, "default_model = 3\n").expect("write");
    binary::signal(&child, "-HUP");
    let after = counted(refused).await;
    assert_eq!(after.value(applied), 1.0);
    let status = binary::terminate(&mut child, Duration::from_secs(15)).await;
    assert!(status.success(), "SIGTERM exits 0");
}

/// An upload streamed through (an SDK's multipart edit, in its field order) is timed like a
/// JSON call: its time to first byte includes sending the upload, its head after the
/// provider's delay.
#[tokio::test]
async fn an_sdk_multipart_edit_is_timed_to_its_first_byte_like_a_json_generation() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    provider.set_delay(Duration::from_millis(200));
    let unique = uuid::Uuid::now_v7().simple().to_string();
    let up = format!("up-{unique}");
    // The captures ask for gpt-image-1: routed here to a provider no other test names.
    let config = test_config(
        &provider.base_url(),
        &format!(
            "[providers.{up}]\nbase_url = \"{}\"\napi_key_env = \"TEST_PIAPI_KEY\"\n\
             [pricing.\"{up}\".\"gpt-image-1\"]\ntext_input = 5.00\ncached_text_input = 1.25\n\
             image_input = 10.00\ncached_image_input = 1.25\nimage_output = 40.00\n",
            provider.base_url()
        ),
    )
    .replacen(
        r#"provider = "piapi", model = "gpt-image-1""#,
        &format!(r#"provider = "{up}", model = "gpt-image-1""#),
        1,
    );
    let gw = TestGateway::start(Db::Sqlite, &config).await;
    let edit = gw.replay(&capture("python1x_edit_one")).await;
    assert_eq!(edit.status(), 200);
    edit.bytes().await.expect("body");
    let generation = gw
        .post_json("/v1/images/generations", r#"{"prompt":"fox"}"#)
        .await;
    assert_eq!(generation.status(), 200);
    generation.bytes().await.expect("body");
    assert_eq!(provider.requests().len(), 2);
    gw.usage_rows(2).await;
    let labels = format!("model=\"gpt-image-1\",provider=\"{up}\",outcome=\"success\"");
    let count = format!("imagegate_upstream_first_byte_seconds_count{{{labels}}}");
    let scrape = scrape_until(&gw, |s| s.get(&count) == Some(2.0)).await;
    assert_eq!(scrape.value(&count), 2.0, "the edit and the generation");
    let sum = scrape.value(&format!(
        "imagegate_upstream_first_byte_seconds_sum{{{labels}}}"
    ));
    assert!((0.4..10.0).contains(&sum), "{sum}");
    assert_eq!(
        scrape.value(&format!(
            "imagegate_upstream_duration_seconds_count{{{labels}}}"
        )),
        2.0
    );
    gw.shutdown().await;
}
