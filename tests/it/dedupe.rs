//! Never pay twice: a client that leaves while the provider works still gets its call
//! completed and billed once, and its SDK's retry collects that result.

use std::time::Duration;

use crate::support::*;

const GEN: &str = "/v1/images/generations";
const BODY: &str = r#"{"model":"gpt-image-1","prompt":"a slow fox"}"#;

async fn post(
    gw: &TestGateway,
    body: &str,
    headers: &[(&str, &str)],
    timeout: Option<Duration>,
) -> reqwest::Result<reqwest::Response> {
    let mut request = gw
        .client
        .post(gw.url(GEN))
        .bearer_auth(&gw.key)
        .header("content-type", "application/json")
        .body(body.to_owned());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if let Some(timeout) = timeout {
        request = request.timeout(timeout);
    }
    request.send().await
}

/// The SDK's try number `count` (its `x-stainless-retry-count`) of a generation of `body`.
async fn sdk_try(
    gw: &TestGateway,
    body: &str,
    count: &str,
    timeout: Option<Duration>,
) -> reqwest::Result<reqwest::Response> {
    post(gw, body, &[("x-stainless-retry-count", count)], timeout).await
}

/// Checks `response` is not marked as a duplicate (it was a call of its own) and reads it.
async fn assert_new_call(response: reqwest::Response) {
    assert!(response.headers().get("x-imagegate-duplicate").is_none());
    response.bytes().await.expect("body");
}

#[tokio::test]
async fn a_retry_after_a_cut_connection_collects_the_original_instead_of_paying_again() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    provider.set_delay(Duration::from_millis(800));
    let gw = TestGateway::start(Db::Postgres, &test_config(&provider.base_url(), "")).await;

    // The SDK's own timeout cuts the first try while the provider still works on it.
    let first = sdk_try(&gw, BODY, "0", Some(Duration::from_millis(200))).await;
    assert!(
        first.is_err(),
        "the first try timed out on the client's side"
    );
    // Its retry attaches to the call in flight and gets its answer.
    let retry = sdk_try(&gw, BODY, "1", None).await.expect("retry");
    assert_eq!(retry.status(), 200);
    assert_eq!(retry.headers()["x-imagegate-duplicate"], "attached");
    assert_eq!(retry.headers()["x-imagegate-provider"], "piapi");
    assert_eq!(retry.text().await.expect("body"), image_response(1, USAGE));
    // A later retry gets the kept result.
    let again = sdk_try(&gw, BODY, "2", None).await.expect("retry");
    assert_eq!(again.headers()["x-imagegate-duplicate"], "replayed");
    assert_eq!(again.text().await.expect("body"), image_response(1, USAGE));

    assert_eq!(
        provider.requests().len(),
        1,
        "one provider call for three tries"
    );
    let rows = gw.usage_rows(1).await;
    assert_eq!(
        (rows[0].input_tokens, rows[0].output_tokens, rows[0].status),
        (1124, 765, 200)
    );

    // A new request (not a retry) with the same body is a new image: it calls again.
    provider.set_delay(Duration::ZERO);
    let fresh = sdk_try(&gw, BODY, "0", None).await.expect("fresh");
    assert_new_call(fresh).await;
    // A retry with another body is another request.
    let other = sdk_try(
        &gw,
        r#"{"model":"gpt-image-1","prompt":"another"}"#,
        "1",
        None,
    )
    .await
    .expect("other");
    assert_new_call(other).await;
    assert_eq!(provider.requests().len(), 3);
    gw.usage_rows(3).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn idempotency_keys_match_requests_and_errors_are_not_kept() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    provider.set_delay(Duration::from_millis(500));
    let gw = TestGateway::start(Db::Sqlite, &test_config(&provider.base_url(), "")).await;
    let key = [("idempotency-key", "order-42")];
    let first = post(&gw, BODY, &key, Some(Duration::from_millis(100))).await;
    assert!(first.is_err());
    let second = post(&gw, BODY, &key, None).await.expect("second");
    assert_eq!(second.headers()["x-imagegate-duplicate"], "attached");
    second.bytes().await.expect("body");
    let other_key = post(&gw, BODY, &[("idempotency-key", "order-43")], None)
        .await
        .expect("other");
    assert_new_call(other_key).await;
    assert_eq!(provider.requests().len(), 2);

    // A provider error is never kept: its retry calls again (and may succeed).
    provider.set_delay(Duration::ZERO);
    provider.set_handler(|_| respond(500, "text/plain", "oops"));
    let failed = sdk_try(&gw, r#"{"prompt":"x"}"#, "0", None)
        .await
        .expect("send");
    assert_eq!(failed.status(), 502);
    provider.set_handler(|_| respond(200, "application/json", image_response(1, USAGE)));
    let retried = sdk_try(&gw, r#"{"prompt":"x"}"#, "1", None)
        .await
        .expect("send");
    assert_eq!(retried.status(), 200);
    assert_new_call(retried).await;
    assert_eq!(provider.requests().len(), 4);
    gw.usage_rows(4).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn duplicate_protection_can_be_turned_off() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    provider.set_delay(Duration::from_millis(400));
    let config = test_config(&provider.base_url(), "").replacen(
        "[server]\n",
        "[server]\nduplicate_protection = false\n",
        1,
    );
    let gw = TestGateway::start(Db::Sqlite, &config).await;
    assert!(
        post(&gw, BODY, &[], Some(Duration::from_millis(100)))
            .await
            .is_err()
    );
    let retry = sdk_try(&gw, BODY, "1", None).await.expect("retry");
    assert_new_call(retry).await;
    assert_eq!(provider.requests().len(), 2);
    // Both calls were billed by the provider, so both are recorded.
    gw.usage_rows(2).await;
    gw.shutdown().await;
}

/// A gateway whose hang, if a retry ever waits for an original that has ended, would last a
/// minute: the retries below must be answered long before that.
async fn patient_gateway(provider: &StandIn) -> TestGateway {
    let config = test_config(&provider.base_url(), "").replacen(
        "upstream_total_timeout = \"5s\"",
        "upstream_total_timeout = \"60s\"",
        1,
    );
    TestGateway::start(Db::Sqlite, &config).await
}

/// Sends a retry and returns it with how long it took, failing instead of hanging.
async fn timed_retry(gw: &TestGateway, count: &str) -> (reqwest::Response, Duration) {
    let started = std::time::Instant::now();
    let response = sdk_try(gw, BODY, count, Some(Duration::from_secs(30)))
        .await
        .expect("the retry is answered");
    (response, started.elapsed())
}

#[tokio::test]
async fn a_retry_after_a_delivered_answer_is_a_new_call_at_once() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = patient_gateway(&provider).await;
    let first = sdk_try(&gw, BODY, "0", None).await.expect("first");
    assert_eq!(first.status(), 200);
    first
        .bytes()
        .await
        .expect("the whole answer reached its client");

    let (retry, took) = timed_retry(&gw, "1").await;
    assert_eq!(retry.status(), 200);
    assert!(
        retry.headers().get("x-imagegate-duplicate").is_none(),
        "the original's answer was delivered: nothing to attach to"
    );
    retry.bytes().await.expect("body");
    assert!(
        took < Duration::from_secs(10),
        "answered at once, took {took:?}"
    );
    assert_eq!(provider.requests().len(), 2, "the retry is a new call");
    gw.usage_rows(2).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn a_retry_after_a_provider_error_calls_again_at_once_and_succeeds() {
    for (status, expected) in [(500, 502), (429, 429)] {
        let provider = StandIn::json(200, &image_response(1, USAGE)).await;
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = std::sync::Arc::clone(&calls);
        // Fails the first call only, as a provider with a passing fault does.
        provider.set_handler(move |_| {
            if seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                respond(
                    status,
                    "application/json",
                    r#"{"error":{"message":"busy","type":"server_error","param":null,"code":null}}"#,
                )
            } else {
                respond(200, "application/json", image_response(1, USAGE))
            }
        });
        let gw = patient_gateway(&provider).await;
        let first = sdk_try(&gw, BODY, "0", None).await.expect("first");
        assert_eq!(first.status(), expected);
        first.bytes().await.expect("body");

        let (retry, took) = timed_retry(&gw, "1").await;
        assert_eq!(retry.status(), 200, "after a {status}");
        assert!(retry.headers().get("x-imagegate-duplicate").is_none());
        assert_eq!(retry.text().await.expect("body"), image_response(1, USAGE));
        assert!(
            took < Duration::from_secs(10),
            "after a {status}: answered at once, took {took:?}"
        );
        assert_eq!(provider.requests().len(), 2);
        let rows = gw.usage_rows(2).await;
        let mut statuses: Vec<i32> = rows.iter().map(|r| r.status).collect();
        statuses.sort_unstable();
        let mut want = vec![200, i32::from(expected)];
        want.sort_unstable();
        assert_eq!(statuses, want, "one row per provider call");
        gw.shutdown().await;
    }
}

#[tokio::test]
async fn a_retry_after_the_original_ended_unseen_replays_its_kept_result() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    provider.set_delay(Duration::from_millis(600));
    let gw = patient_gateway(&provider).await;
    let first = sdk_try(&gw, BODY, "0", Some(Duration::from_millis(150))).await;
    assert!(first.is_err(), "the client gave up before the answer");
    // The original runs to its end with nobody waiting for it; only then comes the retry.
    let rows = gw.usage_rows(1).await;
    assert_eq!(rows[0].status, 200);
    provider.set_delay(Duration::ZERO);

    let (retry, took) = timed_retry(&gw, "1").await;
    assert_eq!(retry.status(), 200);
    assert_eq!(retry.headers()["x-imagegate-duplicate"], "replayed");
    assert_eq!(retry.headers()["x-imagegate-provider"], "piapi");
    assert_eq!(retry.text().await.expect("body"), image_response(1, USAGE));
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(provider.requests().len(), 1, "the provider was called once");
    gw.usage_rows(1).await;
    gw.shutdown().await;
}

/// Kept results waiting for a retry in `gw`'s result store (a folder beside its config).
fn kept_files(gw: &TestGateway) -> usize {
    let folder = gw.config_path.with_file_name("results").join("kept");
    std::fs::read_dir(folder).map_or(0, |dir| dir.count())
}

#[tokio::test]
async fn an_unclaimed_kept_result_is_removed_by_the_timer_without_any_request() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    provider.set_delay(Duration::from_millis(600));
    let config = test_config(&provider.base_url(), "").replacen(
        "[server]\n",
        "[server]\nduplicate_window = \"1s\"\n",
        1,
    );
    let gw = TestGateway::start(Db::Sqlite, &config).await;
    let first = sdk_try(&gw, BODY, "0", Some(Duration::from_millis(150))).await;
    assert!(first.is_err(), "the client gave up before the answer");
    gw.usage_rows(1).await;
    assert_eq!(kept_files(&gw), 1, "kept for a retry");
    // No request comes; the window passes.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(kept_files(&gw), 0, "removed once its window passed");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_result_the_provider_breaks_off_after_the_client_left_leaves_no_file() {
    // A provider that answers 200 at once, then after a while sends part of its body and
    // closes the connection.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    #[expect(clippy::disallowed_methods, reason = "lives until the test ends")]
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut request = vec![0u8; 64 * 1024];
            let _ = socket.read(&mut request).await;
            let head =
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5000\r\n\r\n";
            let _ = socket.write_all(head.as_bytes()).await;
            tokio::time::sleep(Duration::from_millis(600)).await;
            let _ = socket.write_all(b"{\"created\":1,\"data\":[").await;
            drop(socket);
        }
    });
    let gw = TestGateway::start(Db::Sqlite, &test_config(&format!("http://{addr}/v1"), "")).await;
    let first = sdk_try(&gw, BODY, "0", Some(Duration::from_millis(200))).await;
    let cut = match first {
        Err(_) => true,
        Ok(response) => response.bytes().await.is_err(),
    };
    assert!(cut, "the client gave up before the answer ended");
    let rows = gw.usage_rows(1).await;
    assert_eq!(
        rows[0].outcome,
        imagegate::usage::Outcome::Failed,
        "{rows:#?}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(kept_files(&gw), 0, "the broken-off result left no file");
    gw.shutdown().await;
}
