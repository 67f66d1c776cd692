//! Who can read `/metrics`, and what it names: on a listener of its own when
//! `server.metrics_listen` is set (the main listener then answers 404), started and stopped
//! with the server, in the library and in the binary; and no key's name unless
//! `metrics.per_key` is on.

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
