//! Failover between a model's routes and the circuit breaker per provider, for generations
//! and for edits (replayed from the disk spool).

use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures_util::StreamExt;

use crate::generations::expect_error;
use crate::support::forms::{BOUNDARY, Form};
use crate::support::*;
use imagegate::usage::Outcome;

const GEN: &str = "/v1/images/generations";

/// Two providers, `first` and `second`, behind the model `duo`; `solo` only on `first`.
fn duo_config(first: &str, second: &str, extra_model: &str) -> String {
    duo_config_with(first, second, extra_model, 10)
}

fn duo_config_with(first: &str, second: &str, extra_model: &str, breaker_failures: u32) -> String {
    let extra = format!(
        r#"
[providers.first]
base_url = "{first}"
api_key_env = "TEST_PIAPI_KEY"
first_byte_timeout = "1s"
breaker_failures = {breaker_failures}
breaker_cooldown = "1s"
[providers.second]
base_url = "{second}"
api_key_env = "TEST_PIAPI_KEY"
image_field = "image[]"
[models.duo]
routes = [{{ provider = "first", model = "m1" }}, {{ provider = "second", model = "m2", defaults = {{ quality = "low" }} }}]
{extra_model}
[models.solo]
routes = [{{ provider = "first", model = "m1" }}]
[pricing.first.m1]
per_image = 0.05
[pricing.second.m2]
per_image = 0.03
"#
    );
    test_config(second, &extra)
}

/// A gateway on `db` with [`duo_config`] over the stand-ins `first` and `second`.
async fn duo_gateway(db: Db, first: &StandIn, second: &StandIn) -> TestGateway {
    duo_gateway_with(db, first, second, 10).await
}

/// [`duo_gateway`] with [`duo_config_with`]'s `breaker_failures`.
async fn duo_gateway_with(db: Db, first: &StandIn, second: &StandIn, failures: u32) -> TestGateway {
    let config = duo_config_with(&first.base_url(), &second.base_url(), "", failures);
    TestGateway::start(db, &config).await
}

async fn generate(gw: &TestGateway, model: &str) -> reqwest::Response {
    gw.post_json(GEN, &format!(r#"{{"model":"{model}","prompt":"fox"}}"#))
        .await
}

#[tokio::test]
async fn generations_fail_over_on_5xx_429_refused_and_timeouts_but_not_on_4xx() {
    let first = StandIn::json(500, "oops").await;
    let second = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = duo_gateway(Db::Postgres, &first, &second).await;

    // 500 on the first route: the second answers, the client sees one response.
    let response = generate(&gw, "duo").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-imagegate-provider"], "second");
    assert_eq!(response.headers()["x-imagegate-attempts"], "2");
    assert_eq!(
        response.text().await.expect("body"),
        image_response(1, USAGE)
    );
    let sent = second.requests()[0].json();
    assert_eq!(
        (sent["model"].as_str(), sent["quality"].as_str()),
        (Some("m2"), Some("low")),
        "the second route's own rewrite"
    );

    // 429, then a first-byte timeout: both fail over.
    first.set_handler(|_| {
        respond(
            429,
            "application/json",
            r#"{"error":{"message":"busy","type":"rate_limit","param":null,"code":null}}"#,
        )
    });
    assert_eq!(generate(&gw, "duo").await.status(), 200);
    first.set_handler(|_| respond(200, "application/json", image_response(1, USAGE)));
    first.set_delay(Duration::from_secs(3));
    let response = generate(&gw, "duo").await;
    assert_eq!(response.headers()["x-imagegate-provider"], "second");
    response.bytes().await.expect("body");

    // A 400 is the client's problem: no failover, and the SDKs are told not to retry.
    first.set_delay(Duration::ZERO);
    first.set_handler(|_| respond(400, "application/json", r#"{"error":{"message":"bad size","type":"invalid_request_error","param":"size","code":null}}"#));
    let response = generate(&gw, "duo").await;
    assert_eq!(response.headers()["x-should-retry"], "false");
    expect_error(response, 400).await;
    assert_eq!(second.requests().len(), 3);

    let rows = gw.usage_rows(7).await;
    let summary: Vec<(String, i32, Outcome)> = rows
        .iter()
        .map(|r| (r.provider.clone(), r.status, r.outcome))
        .collect();
    assert_eq!(
        summary,
        [
            ("first".into(), 502, Outcome::UpstreamError),
            ("second".into(), 200, Outcome::Completed),
            ("first".into(), 429, Outcome::UpstreamError),
            ("second".into(), 200, Outcome::Completed),
            ("first".into(), 504, Outcome::Failed),
            ("second".into(), 200, Outcome::Completed),
            ("first".into(), 400, Outcome::UpstreamError),
        ]
    );
    assert_eq!(
        rows[1].request_id,
        format!("{}-2", rows[0].request_id),
        "one request, two attempts"
    );
    // Each row names its client request and its attempt; a failed attempt says why.
    let attempts: Vec<(i32, Option<&str>)> = rows
        .iter()
        .map(|r| (r.attempt, r.cause.as_deref()))
        .collect();
    assert_eq!(
        attempts,
        [
            (1, Some("http_500")),
            (2, None),
            (1, Some("http_429")),
            (2, None),
            (1, Some("timeout")),
            (2, None),
            (1, Some("http_400")),
        ]
    );
    for pair in rows.chunks(2) {
        let client = pair[0].request_id.as_str();
        assert!(
            pair.iter().all(|r| r.client_request() == client),
            "{pair:?}"
        );
    }
    assert_eq!(rows[1].cost_nanousd, Some(30_000_000));
    assert!(
        rows.iter()
            .filter(|r| r.provider == "first")
            .all(|r| r.cost_nanousd == Some(0))
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn no_failover_once_a_provider_has_begun_a_successful_answer() {
    let first = StandIn::start(|_| {
        // The status and a first chunk go out, then the provider breaks off.
        let first = futures_util::stream::once(async {
            Ok::<_, std::io::Error>(Bytes::from_static(
                b"{\"created\":1,\"data\":[{\"b64_json\":\"AAAA",
            ))
        });
        let broken = futures_util::stream::once(async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Err(std::io::Error::other("provider broke off"))
        });
        let mut response = respond(200, "application/json", "");
        *response.body_mut() = Body::from_stream(futures_util::StreamExt::chain(first, broken));
        response
    })
    .await;
    let second = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = duo_gateway(Db::Sqlite, &first, &second).await;
    let response = generate(&gw, "duo").await;
    assert_eq!(response.status(), 200);
    let body = response.bytes().await;
    assert!(
        body.is_err(),
        "the broken body reaches the client as a broken body: {body:?}"
    );
    assert!(
        second.requests().is_empty(),
        "never a second call after a successful start"
    );
    let rows = gw.usage_rows(1).await;
    assert_eq!(
        (rows[0].provider.as_str(), rows[0].outcome),
        ("first", Outcome::Failed)
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn max_attempts_and_connection_refused() {
    let dead = dead_url();
    let second = StandIn::json(200, &image_response(1, USAGE)).await;
    let one_attempt = r#"
[models.duo-once]
routes = [{ provider = "first", model = "m1" }, { provider = "second", model = "m2" }]
failover = { max_attempts = 1 }
"#;
    let gw = TestGateway::start(
        Db::Sqlite,
        &duo_config(&dead, &second.base_url(), one_attempt),
    )
    .await;
    let response = generate(&gw, "duo").await;
    assert_eq!(response.headers()["x-imagegate-provider"], "second");
    response.bytes().await.expect("body");
    expect_error(generate(&gw, "duo-once").await, 502).await;
    assert_eq!(second.requests().len(), 1);
    let rows = gw.usage_rows(3).await;
    let causes: Vec<(&str, i32, Option<&str>)> = rows
        .iter()
        .map(|r| (r.provider.as_str(), r.attempt, r.cause.as_deref()))
        .collect();
    assert_eq!(
        causes,
        [
            ("first", 1, Some("refused")),
            ("second", 2, None),
            ("first", 1, Some("refused")),
        ]
    );
    // Three provider calls, two of them failed; the clients made two requests and saw one
    // fail (the first request's refused attempt was retried on the second route).
    let report: serde_json::Value = crate::admin_usage::admin_get(&gw, "/admin/usage")
        .await
        .json()
        .await
        .expect("json");
    let key = &report["data"][0];
    assert_eq!(
        (
            &key["requests"],
            &key["failed"],
            &key["client_requests"],
            &key["client_failures"]
        ),
        (
            &serde_json::json!(3),
            &serde_json::json!(2),
            &serde_json::json!(2),
            &serde_json::json!(1)
        ),
        "{report}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn the_breaker_skips_a_failing_provider_then_probes_it() {
    let first = StandIn::json(503, "down").await;
    let second = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = duo_gateway_with(Db::Postgres, &first, &second, 2).await;
    for _ in 0..2 {
        generate(&gw, "duo").await.bytes().await.expect("body");
    }
    assert_eq!(first.requests().len(), 2);
    let ready = gw.readyz().await;
    assert_eq!(ready["checks"]["providers"]["first"], "open");
    // Open: the first provider is skipped, the second serves at once.
    let response = generate(&gw, "duo").await;
    assert_eq!(response.headers()["x-imagegate-provider"], "second");
    assert!(
        response.headers().get("x-imagegate-attempts").is_none(),
        "one attempt only"
    );
    response.bytes().await.expect("body");
    assert_eq!(first.requests().len(), 2);
    // A model with no other route gets a 503 with retry-after while the circuit is open.
    let response = generate(&gw, "solo").await;
    assert!(response.headers().contains_key("retry-after"));
    let error = expect_error(response, 503).await;
    assert_eq!(error["code"], "provider_unavailable");
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("imagegate_provider_circuit_open{provider=\"first\"} 1"),
        "{metrics}"
    );
    // After the cooldown one request probes the provider; it has recovered.
    first.set_handler(|_| respond(200, "application/json", image_response(1, USAGE)));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let response = generate(&gw, "duo").await;
    assert_eq!(response.headers()["x-imagegate-provider"], "first");
    response.bytes().await.expect("body");
    let ready = gw.readyz().await;
    assert_eq!(ready["checks"]["providers"]["first"], "closed");
    gw.shutdown().await;
}

#[tokio::test]
async fn edits_fail_over_with_the_upload_replayed_from_the_spool() {
    let first = StandIn::json(502, "bad gateway").await;
    let second = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = duo_gateway(Db::Postgres, &first, &second).await;
    let image: Vec<u8> = b"\x89PNG\r\n\x1a\n"
        .iter()
        .copied()
        .chain((0..300_000u32).map(|i| (i % 251) as u8))
        .collect();
    let form = Form::new()
        .text("model", "duo")
        .text("prompt", "blue")
        .file_named("image", "a.png", "application/octet-stream", &image);
    let response = gw.post_form("/v1/images/edits", &form).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-imagegate-provider"], "second");
    response.bytes().await.expect("body");
    let to_first = first.complete_requests();
    let to_second = second.complete_requests();
    assert_eq!((to_first.len(), to_second.len()), (1, 1));
    for (got, model, field) in [
        (&to_first[0], "m1", "name=\"image\""),
        (&to_second[0], "m2", "name=\"image[]\""),
    ] {
        let text = String::from_utf8_lossy(&got.body);
        assert!(
            text.contains(&format!("name=\"model\"\r\n\r\n{model}\r\n")),
            "{model}"
        );
        assert!(
            text.contains(field) && text.contains("Content-Type: image/png"),
            "{model}"
        );
        assert!(
            got.body.windows(image.len()).any(|w| w == image.as_slice()),
            "image bytes identical for {model}"
        );
    }
    assert_eq!(gw.spool_files(), 0);
    let rows = gw.usage_rows(2).await;
    assert_eq!(
        rows.iter().map(|r| r.endpoint.as_str()).collect::<Vec<_>>(),
        ["edits", "edits"]
    );
    // The upload's attempts are tied together as the JSON ones are.
    assert_eq!(
        rows.iter()
            .map(|r| (r.attempt, r.cause.as_deref(), r.client_request()))
            .collect::<Vec<_>>(),
        [
            (1, Some("http_502"), rows[0].request_id.as_str()),
            (2, None, rows[0].request_id.as_str())
        ]
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn one_keys_flood_of_429s_does_not_open_the_circuit_for_every_key() {
    let first = StandIn::start(|got| {
        if got.json()["prompt"] == "flood" {
            respond(429, "application/json", r#"{"error":{"message":"slow down","type":"rate_limit","param":null,"code":"rate_limit_exceeded"}}"#)
        } else {
            respond(200, "application/json", image_response(1, USAGE))
        }
    })
    .await;
    let second = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = duo_gateway_with(Db::Sqlite, &first, &second, 2).await;
    for _ in 0..6 {
        let flood = gw
            .post_json(GEN, r#"{"model":"solo","prompt":"flood"}"#)
            .await;
        expect_error(flood, 429).await;
    }
    let other = imagegate::auth::issue_key("quiet-svc");
    gw.store.create_key(other.new.clone()).await.expect("key");
    let response = gw
        .client
        .post(gw.url(GEN))
        .bearer_auth(&other.key)
        .header("content-type", "application/json")
        .body(r#"{"model":"solo","prompt":"fox"}"#)
        .send()
        .await
        .expect("send");
    assert_eq!(
        response.status(),
        200,
        "the provider's circuit stayed closed"
    );
    assert_eq!(response.headers()["x-imagegate-provider"], "first");
    response.bytes().await.expect("body");
    assert_eq!(first.requests().len(), 7);
    gw.usage_rows(7).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn a_timeout_while_the_client_still_uploads_does_not_open_the_circuit() {
    let first = StandIn::json(200, &image_response(1, USAGE)).await;
    let second = StandIn::json(200, &image_response(1, USAGE)).await;
    // One failure opens `first`'s circuit; its first-byte timeout is 1 s.
    let gw = duo_gateway_with(Db::Sqlite, &first, &second, 1).await;
    let form = Form::edit("solo", "p");
    // Held back: the image's last ten bytes and the closing delimiter.
    let mut head = form.body();
    let tail = head.split_off(head.len() - format!("0123456789\r\n--{BOUNDARY}--\r\n").len());
    // The client's upload takes longer than the provider's first-byte timeout.
    let body = futures_util::stream::iter([Ok::<_, std::io::Error>(head)]).chain(
        futures_util::stream::once(async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            Ok(tail)
        }),
    );
    let slow = gw
        .client
        .post(gw.url("/v1/images/edits"))
        .bearer_auth(&gw.key)
        .header("content-type", form.content_type())
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .expect("send");
    assert_eq!(slow.status(), 504);
    slow.bytes().await.expect("body");

    let response = generate(&gw, "solo").await;
    assert_eq!(
        response.status(),
        200,
        "the slow client did not open the circuit"
    );
    response.bytes().await.expect("body");
    gw.shutdown().await;
}

/// Starts `imagegate serve` with JSON logs on `config_toml` and a fresh Postgres database;
/// returns the process, its address and a key it accepts.
async fn serve_with_json_logs(
    dir: &std::path::Path,
    config_toml: &str,
) -> (crate::support::binary::Served, String) {
    let (store, url) = crate::support::db::fresh_postgres().await;
    let config = crate::support::gateway::write_config(dir, &url, config_toml);
    let mut command = crate::support::binary::command(&config);
    command
        .arg("serve")
        .env("TEST_PIAPI_KEY", PROVIDER_KEY)
        .env("IMAGEGATE_LOG_FORMAT", "json")
        .env("RUST_LOG", "info");
    let served = crate::support::binary::serve(command).await.into_parts();
    let issued = imagegate::auth::issue_key("logged");
    store.create_key(issued.new).await.expect("create key");
    (served, issued.key)
}

#[tokio::test]
async fn a_request_has_one_access_line_and_each_provider_call_its_own_line() {
    let first = StandIn::json(500, "oops").await;
    let second = StandIn::json(200, &image_response(1, USAGE)).await;
    let dir = tempfile::tempdir().expect("dir");
    let config = duo_config(&first.base_url(), &second.base_url(), "");
    let ((mut child, addr, log), key) = serve_with_json_logs(dir.path(), &config).await;
    let client = reqwest::Client::new();
    let post = |model: &'static str| {
        client
            .post(format!("http://{addr}{GEN}"))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(format!(r#"{{"model":"{model}","prompt":"fox"}}"#))
            .send()
    };
    // Failed over: one request, two provider calls. Unknown model: no provider call.
    let failed_over = post("duo").await.expect("answer");
    assert_eq!(failed_over.status(), 200);
    let id = failed_over.headers()["x-request-id"]
        .to_str()
        .expect("id")
        .to_owned();
    failed_over.bytes().await.expect("body");
    let unknown = post("no-such-model").await.expect("answer");
    assert_eq!(unknown.status(), 404);
    let unknown_id = unknown.headers()["x-request-id"]
        .to_str()
        .expect("id")
        .to_owned();

    tokio::time::sleep(Duration::from_millis(300)).await;
    crate::support::binary::signal(&child, "-TERM");
    child.wait().await.expect("exits");
    let log = log.await.expect("log");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    let of = |target: &str, request_id: &str| -> Vec<&serde_json::Value> {
        lines
            .iter()
            .filter(|l| {
                l["target"] == target
                    && l["request_id"].as_str().is_some_and(|r| {
                        r == request_id || r.starts_with(&format!("{request_id}-"))
                    })
            })
            .collect()
    };
    let access = of("imagegate::access", &id);
    assert_eq!(access.len(), 1, "{log}");
    assert_eq!(access[0]["status"], 200, "{log}");
    let calls = of("imagegate::usage", &id);
    // The provider's 500 is the client's 502 (`upstream_error`), as its usage row has it.
    let statuses: Vec<_> = calls.iter().map(|l| l["status"].clone()).collect();
    assert_eq!(statuses, [502, 200], "{log}");
    assert_eq!(of("imagegate::access", &unknown_id).len(), 1, "{log}");
    assert!(of("imagegate::usage", &unknown_id).is_empty(), "{log}");
}
