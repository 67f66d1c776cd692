//! Edits sent as JSON (images by `image_url` or `file_id`) through a real imagegate: both
//! SDKs' captured requests replayed, routed like generations, the references untouched on
//! the way, and bad references refused before any provider call.

use std::time::Duration;

use serde_json::{Value, json};

use crate::generations::{expect_error, expected_upstream_body};
use crate::support::*;
use imagegate::usage::Outcome;

const EDITS: &str = "/v1/images/edits";

crate::on_both_databases!(
    replays_every_json_edit_capture,
    refuses_bad_json_edits_without_forwarding,
);

fn edit_events(partials: usize) -> String {
    let mut text = String::new();
    for i in 0..partials {
        text.push_str(&format!(
            "event: image_edit.partial_image\ndata: {{\"type\":\"image_edit.partial_image\",\"b64_json\":\"{PNG_B64}\",\"partial_image_index\":{i}}}\n\n"
        ));
    }
    text.push_str(&format!(
        "event: image_edit.completed\ndata: {{\"type\":\"image_edit.completed\",\"b64_json\":\"{PNG_B64}\",\"usage\":{USAGE}}}\n\n"
    ));
    text
}

async fn replays_every_json_edit_capture(db: Db) {
    let provider = StandIn::start(|got| {
        let body = got.json();
        if body["stream"] == true {
            let partials = body["partial_images"].as_u64().unwrap_or(0) as usize;
            respond(200, "text/event-stream", edit_events(partials))
        } else {
            respond(200, "application/json", image_response(1, USAGE))
        }
    })
    .await;
    let gw = TestGateway::start(db, &test_config(&provider.base_url(), "")).await;
    let names = captures_named("_jsonedit_");
    let sdks = ["python_", "node_"];
    assert!(
        sdks.iter()
            .all(|sdk| names.iter().filter(|n| n.starts_with(sdk)).count() >= 3),
        "both SDKs' JSON edits: {names:?}"
    );
    for (i, name) in names.iter().enumerate() {
        let cap = capture(name);
        let sent: Value = serde_json::from_slice(&cap.body).expect("capture body is JSON");
        let response = gw.replay(&cap).await;
        assert_eq!(response.status(), 200, "{name}");
        let provider_name = if sent["model"] == "gpt-image-1.5" {
            "apiyi"
        } else {
            "piapi"
        };
        assert_eq!(response.headers()["x-imagegate-provider"], provider_name);
        let body = response.text().await.expect("body");
        let streamed = sent["stream"] == true;
        if streamed {
            assert_eq!(body, edit_events(2), "{name}");
        } else {
            assert_eq!(body, image_response(1, USAGE), "{name}");
        }
        let received = provider.requests();
        assert_eq!(received.len(), i + 1, "{name}: one provider call each");
        let got = received.last().expect("called");
        assert_eq!(got.path, "/v1/images/edits", "{name}");
        assert_eq!(got.headers["content-type"], "application/json", "{name}");
        assert_eq!(
            got.headers["authorization"],
            format!("Bearer {PROVIDER_KEY}")
        );
        // The references arrive as the SDK sent them, byte for byte; the rest of the body
        // is the SDK's too, with only the route's rewrite (model, policy) applied.
        for field in ["images", "mask"] {
            assert_eq!(got.json()[field], sent[field], "{name}: {field}");
        }
        let expected = serde_json::to_vec(&expected_upstream_body(&sent)).expect("json");
        assert_eq!(
            String::from_utf8_lossy(&got.body),
            String::from_utf8_lossy(&expected),
            "{name}"
        );
        if sent["quality"].is_string() {
            assert_eq!(
                got.body, cap.body,
                "{name}: untouched when no policy applies"
            );
        }
    }
    let rows = gw.usage_rows(names.len()).await;
    for (row, name) in rows.iter().zip(&names) {
        let sent: Value = serde_json::from_slice(&capture(name).body).expect("json");
        assert_eq!(row.key_name, "svc-test", "{name}");
        assert_eq!(row.endpoint, "edits", "{name}");
        assert_eq!(
            (row.status, row.outcome),
            (200, Outcome::Completed),
            "{name}"
        );
        assert_eq!(row.streamed, sent["stream"] == true, "{name}");
        assert_eq!(
            (row.input_tokens, row.output_tokens, row.images),
            (1124, 765, 1),
            "{name}"
        );
        let expected = match row.model.as_str() {
            "gpt-image-1" => gpt_image_1_cost(19, 1105, 765),
            "gpt-image-1.5" => (19 + 1105) * 5000 + 765 * 10000,
            other => panic!("{other}"),
        };
        assert_eq!(row.cost_nanousd, Some(expected), "{name}");
    }
    gw.shutdown().await;
}

async fn refuses_bad_json_edits_without_forwarding(db: Db) {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = TestGateway::start(db, &test_config(&provider.base_url(), "")).await;
    let url = |u: &str| json!({ "image_url": u });
    let file = json!({ "file_id": "file-abc" });
    let cases = [
        (json!({"prompt": "p"}), "images"),
        (json!({"prompt": "p", "images": []}), "images"),
        (
            json!({"prompt": "p", "images": vec![file.clone(); 17]}),
            "images",
        ),
        (
            json!({"prompt": "p", "images": [file, file, url("not a url")]}),
            "images[2].image_url",
        ),
        (
            json!({"prompt": "p", "images": [url("ftp://example.com/a.png")]}),
            "images[0].image_url",
        ),
        (json!({"prompt": "p", "images": [{}]}), "images[0]"),
        (
            json!({"prompt": "p", "images": [{"file_id": "f", "image_url": "https://h/a.png"}]}),
            "images[0]",
        ),
        (
            json!({"prompt": "p", "images": [file], "mask": {"image_url": "/tmp/mask.png"}}),
            "mask.image_url",
        ),
        (json!({"images": [file]}), "prompt"),
        (json!({"prompt": "p", "images": [file], "n": 0}), "n"),
    ];
    for (body, param) in cases {
        let response = gw.post_json(EDITS, &body.to_string()).await;
        let error = expect_error(response, 400).await;
        assert_eq!(error["param"], param, "{body}");
        assert_eq!(error["type"], "invalid_request_error");
    }
    // Declared as neither JSON nor multipart: 415 naming both.
    let response = gw
        .client
        .post(gw.url(EDITS))
        .bearer_auth(&gw.key)
        .header("content-type", "text/plain")
        .body(r#"{"prompt":"p","images":[{"file_id":"f"}]}"#)
        .send()
        .await
        .expect("send");
    let error = expect_error(response, 415).await;
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("application/json")),
        "{error}"
    );
    // An unknown model: 404 before any call.
    let body = json!({"model": "no-such-model", "prompt": "p", "images": [{"file_id": "f"}]});
    expect_error(gw.post_json(EDITS, &body.to_string()).await, 404).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(provider.requests().is_empty(), "nothing was forwarded");
    assert!(all_rows(&*gw.store).await.is_empty(), "nothing was billed");
    gw.shutdown().await;
}

/// A JSON edit goes through an alias, fails over like a generation (the same JSON to each
/// route, each route's own rewrite), and is limited by its own body size.
#[tokio::test]
async fn json_edits_use_aliases_failover_and_their_own_size_limit() {
    let first = StandIn::json(
        500,
        r#"{"error":{"message":"busy","type":"server_error","param":null,"code":null}}"#,
    )
    .await;
    let second = StandIn::json(200, &image_response(1, USAGE)).await;
    let extra = format!(
        r#"
[providers.first]
base_url = "{}"
api_key_env = "TEST_PIAPI_KEY"
[models.duo]
aliases = ["duo-latest"]
routes = [{{ provider = "first", model = "m1" }}, {{ provider = "piapi", model = "m2", defaults = {{ quality = "low" }} }}]
[pricing.first.m1]
per_image = 0.05
[pricing.piapi.m2]
per_image = 0.03
"#,
        first.base_url()
    );
    let config = test_config(&second.base_url(), &extra).replacen(
        "[server]\n",
        "[server]\nmax_json_edit_body_bytes = 2048\n",
        1,
    );
    let gw = TestGateway::start(Db::Sqlite, &config).await;
    let body = r#"{"model":"duo-latest","prompt":"fox","images":[{"image_url":"https://example.com/a.png"},{"file_id":"file-1"}],"mask":{"file_id":"file-m"}}"#;
    let response = gw.post_json(EDITS, body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-imagegate-provider"], "piapi");
    assert_eq!(response.headers()["x-imagegate-attempts"], "2");
    assert_eq!(
        response.text().await.expect("body"),
        image_response(1, USAGE)
    );
    let tried = first.requests();
    assert_eq!(tried.len(), 1);
    assert_eq!(tried[0].path, "/v1/images/edits");
    assert_eq!(
        String::from_utf8_lossy(&tried[0].body),
        body.replace("duo-latest", "m1")
    );
    let served = second.requests();
    assert_eq!(
        String::from_utf8_lossy(&served[0].body),
        body.replace("duo-latest", "m2")
            .replace(r#""file-m"}}"#, r#""file-m"},"quality":"low"}"#),
        "the second route's own rewrite"
    );
    let rows = gw.usage_rows(2).await;
    assert_eq!(
        rows.iter()
            .map(|r| (r.endpoint.as_str(), r.provider.as_str(), r.status))
            .collect::<Vec<_>>(),
        [("edits", "first", 502), ("edits", "piapi", 200)]
    );
    assert_eq!(rows[1].model, "duo");
    assert_eq!(rows[1].cost_nanousd, Some(30_000_000));

    // A data: URL larger than the JSON edit limit: 413, nothing sent.
    let big = format!(
        r#"{{"model":"duo","prompt":"fox","images":[{{"image_url":"data:image/png;base64,{}"}}]}}"#,
        "A".repeat(4096)
    );
    expect_error(gw.post_json(EDITS, &big).await, 413).await;
    assert_eq!(second.requests().len(), 1);
    gw.shutdown().await;
}

/// A retry of a JSON edit (the SDK's retry count) attaches to the original call instead of
/// paying again, as a generation's does.
#[tokio::test]
async fn a_retried_json_edit_collects_the_original() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    provider.set_delay(Duration::from_millis(800));
    let gw = TestGateway::start(Db::Sqlite, &test_config(&provider.base_url(), "")).await;
    let body = r#"{"model":"gpt-image-1","prompt":"a slow fox","images":[{"file_id":"file-1"}]}"#;
    let send = |count: &'static str, timeout: Option<Duration>| {
        let mut request = gw
            .client
            .post(gw.url(EDITS))
            .bearer_auth(&gw.key)
            .header("content-type", "application/json")
            .header("x-stainless-retry-count", count)
            .body(body);
        if let Some(timeout) = timeout {
            request = request.timeout(timeout);
        }
        request.send()
    };
    assert!(
        send("0", Some(Duration::from_millis(200))).await.is_err(),
        "the first try timed out on the client's side"
    );
    let retry = send("1", None).await.expect("retry");
    assert_eq!(retry.status(), 200);
    assert_eq!(retry.headers()["x-imagegate-duplicate"], "attached");
    assert_eq!(retry.text().await.expect("body"), image_response(1, USAGE));
    assert_eq!(
        provider.requests().len(),
        1,
        "one provider call for two tries"
    );
    let rows = gw.usage_rows(1).await;
    assert_eq!((rows[0].endpoint.as_str(), rows[0].status), ("edits", 200));
    gw.shutdown().await;
}

/// `Prefer: respond-async` makes a JSON edit a job, as it does a generation: 202 at once,
/// then the result the synchronous edit would have had, billed as an edit.
#[tokio::test]
async fn a_json_edit_can_be_an_async_job() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = TestGateway::start(Db::Sqlite, &test_config(&provider.base_url(), "")).await;
    let body = r#"{"model":"gpt-image-1","prompt":"a fox","images":[{"image_url":"https://example.com/a.png"}]}"#;
    let response = gw
        .client
        .post(gw.url(EDITS))
        .bearer_auth(&gw.key)
        .header("content-type", "application/json")
        .header("prefer", "respond-async")
        .body(body)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 202);
    let job: Value = response.json().await.expect("json");
    let id = job["id"].as_str().expect("id").to_owned();
    let mut job = job;
    for _ in 0..200 {
        job = gw
            .client
            .get(gw.url(&format!("/v1/images/jobs/{id}")))
            .bearer_auth(&gw.key)
            .send()
            .await
            .expect("poll")
            .json()
            .await
            .expect("json");
        if job["status"] == "succeeded" || job["status"] == "failed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(job["status"], "succeeded", "{job}");
    let expected: Value = serde_json::from_str(&image_response(1, USAGE)).expect("json");
    assert_eq!(job["result"], expected);
    let sent = provider.requests();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].path, "/v1/images/edits");
    assert_eq!(
        sent[0].json()["images"],
        json!([{"image_url": "https://example.com/a.png"}])
    );
    let rows = gw.usage_rows(1).await;
    assert_eq!((rows[0].endpoint.as_str(), rows[0].status), ("edits", 200));
    gw.shutdown().await;
}

/// A route declared without edits serves no JSON edit either: the edit skips it for the
/// next route, and a model with no route for edits is refused before any call.
#[tokio::test]
async fn json_edits_skip_routes_that_do_not_serve_edits() {
    let legacy = StandIn::json(200, &image_response(1, USAGE)).await;
    let other = StandIn::json(200, &image_response(1, USAGE)).await;
    let extra = format!(
        r#"
[providers.legacy]
base_url = "{}"
api_key_env = "TEST_PIAPI_KEY"
[models.mixed]
routes = [
  {{ provider = "legacy", model = "m", endpoints = ["generations"] }},
  {{ provider = "piapi", model = "m" }},
]
[models.genonly]
routes = [{{ provider = "legacy", model = "m", endpoints = ["generations"] }}]
[pricing.legacy.m]
per_image = 0.01
[pricing.piapi.m]
per_image = 0.02
"#,
        legacy.base_url()
    );
    let gw = TestGateway::start(Db::Sqlite, &test_config(&other.base_url(), &extra)).await;
    let edit = |model: &str| {
        json!({"model": model, "prompt": "p", "images": [{"file_id": "file-1"}]}).to_string()
    };
    let response = gw.post_json(EDITS, &edit("mixed")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-imagegate-provider"], "piapi");
    response.bytes().await.expect("body");
    let error = expect_error(gw.post_json(EDITS, &edit("genonly")).await, 400).await;
    assert_eq!(
        (error["code"].as_str(), error["param"].as_str()),
        (Some("unsupported_endpoint"), Some("model"))
    );
    assert!(
        legacy.requests().is_empty(),
        "the generations-only route is never called"
    );
    assert_eq!(other.requests().len(), 1);
    gw.shutdown().await;
}

/// JSON bodies held in memory at once stay within `server.json_memory_max_bytes`: a JSON
/// edit that would pass it while others run gets 503 `server_busy` (retry-after 1) before
/// its body is read, and is taken again once they have ended.
#[tokio::test]
async fn json_bodies_in_memory_stay_within_their_budget() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    provider.set_delay(Duration::from_millis(1500));
    // One key may take the whole budget here: a key's share is another test's.
    let config = test_config(&provider.base_url(), "[limits]\nmax_share_per_key = 1\n").replacen(
        "[server]\n",
        "[server]\nmax_json_edit_body_bytes = 200000\njson_memory_max_bytes = 300000\n",
        1,
    );
    let gw = TestGateway::start(Db::Sqlite, &config).await;
    let edit = |tag: &str| {
        json!({
            "model": "gpt-image-1",
            "prompt": tag,
            "images": [{"image_url": format!("data:image/png;base64,{}", "A".repeat(150_000))}],
        })
        .to_string()
    };
    let first_body = edit("first");
    let first = gw.post_json(EDITS, &first_body);
    let second = async {
        // Sent while the first call (150 kB held) waits for the slow provider.
        assert!(
            provider.wait_for_requests(1).await,
            "the first edit reached the provider"
        );
        gw.post_json(EDITS, &edit("second")).await
    };
    let (first, second) = tokio::join!(first, second);
    assert_eq!(first.status(), 200);
    assert_eq!(second.headers()["retry-after"], "1");
    let error = expect_error(second, 503).await;
    assert_eq!(error["code"], "server_busy", "{error}");
    assert_eq!(provider.requests().len(), 1, "the second was not sent");

    // The first has ended and given its share back.
    let third = gw.post_json(EDITS, &edit("third")).await;
    assert_eq!(third.status(), 200);
    assert_eq!(provider.requests().len(), 2);
    gw.shutdown().await;
}
