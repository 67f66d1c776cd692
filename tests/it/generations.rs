//! Generations and the models list through a real imagegate: the captured SDK requests
//! replayed, what the stand-in provider received, what the client got, the usage rows.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::*;
use imagegate::usage::Outcome;

crate::on_both_databases!(
    replays_every_generation_capture,
    replays_every_stream_capture,
    replays_every_models_list_capture,
    refuses_bad_keys_before_anything_else,
    refuses_bad_input_without_forwarding,
    absurd_token_counts_are_capped_and_flagged,
);

/// The body the stand-in must have received for a captured body: model rewritten, the
/// route's policy applied, everything else as the SDK sent it, in its order.
pub fn expected_upstream_body(sent: &Value) -> Value {
    let mut body = sent.as_object().expect("object").clone();
    match sent["model"].as_str() {
        Some("gpt-image-1") | None => {
            body.insert("model".into(), "gpt-image-1".into());
            if body.get("quality").is_none_or(Value::is_null) {
                body.insert("quality".into(), "standard".into());
            }
        }
        Some("gpt-image-2") => {
            body.insert("model".into(), "upstream-gpt-image-2".into());
            body.insert("moderation".into(), "low".into());
            body.shift_remove("input_fidelity");
        }
        Some("gpt-image-2-all") => {
            body.shift_remove("quality");
            body.shift_remove("n");
        }
        Some(_) => {}
    }
    Value::Object(body)
}

async fn replays_every_generation_capture(db: Db) {
    // The gpt-image-2-all route's provider prefixes b64_json with a data URL header.
    let provider = StandIn::start(|got| {
        let body = image_response(1, USAGE);
        let body = if got.json()["model"] == "gpt-image-2-all" {
            body.replace(PNG_B64, &format!("data:image/png;base64,{PNG_B64}"))
        } else {
            body
        };
        respond(200, "application/json", body)
    })
    .await;
    let gw = TestGateway::start(db, &test_config(&provider.base_url(), "")).await;
    let names: Vec<String> = captures_named("generate")
        .into_iter()
        .filter(|n| !n.contains("stream"))
        .collect();
    assert!(names.len() >= 20, "captures found: {names:?}");
    for (i, name) in names.iter().enumerate() {
        let cap = capture(name);
        let sent: Value = serde_json::from_slice(&cap.body).expect("capture body is JSON");
        let response = gw.replay(&cap).await;
        assert_eq!(response.status(), 200, "{name}");
        let provider_name = if sent["model"] == "gpt-image-2-all" {
            "apiyi"
        } else {
            "piapi"
        };
        assert_eq!(
            response.headers()["x-imagegate-provider"],
            provider_name,
            "{name}"
        );
        assert!(response.headers().contains_key("x-request-id"), "{name}");
        let body = response.bytes().await.expect("body");
        let received = provider.requests();
        let got = received.last().expect("stand-in was called");
        assert_eq!(
            received.len(),
            i + 1,
            "{name}: one provider call per request"
        );
        assert_eq!(got.path, "/v1/images/generations", "{name}");
        // The provider sees its own key, never the client's.
        assert_eq!(
            got.headers["authorization"],
            format!("Bearer {PROVIDER_KEY}"),
            "{name}"
        );
        assert!(!String::from_utf8_lossy(&got.body).contains(&gw.key));
        for header in [
            "openai-organization",
            "openai-project",
            "x-stainless-retry-count",
        ] {
            assert!(
                !got.headers.contains_key(header),
                "{name}: {header} leaked upstream"
            );
        }
        let got_json = got.json();
        assert_eq!(got_json, expected_upstream_body(&sent), "{name}");
        let got_keys: Vec<_> = got_json
            .as_object()
            .expect("object")
            .keys()
            .cloned()
            .collect();
        let sent_keys: Vec<_> = sent.as_object().expect("object").keys().cloned().collect();
        assert!(
            got_keys.starts_with(&sent_keys) || sent["model"].as_str() == Some("gpt-image-2-all"),
            "{name}: key order kept: {got_keys:?} vs {sent_keys:?}"
        );
        // Byte for byte what the provider sent, less any data URL prefix.
        assert_eq!(body.as_ref(), image_response(1, USAGE).as_bytes(), "{name}");
    }
    let rows = gw.usage_rows(names.len()).await;
    for (row, name) in rows.iter().zip(&names) {
        let sent: Value = serde_json::from_slice(&capture(name).body).expect("json");
        assert_eq!(row.key_name, "svc-test");
        assert_eq!(row.endpoint, "generations");
        assert_eq!(row.status, 200);
        assert_eq!(row.outcome, Outcome::Completed);
        assert!(!row.streamed);
        assert_eq!(row.images, 1);
        let expected_provider = if sent["model"] == "gpt-image-2-all" {
            "apiyi"
        } else {
            "piapi"
        };
        assert_eq!(row.provider, expected_provider, "{name}");
        assert_eq!(
            (row.input_tokens, row.output_tokens, row.total_tokens),
            (1124, 765, 1889)
        );
        assert_eq!((row.text_input_tokens, row.image_input_tokens), (19, 1105));
        let expected_cost = match row.model.as_str() {
            "gpt-image-1" => gpt_image_1_cost(19, 1105, 765),
            "gpt-image-2" => 19 * 5000 + 1105 * 8000 + 765 * 30000,
            "dall-e-3" => 40_000_000,
            "gpt-image-2-all" => 30_000_000,
            other => panic!("unexpected model {other}"),
        };
        assert_eq!(row.cost_nanousd, Some(expected_cost), "{name}");
        let raw: Value =
            serde_json::from_str(row.raw_usage.as_deref().expect("raw usage")).expect("json");
        assert_eq!(raw, serde_json::from_str::<Value>(USAGE).expect("json"));
    }
    gw.shutdown().await;
}

fn sse_body(kind: &str, images: usize) -> String {
    let mut text = String::new();
    text.push_str(&format!(
        "event: {kind}.partial_image\ndata: {}\n\n",
        json!({"type": format!("{kind}.partial_image"), "b64_json": PNG_B64, "partial_image_index": 0})
    ));
    for i in 0..images {
        let usage = json!({"total_tokens": 100 + i, "input_tokens": 50, "output_tokens": 50 + i,
            "input_tokens_details": {"text_tokens": 10, "image_tokens": 40}});
        text.push_str(&format!(
            "event: {kind}.completed\ndata: {}\n\n",
            json!({"type": format!("{kind}.completed"), "b64_json": PNG_B64, "usage": usage})
        ));
    }
    text
}

async fn replays_every_stream_capture(db: Db) {
    let provider =
        StandIn::start(|_| respond(200, "text/event-stream", sse_body("image_generation", 2)))
            .await;
    let gw = TestGateway::start(db, &test_config(&provider.base_url(), "")).await;
    let names = captures_named("generate_stream");
    assert!(names.len() >= 6, "{names:?}");
    for name in &names {
        let cap = capture(name);
        let response = gw.replay(&cap).await;
        assert_eq!(response.status(), 200, "{name}");
        assert!(
            response.headers()["content-type"]
                .to_str()
                .expect("ct")
                .starts_with("text/event-stream"),
            "{name}"
        );
        assert_eq!(response.headers()["cache-control"], "no-cache");
        let body = response.text().await.expect("body");
        assert_eq!(
            body,
            sse_body("image_generation", 2),
            "{name}: events relayed as sent"
        );
        assert_eq!(
            provider.requests().last().expect("called").json()["stream"],
            true
        );
    }
    let rows = gw.usage_rows(names.len()).await;
    for row in rows {
        assert!(row.streamed);
        assert_eq!(row.images, 2);
        // Two completed events: 100 + 101 total, 50 + 51 output.
        assert_eq!(
            (row.input_tokens, row.output_tokens, row.total_tokens),
            (100, 101, 201)
        );
        assert_eq!((row.text_input_tokens, row.image_input_tokens), (20, 80));
        assert_eq!(row.cost_nanousd, Some(gpt_image_1_cost(20, 80, 101)));
    }
    gw.shutdown().await;
}

async fn replays_every_models_list_capture(db: Db) {
    let provider = StandIn::json(200, "{}").await;
    let gw = TestGateway::start(db, &test_config(&provider.base_url(), "")).await;
    let names = captures_named("models_list");
    assert!(names.len() >= 6);
    for name in &names {
        let response = gw.replay(&capture(name)).await;
        assert_eq!(response.status(), 200, "{name}");
        let list: Value = response.json().await.expect("json");
        assert_eq!(list["object"], "list");
        let ids: Vec<&str> = list["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|m| {
                assert_eq!(m["object"], "model");
                assert_eq!(m["owned_by"], "imagegate");
                assert!(m["created"].is_i64());
                m["id"].as_str().expect("id")
            })
            .collect();
        assert_eq!(
            ids,
            [
                "dall-e-2",
                "dall-e-3",
                "gpt-image-1",
                "gpt-image-1.5",
                "gpt-image-2",
                "gpt-image-2-all",
                "img-default"
            ]
        );
    }
    let one = gw
        .client
        .get(gw.url("/v1/models/img-default"))
        .bearer_auth(&gw.key)
        .send()
        .await
        .expect("send");
    assert_eq!(one.status(), 200);
    let missing = gw
        .client
        .get(gw.url("/v1/models/nope"))
        .bearer_auth(&gw.key)
        .send()
        .await
        .expect("send");
    assert_eq!(missing.status(), 404);
    assert!(
        provider.requests().is_empty(),
        "the models list never calls a provider"
    );
    gw.shutdown().await;
}

/// Asserts an OpenAI-shaped error with this status and returns its `error` object.
pub async fn expect_error(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status(), status);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .expect("ct")
            .starts_with("application/json")
    );
    let body: Value = response.json().await.expect("error body is JSON");
    let error = body["error"].clone();
    for field in ["message", "type", "param", "code"] {
        assert!(error.get(field).is_some(), "error lacks {field}: {body}");
    }
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    error
}

async fn refuses_bad_keys_before_anything_else(db: Db) {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = TestGateway::start(db, &test_config(&provider.base_url(), "")).await;
    let body = r#"{"model":"gpt-image-1","prompt":"fox"}"#;
    let url = gw.url("/v1/images/generations");
    let revoked = imagegate::auth::issue_key("revoked-svc");
    gw.store
        .create_key(revoked.new.clone())
        .await
        .expect("create");
    assert!(gw.store.revoke_key("revoked-svc").await.expect("revoke"));
    let unknown = imagegate::auth::issue_key("never-stored").key;
    let attempts: Vec<Option<String>> = vec![
        None,
        Some("Basic abc".into()),
        Some("Bearer ".into()),
        Some("Bearer sk-test-KEY".into()),
        Some(format!("Bearer {unknown}")),
        Some(format!("Bearer {}", revoked.key)),
    ];
    for auth in attempts {
        let mut request = gw
            .client
            .post(&url)
            .header("content-type", "application/json")
            .body(body);
        if let Some(auth) = &auth {
            request = request.header("authorization", auth);
        }
        let error = expect_error(request.send().await.expect("send"), 401).await;
        assert_eq!(error["code"], "invalid_api_key", "{auth:?}");
        let models = gw.client.get(gw.url("/v1/models"));
        let models = match &auth {
            Some(a) => models.header("authorization", a),
            None => models,
        };
        expect_error(models.send().await.expect("send"), 401).await;
    }
    // A key revoked while the gateway runs stops working within the cache TTL (1 s here).
    let response = gw.post_json("/v1/images/generations", body).await;
    assert_eq!(response.status(), 200);
    response.bytes().await.expect("body");
    assert!(gw.store.revoke_key("svc-test").await.expect("revoke"));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    expect_error(gw.post_json("/v1/images/generations", body).await, 401).await;
    assert_eq!(
        provider.requests().len(),
        1,
        "only the valid request reached the provider"
    );
    gw.usage_rows(1).await;
    gw.shutdown().await;
}

async fn refuses_bad_input_without_forwarding(db: Db) {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = TestGateway::start(db, &test_config(&provider.base_url(), "")).await;
    let path = "/v1/images/generations";
    let cases: Vec<(String, u16, Option<&str>, Option<&str>)> = vec![
        ("{not json".into(), 400, None, None),
        ("[1,2]".into(), 400, None, None),
        (
            r#"{"model":"gpt-image-1"}"#.into(),
            400,
            Some("prompt"),
            None,
        ),
        (r#"{"prompt":""}"#.into(), 400, Some("prompt"), None),
        (r#"{"prompt":42}"#.into(), 400, Some("prompt"), None),
        (r#"{"prompt":"p","n":0}"#.into(), 400, Some("n"), None),
        (r#"{"prompt":"p","n":11}"#.into(), 400, Some("n"), None),
        (r#"{"prompt":"p","n":"3"}"#.into(), 400, Some("n"), None),
        (
            r#"{"prompt":"p","stream":"yes"}"#.into(),
            400,
            Some("stream"),
            None,
        ),
        (
            r#"{"prompt":"p","model":"dall-e-9"}"#.into(),
            404,
            Some("model"),
            Some("model_not_found"),
        ),
        (
            format!(r#"{{"prompt":"{}"}}"#, "x".repeat(70_000)),
            413,
            None,
            Some("payload_too_large"),
        ),
    ];
    for (body, status, param, code) in &cases {
        let error = expect_error(gw.post_json(path, body).await, *status).await;
        assert_eq!(
            error["param"].as_str(),
            *param,
            "{}",
            &body[..body.len().min(60)]
        );
        if let Some(code) = code {
            assert_eq!(error["code"], *code);
        }
    }
    // A body over the limit without a Content-Length (chunked) is cut off too.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
        Ok(b"{\"prompt\":\"".to_vec()),
        Ok(vec![b'x'; 70_000]),
        Ok(b"\"}".to_vec()),
    ];
    let response = gw
        .client
        .post(gw.url(path))
        .bearer_auth(&gw.key)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .expect("send");
    expect_error(response, 413).await;
    let response = gw
        .client
        .post(gw.url(path))
        .bearer_auth(&gw.key)
        .header("content-type", "text/plain")
        .body(r#"{"prompt":"p"}"#)
        .send()
        .await
        .expect("send");
    expect_error(response, 415).await;
    expect_error(
        gw.client
            .get(gw.url("/v1/nothing"))
            .bearer_auth(&gw.key)
            .send()
            .await
            .expect("send"),
        404,
    )
    .await;
    assert!(provider.requests().is_empty(), "nothing was forwarded");
    // The server is still up and nothing was billed.
    let ok = gw.post_json(path, r#"{"prompt":"still up"}"#).await;
    assert_eq!(ok.status(), 200);
    ok.bytes().await.expect("body");
    let rows = gw.usage_rows(1).await;
    assert_eq!(
        rows[0].model, "gpt-image-1",
        "the default model serves requests without one"
    );
    gw.shutdown().await;
}

/// A provider reporting 2^63 - 1 tokens: the row holds the cap and is flagged, its cost is
/// the price of the capped counts, and the report's sums stay exact.
async fn absurd_token_counts_are_capped_and_flagged(db: Db) {
    const HUGE: i64 = i64::MAX;
    const CAP: i64 = 100_000_000;
    let absurd = format!(
        r#"{{"total_tokens":{HUGE},"input_tokens":{HUGE},"output_tokens":{HUGE},"input_tokens_details":{{"text_tokens":{HUGE},"image_tokens":0}}}}"#
    );
    let provider = StandIn::start(move |got| {
        let usage = if got.json()["prompt"] == "normal" {
            USAGE.to_owned()
        } else {
            absurd.clone()
        };
        respond(200, "application/json", image_response(1, &usage))
    })
    .await;
    let gw = TestGateway::start(db, &test_config(&provider.base_url(), "")).await;
    for prompt in ["absurd", "absurd", "normal"] {
        let response = gw
            .post_json(
                "/v1/images/generations",
                &json!({"model": "gpt-image-1", "prompt": prompt}).to_string(),
            )
            .await;
        assert_eq!(response.status(), 200);
        response.bytes().await.expect("body");
    }
    let rows = gw.usage_rows(3).await;
    let (absurd, normal): (Vec<_>, Vec<_>) = rows.iter().partition(|r| r.usage_suspect);
    assert_eq!((absurd.len(), normal.len()), (2, 1), "{rows:#?}");
    for row in &absurd {
        assert_eq!(
            (
                row.input_tokens,
                row.output_tokens,
                row.total_tokens,
                row.text_input_tokens
            ),
            (CAP, CAP, CAP, CAP)
        );
        assert_eq!(row.cost_nanousd, Some(gpt_image_1_cost(CAP, 0, CAP)));
        assert!(
            row.raw_usage
                .as_deref()
                .is_some_and(|raw| raw.contains(&HUGE.to_string()))
        );
    }
    assert_eq!(normal[0].input_tokens, 1124);
    let report = gw
        .store
        .usage_report(&imagegate::store::UsageFilter {
            key_name: None,
            since: None,
            group_by: imagegate::store::GroupBy::Model,
            ..Default::default()
        })
        .await
        .expect("report");
    assert_eq!(report[0].input_tokens, i128::from(2 * CAP + 1124));
    assert_eq!(
        report[0].cost_nanousd,
        i128::from(2 * gpt_image_1_cost(CAP, 0, CAP) + gpt_image_1_cost(19, 1105, 765))
    );
    gw.shutdown().await;
}
