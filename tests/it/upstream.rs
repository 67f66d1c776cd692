//! What happens between imagegate and a provider: errors and their mapping, bodies streamed
//! through, clients that leave early, reloads that switch providers, health and metrics.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::Notify;

use crate::generations::expect_error;
use crate::support::*;
use imagegate::usage::Outcome;

const GEN: &str = "/v1/images/generations";
const BODY: &str = r#"{"model":"gpt-image-1","prompt":"fox"}"#;

#[tokio::test]
async fn provider_errors_become_openai_errors_with_one_row_each() {
    let provider = StandIn::json(200, "{}").await;
    let gw = TestGateway::start(Db::Postgres, &test_config(&provider.base_url(), "")).await;

    let openai_body = r#"{"error":{"message":"Invalid size '7x7'.","type":"invalid_request_error","param":"size","code":"invalid_value"}}"#;
    provider.set_handler(move |_| respond(400, "application/json", openai_body));
    let response = gw.post_json(GEN, BODY).await;
    assert_eq!(response.headers()["x-imagegate-provider"], "piapi");
    let error = expect_error(response, 400).await;
    assert_eq!(error["message"], "Invalid size '7x7'.");
    assert_eq!(error["param"], "size");

    provider.set_handler(|_| respond(400, "text/plain", "bad things"));
    let error = expect_error(gw.post_json(GEN, BODY).await, 400).await;
    assert!(
        error["message"]
            .as_str()
            .expect("message")
            .contains("bad things")
    );

    provider.set_handler(|_| {
        let mut r = respond(
            429,
            "application/json",
            r#"{"error":{"message":"slow down","type":"rate_limit","param":null,"code":null}}"#,
        );
        r.headers_mut()
            .insert("retry-after", "7".parse().expect("header"));
        r
    });
    let response = gw.post_json(GEN, BODY).await;
    assert_eq!(response.headers()["retry-after"], "7");
    expect_error(response, 429).await;

    provider.set_handler(|_| respond(500, "text/html", "<h1>oops</h1>"));
    let error = expect_error(gw.post_json(GEN, BODY).await, 502).await;
    assert_eq!(error["type"], "upstream_error");

    // A provider that refuses imagegate's own key is the operator's problem: 502, and the
    // provider key it echoes never reaches the client.
    provider.set_handler(|_| {
        respond(401, "application/json", format!(r#"{{"error":{{"message":"Incorrect API key provided: {PROVIDER_KEY}","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}}}"#))
    });
    let response = gw.post_json(GEN, BODY).await;
    assert_eq!(response.status(), 502);
    let text = response.text().await.expect("body");
    assert!(!text.contains(PROVIDER_KEY), "{text}");

    // A 4xx body that echoes the key is redacted too.
    provider.set_handler(|_| respond(400, "text/plain", format!("key {PROVIDER_KEY} is odd")));
    let text = gw.post_json(GEN, BODY).await.text().await.expect("body");
    assert!(
        !text.contains(PROVIDER_KEY) && text.contains("[redacted]"),
        "{text}"
    );

    // A redirect is not followed: the upload and the key would go somewhere the
    // configuration does not name.
    let elsewhere = StandIn::json(200, "{}").await;
    let location = format!("{}/images/generations", elsewhere.base_url());
    provider.set_handler(move |_| {
        let mut r = respond(307, "text/plain", "moved");
        r.headers_mut()
            .insert("location", location.parse().expect("header"));
        r
    });
    expect_error(gw.post_json(GEN, BODY).await, 502).await;
    assert!(elsewhere.requests().is_empty(), "the redirect was followed");

    let rows = gw.usage_rows(7).await;
    let statuses: Vec<i32> = rows.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [400, 400, 429, 502, 502, 400, 502]);
    for row in &rows {
        assert_eq!(row.outcome, Outcome::UpstreamError);
        assert_eq!(
            (row.cost_nanousd, row.images, row.total_tokens),
            (Some(0), 0, 0)
        );
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn unreachable_and_slow_providers_get_502_and_504() {
    let dead = dead_url();
    let slow = StandIn::json(200, &image_response(1, USAGE)).await;
    slow.set_delay(Duration::from_secs(3));
    let extra = format!(
        r#"
[providers.dead]
base_url = "{dead}"
api_key_env = "TEST_PIAPI_KEY"
[providers.slow]
base_url = "{}"
api_key_env = "TEST_PIAPI_KEY"
total_timeout = "1s"
[models."dead-model"]
routes = [{{ provider = "dead", model = "m" }}]
[models."slow-model"]
routes = [{{ provider = "slow", model = "m" }}]
[pricing.dead.m]
per_image = 0.01
[pricing.slow.m]
per_image = 0.01
"#,
        slow.base_url()
    );
    let gw = TestGateway::start(Db::Sqlite, &test_config(&dead, &extra)).await;
    for (model, status, code) in [
        ("dead-model", 502, "upstream_unreachable"),
        ("slow-model", 504, "upstream_timeout"),
    ] {
        let body = format!(r#"{{"model":"{model}","prompt":"p"}}"#);
        let error = expect_error(gw.post_json(GEN, &body).await, status).await;
        assert_eq!(error["code"], code, "{model}");
    }
    let rows = gw.usage_rows(2).await;
    assert_eq!((rows[0].provider.as_str(), rows[0].status), ("dead", 502));
    assert_eq!((rows[1].provider.as_str(), rows[1].status), ("slow", 504));
    assert!(
        rows.iter()
            .all(|r| r.outcome == Outcome::Failed && r.cost_nanousd == Some(0))
    );
    gw.shutdown().await;
}

/// A provider body sent in two parts: the second only once `release` is notified.
fn two_part_body(first: Bytes, rest: Bytes, release: Arc<Notify>) -> Body {
    let first = futures_util::stream::once(async move { Ok::<_, std::io::Error>(first) });
    let rest = futures_util::stream::once(async move {
        release.notified().await;
        Ok(rest)
    });
    Body::from_stream(first.chain(rest))
}

/// A 30 MB answer with usage at the end.
fn large_answer() -> (Bytes, Bytes) {
    let image = "A".repeat(30 * 1024 * 1024);
    let first = Bytes::from(format!(r#"{{"created":1,"data":[{{"b64_json":"{image}"#));
    let rest = Bytes::from(format!(r#""}}],"usage":{USAGE}}}"#));
    (first, rest)
}

/// A stand-in that answers [`large_answer`] in two parts, the second once `release` is
/// notified, and the whole answer's length in bytes.
async fn holding_large_answer(release: &Arc<Notify>) -> (StandIn, usize) {
    let (first, rest) = large_answer();
    let length = first.len() + rest.len();
    let release = Arc::clone(release);
    let provider = StandIn::start(move |_| {
        let mut response = respond(200, "application/json", "");
        *response.body_mut() = two_part_body(first.clone(), rest.clone(), Arc::clone(&release));
        response
    })
    .await;
    (provider, length)
}

#[tokio::test]
async fn large_answers_stream_through_and_usage_is_read_at_the_end() {
    let release = Arc::new(Notify::new());
    let (provider, expected_len) = holding_large_answer(&release).await;
    let gw = TestGateway::start(Db::Postgres, &test_config(&provider.base_url(), "")).await;
    let response = gw.post_json(GEN, BODY).await;
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    // The client receives the start of the image while the provider still holds the rest.
    let mut received = 0usize;
    while received < 1024 * 1024 {
        let chunk = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("bytes arrive before the provider finishes")
            .expect("not the end")
            .expect("chunk");
        received += chunk.len();
    }
    release.notify_one();
    let mut tail = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("chunk");
        received += chunk.len();
        if tail.len() < 4096 {
            tail.extend_from_slice(&chunk[chunk.len().saturating_sub(4096)..]);
        }
    }
    assert_eq!(received, expected_len);
    let rows = gw.usage_rows(1).await;
    assert_eq!((rows[0].input_tokens, rows[0].output_tokens), (1124, 765));
    assert_eq!(rows[0].images, 1);
    assert_eq!(rows[0].cost_nanousd, Some(gpt_image_1_cost(19, 1105, 765)));
    gw.shutdown().await;
}

#[tokio::test]
async fn a_client_that_leaves_early_still_gets_its_usage_recorded() {
    let release = Arc::new(Notify::new());
    let (provider, _) = holding_large_answer(&release).await;
    let gw = TestGateway::start(Db::Sqlite, &test_config(&provider.base_url(), "")).await;
    let response = gw.post_json(GEN, BODY).await;
    let mut stream = response.bytes_stream();
    stream.next().await.expect("first chunk").expect("chunk");
    drop(stream);
    // Give imagegate a moment to see the client gone, then let the provider finish.
    tokio::time::sleep(Duration::from_millis(200)).await;
    release.notify_one();
    let rows = gw.usage_rows(1).await;
    assert_eq!(rows[0].outcome, Outcome::Completed);
    assert_eq!(
        (rows[0].input_tokens, rows[0].output_tokens, rows[0].images),
        (1124, 765, 1)
    );
    assert_eq!(rows[0].cost_nanousd, Some(gpt_image_1_cost(19, 1105, 765)));
    gw.shutdown().await;
}

fn routed_to(base_url: &str) -> String {
    test_config(base_url, "")
}

#[tokio::test]
async fn reload_switches_providers_and_keeps_requests_in_flight_on_their_table() {
    let a = StandIn::json(200, &image_response(1, USAGE)).await;
    let b = StandIn::json(200, &image_response(2, USAGE)).await;
    a.set_delay(Duration::from_millis(800));
    let gw = TestGateway::start(Db::Postgres, &routed_to(&a.base_url())).await;
    let database = std::fs::read_to_string(&gw.config_path).expect("config");
    let database = database[database.find("[database]").expect("database section")..].to_owned();
    let write = |base: &str| {
        std::fs::write(&gw.config_path, format!("{}\n{database}", routed_to(base)))
            .expect("write config");
    };
    let reload = |token: &str| {
        gw.client
            .post(gw.url("/admin/reload"))
            .bearer_auth(token)
            .send()
    };

    // A request in flight on provider A...
    let in_flight = gw.post_json(GEN, BODY);
    let switch = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        write(&b.base_url());
        reload(ADMIN_TOKEN).await.expect("reload")
    };
    let (in_flight, reloaded) = tokio::join!(in_flight, switch);
    assert_eq!(reloaded.status(), 200);
    let listed: Value = reloaded.json().await.expect("json");
    assert_eq!(listed["status"], "reloaded");
    // ...finishes on A, and the next one goes to B.
    assert_eq!(in_flight.status(), 200);
    in_flight.bytes().await.expect("body");
    assert_eq!(a.requests().len(), 1);
    let next = gw.post_json(GEN, BODY).await;
    next.bytes().await.expect("body");
    assert_eq!((a.requests().len(), b.requests().len()), (1, 1));

    // A bad file is refused with its reason and B stays in force.
    std::fs::write(&gw.config_path, "default_model = 3\n").expect("write");
    let error = expect_error(reload(ADMIN_TOKEN).await.expect("reload"), 400).await;
    assert!(
        error["message"]
            .as_str()
            .expect("message")
            .contains("default_model"),
        "{error}"
    );
    let response = gw.post_json(GEN, BODY).await;
    assert_eq!(response.status(), 200);
    response.bytes().await.expect("body");
    assert_eq!(b.requests().len(), 2);

    // The admin route needs the admin token, not a client key.
    expect_error(reload("wrong").await.expect("reload"), 401).await;
    expect_error(reload(&gw.key).await.expect("reload"), 401).await;
    let rows = gw.usage_rows(3).await;
    assert_eq!(rows.iter().map(|r| r.images).collect::<Vec<_>>(), [1, 2, 2]);
    gw.shutdown().await;
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = TestGateway::start(Db::Postgres, &test_config(&provider.base_url(), "")).await;
    let healthz = gw
        .client
        .get(gw.url("/healthz"))
        .send()
        .await
        .expect("send");
    assert_eq!(healthz.status(), 200);
    let readyz = gw.readyz().await;
    assert_eq!(readyz["status"], "ready");
    assert_eq!(readyz["checks"]["database"], "ok");
    gw.post_json(GEN, BODY).await.bytes().await.expect("body");
    gw.usage_rows(1).await;
    let metrics = gw.metrics().await;
    for needle in [
        "imagegate_upstream_requests_total{model=\"gpt-image-1\",provider=\"piapi\",status=\"200\"}",
        "imagegate_upstream_duration_seconds_bucket{model=\"gpt-image-1\",provider=\"piapi\"",
        "imagegate_output_tokens_total{model=\"gpt-image-1\",provider=\"piapi\"}",
        "imagegate_cost_nanousd_total{model=\"gpt-image-1\",provider=\"piapi\"}",
        "imagegate_http_requests_total{path=\"/v1/images/generations\",status=\"200\"}",
    ] {
        assert!(
            metrics.contains(needle),
            "{needle} missing from:\n{metrics}"
        );
    }
    assert!(!metrics.contains(PROVIDER_KEY) && !metrics.contains(&gw.key));
    gw.shutdown().await;
}

#[tokio::test]
async fn quiet_sse_streams_get_keep_alive_comments_between_events_only() {
    let event = |kind: &str| {
        format!(
            "event: image_generation.{kind}\ndata: {{\"type\":\"image_generation.{kind}\",\"b64_json\":\"{PNG_B64}\",\"usage\":{USAGE}}}\n\n"
        )
    };
    let (partial, completed) = (event("partial_image"), event("completed"));
    let provider = StandIn::start(move |_| {
        let (p, c) = (partial.clone(), completed.clone());
        // The first event, a pause, then the last event split mid-line with another pause.
        let (c1, c2) = (c[..30].to_owned(), c[30..].to_owned());
        let parts = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from(p))])
            .chain(futures_util::stream::once(async move {
                tokio::time::sleep(Duration::from_millis(700)).await;
                Ok(Bytes::from(c1))
            }))
            .chain(futures_util::stream::once(async move {
                tokio::time::sleep(Duration::from_millis(700)).await;
                Ok(Bytes::from(c2))
            }));
        let mut response = respond(200, "text/event-stream", "");
        *response.body_mut() = Body::from_stream(parts);
        response
    })
    .await;
    let config = test_config(&provider.base_url(), "").replacen(
        "[server]\n",
        "[server]\nsse_keepalive = \"200ms\"\n",
        1,
    );
    let gw = TestGateway::start(Db::Sqlite, &config).await;
    let text = gw
        .post_json(GEN, r#"{"prompt":"p","stream":true}"#)
        .await
        .text()
        .await
        .expect("body");
    let (before, rest) = text.split_at(
        text.find("event: image_generation.completed")
            .expect("completed event"),
    );
    assert!(
        before.contains(": keep-alive\n\n"),
        "a comment during the pause between events:\n{text}"
    );
    assert!(
        !rest.contains(": keep-alive"),
        "never inside an event:\n{text}"
    );
    assert_eq!(
        text.replace(": keep-alive\n\n", ""),
        format!("{}{}", event("partial_image"), event("completed"))
    );
    let rows = gw.usage_rows(1).await;
    assert_eq!(
        (rows[0].output_tokens, rows[0].images),
        (765, 1),
        "comments do not disturb usage"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn shutdown_lets_requests_in_flight_finish_and_records_them() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    provider.set_delay(Duration::from_millis(600));
    let gw = TestGateway::start(Db::Postgres, &test_config(&provider.base_url(), "")).await;
    let store = Arc::clone(&gw.store);
    let addr = gw.addr;
    let client = gw.client.clone();
    let request = client
        .post(gw.url(GEN))
        .bearer_auth(&gw.key)
        .header("content-type", "application/json")
        .body(BODY)
        .send();
    let in_flight = async { request.await.expect("in flight") };
    let stop = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        gw.shutdown().await;
    };
    let (response, ()) = tokio::join!(in_flight, stop);
    assert_eq!(response.status(), 200);
    // The server stopped accepting; the request in flight finished and was recorded.
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
    let rows = all_rows(&*store).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].output_tokens, 765);
}
