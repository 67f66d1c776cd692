//! Limits per key: a key's requests in flight are capped, counted until their answer's body
//! has ended; one more gets 429 before anything is forwarded or billed.

use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::support::*;

fn prompt(p: &str) -> String {
    format!(r#"{{"model":"gpt-image-1","prompt":"{p}"}}"#)
}

async fn generate_with(gw: &TestGateway, key: &str, p: &str) -> reqwest::Response {
    gw.post_json_as(key, "/v1/images/generations", &prompt(p))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_requests_in_flight_gets_429_until_one_has_finished() {
    let gate = CancellationToken::new();
    let opened = gate.clone();
    // Prompts starting with "hold" get their status and half their body at once, the rest
    // when the gate opens: the answer is still streaming after the handler has returned.
    let provider = StandIn::start(move |received| {
        let body = image_response(1, USAGE);
        let held = received.json()["prompt"]
            .as_str()
            .is_some_and(|p| p.starts_with("hold"));
        if !held {
            return respond(200, "application/json", body);
        }
        let (first, rest) = body.split_at(body.len() / 2);
        let (first, rest) = (Bytes::from(first.to_owned()), Bytes::from(rest.to_owned()));
        let gate = opened.clone();
        let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(first) })
            .chain(futures_util::stream::once(async move {
                gate.cancelled().await;
                Ok(rest)
            }));
        let mut response = respond(200, "application/json", "");
        *response.body_mut() = Body::from_stream(stream);
        response
    })
    .await;
    let config = test_config(
        &provider.base_url(),
        "[limits]\nmax_in_flight_per_key = 2\n",
    );
    let gw = TestGateway::start(Db::Postgres, &config).await;
    let other = imagegate::auth::issue_key("other-svc");
    gw.store
        .create_key(other.new.clone())
        .await
        .expect("create key");

    let first = generate_with(&gw, &gw.key, "hold-1").await;
    let second = generate_with(&gw, &gw.key, "hold-2").await;
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );

    let refused = generate_with(&gw, &gw.key, "hold-3").await;
    assert_eq!(refused.status(), 429);
    let headers = refused.headers().clone();
    assert_eq!(headers["retry-after"], "1");
    assert!(
        headers.get("x-should-retry").is_none(),
        "the SDK may retry a 429"
    );
    let refused_id = headers["x-request-id"].to_str().expect("ascii").to_owned();
    let body: serde_json::Value = refused.json().await.expect("JSON error");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    assert_eq!(body["error"]["type"], "requests", "{body}");
    assert!(body["error"]["param"].is_null(), "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains('2'))
    );

    // Another key is not held back by this one.
    let others = generate_with(&gw, &other.key, "quick").await;
    assert_eq!(others.status(), 200);
    others.bytes().await.expect("body");

    gate.cancel();
    for response in [first, second] {
        let body: serde_json::Value = response.json().await.expect("whole JSON answer");
        assert!(body["data"][0]["b64_json"].is_string(), "{body}");
    }
    // The slots are given back as the bodies end (the server may finish a moment after the
    // client has read the last byte).
    let mut status = 0;
    for _ in 0..20 {
        let response = generate_with(&gw, &gw.key, "quick").await;
        status = response.status().as_u16();
        response.bytes().await.expect("body");
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        status, 200,
        "the key is served again once its answers ended"
    );

    let prompts: Vec<String> = provider
        .complete_requests()
        .iter()
        .map(|r| r.json()["prompt"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        !prompts.iter().any(|p| p == "hold-3"),
        "the refused request was not forwarded: {prompts:?}"
    );
    assert_eq!(prompts.len(), 4, "{prompts:?}");
    let rows = gw.usage_rows(4).await;
    assert!(
        rows.iter().all(|r| !r.request_id.starts_with(&refused_id)),
        "the refused request left no usage row"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_client_left_gives_its_slot_back() {
    let gate = CancellationToken::new();
    let opened = gate.clone();
    // Whitespace (valid before JSON) every 20 ms until the gate opens, then the answer: the
    // body streams, so a client that has left is noticed at the next write.
    let provider = StandIn::start(move |_| {
        let gate = opened.clone();
        let body = Bytes::from(image_response(1, USAGE));
        let spaces = futures_util::stream::unfold(gate, |gate| async move {
            if gate.is_cancelled() {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            Some((Ok::<_, std::io::Error>(Bytes::from_static(b" ")), gate))
        });
        let stream = spaces.chain(futures_util::stream::once(async move { Ok(body) }));
        let mut response = respond(200, "application/json", "");
        *response.body_mut() = Body::from_stream(stream);
        response
    })
    .await;
    let config = test_config(
        &provider.base_url(),
        "[limits]\nmax_in_flight_per_key = 1\n",
    );
    let gw = TestGateway::start(Db::Sqlite, &config).await;

    let first = generate_with(&gw, &gw.key, "one").await;
    assert_eq!(first.status(), 200);
    assert_eq!(generate_with(&gw, &gw.key, "two").await.status(), 429);
    drop(first);

    let mut status = 0;
    for _ in 0..40 {
        let response = generate_with(&gw, &gw.key, "three").await;
        status = response.status().as_u16();
        if status == 200 {
            gate.cancel();
            response.bytes().await.expect("body");
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    gate.cancel();
    assert_eq!(
        status, 200,
        "the slot of the request whose client left was given back"
    );
    gw.shutdown().await;
}
