//! Async jobs (`Prefer: respond-async`, imagegate's own extension): created, polled and
//! collected through stand-in providers and the real binary; the collected body is the one
//! the synchronous call returns; keys, limits, retention, restarts and billing.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use imagegate::usage::{Outcome, UsageRow};
use serde_json::Value;

use crate::on_both_databases;
use crate::support::binary::{self, signal};
use crate::support::forms::Form;
use crate::support::*;

const GENERATION: &str = r#"{"model":"gpt-image-1","prompt":"a red fox","size":"1024x1024"}"#;

/// POSTs a generation with `Prefer: respond-async` and these extra headers.
async fn post_job(gw: &TestGateway, body: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = gw
        .client
        .post(gw.url("/v1/images/generations"))
        .bearer_auth(&gw.key)
        .header("content-type", "application/json")
        .header("prefer", "respond-async")
        .body(body.to_owned());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.expect("reaches imagegate")
}

/// The 202's job, checked for its shape; its id and the request id of the creating call.
pub async fn accepted(response: reqwest::Response) -> (String, String) {
    assert_eq!(response.status(), 202);
    assert_eq!(response.headers()["preference-applied"], "respond-async");
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .expect("id")
        .to_owned();
    let location = response.headers()["location"]
        .to_str()
        .expect("location")
        .to_owned();
    let job: Value = response.json().await.expect("json");
    let id = job["id"].as_str().expect("id").to_owned();
    assert!(id.starts_with("imgjob_"), "{job}");
    assert_eq!(location, format!("/v1/images/jobs/{id}"));
    assert_eq!(job["object"], "image.job");
    assert!(job["created_at"].as_i64().expect("created_at") > 1_700_000_000);
    (id, request_id)
}

/// GET /v1/images/jobs/{id} with `key`: status and body text.
async fn get_job(client: &reqwest::Client, base: &str, key: &str, id: &str) -> (u16, String) {
    let response = client
        .get(format!("{base}/v1/images/jobs/{id}"))
        .bearer_auth(key)
        .send()
        .await
        .expect("reaches imagegate");
    let status = response.status().as_u16();
    (status, response.text().await.expect("text"))
}

/// Polls the job until it has finished; its JSON and raw text.
pub async fn wait_finished(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    id: &str,
) -> (Value, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, text) = get_job(client, base, key, id).await;
        assert_eq!(status, 200, "{text}");
        let job: Value = serde_json::from_str(&text).expect("job json");
        match job["status"].as_str() {
            Some("succeeded" | "failed") => return (job, text),
            Some("queued" | "in_progress") => {}
            other => panic!("unexpected status {other:?}: {job}"),
        }
        assert!(Instant::now() < deadline, "the job finishes: {job}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn base(gw: &TestGateway) -> String {
    gw.url("")
}

async fn a_generation_job_is_created_polled_and_collected(db: Db) {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = TestGateway::start(db, &test_config(&provider.base_url(), "")).await;
    let sync = gw.post_json("/v1/images/generations", GENERATION).await;
    assert_eq!(sync.status(), 200);
    let sync_body = sync.text().await.expect("body");

    let (id, request_id) = accepted(post_job(&gw, GENERATION, &[]).await).await;
    let (job, text) = wait_finished(&gw.client, &base(&gw), &gw.key, &id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["id"], id.as_str());
    assert!(job["completed_at"].as_i64().is_some(), "{job}");
    // Exactly the bytes the synchronous call answered, inside the job.
    assert!(
        text.contains(&format!("\"result\":{sync_body}}}")),
        "{text}"
    );
    let sync_json: Value = serde_json::from_str(&sync_body).expect("json");
    assert_eq!(job["result"], sync_json);

    // The same provider request as the synchronous call's, billed once like it.
    let sent = provider.complete_requests();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].json(), sent[1].json());
    let rows = gw.usage_rows(2).await;
    let row = rows
        .iter()
        .find(|r| r.request_id == request_id)
        .expect("the job's row carries the creating request's id");
    assert_eq!(row.outcome, Outcome::Completed);
    assert_eq!(row.cost_nanousd, rows[0].cost_nanousd);
    assert_eq!(row.cost_nanousd, Some(gpt_image_1_cost(19, 1105, 765)));
    gw.shutdown().await;
}

async fn a_multipart_edit_job_is_received_whole_then_collected(db: Db) {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = TestGateway::start(db, &test_config(&provider.base_url(), "")).await;
    let form = Form::edit("gpt-image-1", "add a hat").text("size", "1024x1024");
    let post = |prefer: bool| {
        let mut request = gw
            .client
            .post(gw.url("/v1/images/edits"))
            .bearer_auth(&gw.key)
            .header("content-type", form.content_type())
            .body(form.body());
        if prefer {
            request = request.header("prefer", "respond-async");
        }
        request.send()
    };
    let sync = post(false).await.expect("sync");
    assert_eq!(sync.status(), 200);
    let sync_body = sync.text().await.expect("body");
    let (id, _) = accepted(post(true).await.expect("job")).await;
    let (job, text) = wait_finished(&gw.client, &base(&gw), &gw.key, &id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(
        text.contains(&format!("\"result\":{sync_body}}}")),
        "{text}"
    );
    let sent = provider.complete_requests();
    assert_eq!(sent.len(), 2);
    assert!(sent.iter().all(|r| r.path == "/v1/images/edits"));
    // The same parts reached the provider (each request has a boundary of its own).
    let boundary = |r: &crate::support::standin::Received| {
        let ct = r.headers["content-type"].to_str().expect("ct").to_owned();
        ct.split("boundary=").nth(1).expect("boundary").to_owned()
    };
    let unbound = |r: &crate::support::standin::Received| {
        String::from_utf8_lossy(&r.body).replace(&boundary(r), "B")
    };
    assert_eq!(unbound(&sent[0]), unbound(&sent[1]));
    assert!(unbound(&sent[1]).contains("add a hat"));
    gw.usage_rows(2).await;
    assert_eq!(
        gw.spool_files(),
        0,
        "the job's upload spool is removed once it ran"
    );
    gw.shutdown().await;
}

on_both_databases!(
    a_generation_job_is_created_polled_and_collected,
    a_multipart_edit_job_is_received_whole_then_collected,
);

#[tokio::test]
async fn another_keys_job_and_an_unknown_id_get_the_same_404() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = TestGateway::start(Db::Sqlite, &test_config(&provider.base_url(), "")).await;
    let other = imagegate::auth::issue_key("svc-other");
    gw.store
        .create_key(other.new.clone())
        .await
        .expect("second key");
    let (id, _) = accepted(post_job(&gw, GENERATION, &[]).await).await;
    wait_finished(&gw.client, &base(&gw), &gw.key, &id).await;

    let (status, theirs) = get_job(&gw.client, &base(&gw), &other.key, &id).await;
    assert_eq!(status, 404, "{theirs}");
    let unknown = format!("imgjob_{}", "0".repeat(32));
    let (status, missing) = get_job(&gw.client, &base(&gw), &gw.key, &unknown).await;
    assert_eq!(status, 404, "{missing}");
    assert_eq!(theirs.replace(&id, "ID"), missing.replace(&unknown, "ID"));
    let error: Value = serde_json::from_str(&missing).expect("json");
    assert_eq!(error["error"]["type"], "invalid_request_error");
    assert_eq!(error["error"]["code"], "job_not_found");
    assert!(!theirs.contains("b64_json"), "{theirs}");
    // The owner still reads it.
    let (status, _) = get_job(&gw.client, &base(&gw), &gw.key, &id).await;
    assert_eq!(status, 200);
    gw.shutdown().await;
}

#[tokio::test]
async fn over_max_queued_per_key_a_job_gets_429_and_is_not_sent() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    provider.set_delay(Duration::from_millis(800));
    let config = test_config(&provider.base_url(), "[jobs]\nmax_queued_per_key = 2\n");
    let gw = TestGateway::start(Db::Sqlite, &config).await;
    let prompt = |n: usize| GENERATION.replace("a red fox", &format!("fox {n}"));
    let first = accepted(post_job(&gw, &prompt(1), &[]).await).await.0;
    accepted(post_job(&gw, &prompt(2), &[]).await).await;
    let refused = post_job(&gw, &prompt(3), &[]).await;
    assert_eq!(refused.status(), 429);
    let error: Value = refused.json().await.expect("json");
    assert_eq!(error["error"]["code"], "job_queue_full", "{error}");
    assert_eq!(error["error"]["type"], "requests");
    assert!(
        error["error"]["message"]
            .as_str()
            .expect("message")
            .contains('2')
    );
    // Another key has its own queue.
    let other = imagegate::auth::issue_key("svc-other");
    gw.store.create_key(other.new.clone()).await.expect("key");
    let theirs = gw
        .client
        .post(gw.url("/v1/images/generations"))
        .bearer_auth(&other.key)
        .header("content-type", "application/json")
        .header("prefer", "respond-async")
        .body(prompt(4))
        .send()
        .await
        .expect("send");
    assert_eq!(theirs.status(), 202);

    wait_finished(&gw.client, &base(&gw), &gw.key, &first).await;
    accepted(post_job(&gw, &prompt(5), &[]).await).await;
    gw.usage_rows(4).await;
    assert_eq!(provider.requests().len(), 4);
    assert!(
        provider
            .requests()
            .iter()
            .all(|r| r.json()["prompt"] != "fox 3"),
        "the refused job was never sent"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_retried_job_request_gets_the_first_job_and_is_billed_once() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    provider.set_delay(Duration::from_millis(300));
    let gw = TestGateway::start(Db::Sqlite, &test_config(&provider.base_url(), "")).await;
    let (id, _) = accepted(post_job(&gw, GENERATION, &[]).await).await;
    // The Python SDK's retry of the same request (its first answer lost on the way).
    let retried = post_job(&gw, GENERATION, &[("x-stainless-retry-count", "1")]).await;
    let (again, _) = accepted(retried).await;
    assert_eq!(again, id, "a retry gets the job its first try created");
    let (job, _) = wait_finished(&gw.client, &base(&gw), &gw.key, &id).await;
    assert_eq!(job["status"], "succeeded");
    // And once it finished, still the same job, answered with its state.
    let late = post_job(&gw, GENERATION, &[("x-stainless-retry-count", "2")]).await;
    assert_eq!(late.status(), 202);
    let late: Value = late.json().await.expect("json");
    assert_eq!(late["id"], id.as_str());
    assert_eq!(late["status"], "succeeded");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(provider.requests().len(), 1, "one provider call");
    assert_eq!(gw.usage_rows(1).await.len(), 1, "billed once");
    // A request that is not a retry is a new job.
    let (fresh, _) = accepted(post_job(&gw, GENERATION, &[]).await).await;
    assert_ne!(fresh, id);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_malformed_prefer_header_counts_as_absent_and_streams_are_refused() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = TestGateway::start(Db::Sqlite, &test_config(&provider.base_url(), "")).await;
    let send = |prefer: &'static str, body: &'static str| {
        gw.client
            .post(gw.url("/v1/images/generations"))
            .bearer_auth(&gw.key)
            .header("content-type", "application/json")
            .header("prefer", prefer)
            .body(body)
            .send()
    };
    for malformed in [
        "respond-async, @@",
        "respond-async;",
        "=respond-async",
        "respond-async=\"x",
    ] {
        let response = send(malformed, GENERATION).await.expect("send");
        assert_eq!(
            response.status(),
            200,
            "{malformed}: answered synchronously"
        );
        let body: Value = response.json().await.expect("json");
        assert!(body["data"].is_array(), "{malformed}: {body}");
    }
    for wellformed in [
        "wait=10, respond-async",
        "RESPOND-ASYNC",
        "handling=lenient; x=\"y z\", respond-async",
    ] {
        let response = send(wellformed, GENERATION).await.expect("send");
        assert_eq!(response.status(), 202, "{wellformed}");
    }
    let stream = r#"{"model":"gpt-image-1","prompt":"a red fox","stream":true}"#;
    let refused = send("respond-async", stream).await.expect("send");
    assert_eq!(refused.status(), 400);
    let error: Value = refused.json().await.expect("json");
    assert_eq!(error["error"]["param"], "stream", "{error}");
    // Four synchronous calls and three jobs; the refused stream reached no provider.
    gw.usage_rows(7).await;
    assert_eq!(provider.requests().len(), 7);
    assert!(
        provider
            .requests()
            .iter()
            .all(|r| r.json().get("stream").is_none())
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_failed_call_makes_a_failed_job_with_the_error_the_client_would_have_had() {
    let provider = StandIn::json(
        400,
        r#"{"error":{"message":"Your prompt was rejected.","type":"invalid_request_error","param":"prompt","code":"moderation_blocked"}}"#,
    )
    .await;
    let gw = TestGateway::start(Db::Sqlite, &test_config(&provider.base_url(), "")).await;
    let (id, _) = accepted(post_job(&gw, GENERATION, &[]).await).await;
    let (job, _) = wait_finished(&gw.client, &base(&gw), &gw.key, &id).await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["status_code"], 400);
    assert_eq!(job["error"]["code"], "moderation_blocked", "{job}");
    assert_eq!(job["error"]["param"], "prompt");
    assert!(job.get("result").is_none());
    assert_eq!(gw.usage_rows(1).await[0].outcome, Outcome::UpstreamError);
    gw.shutdown().await;
}

#[tokio::test]
async fn the_mock_provider_serves_jobs() {
    let config = r#"
default_model = "gpt-image-1"
[server]
listen = "127.0.0.1:0"
[providers.mock]
kind = "mock"
delay = "20ms"
[models."gpt-image-1"]
routes = [{ provider = "mock", model = "gpt-image-1" }]
[pricing.mock."gpt-image-1"]
per_image = 0.04
"#;
    let gw = TestGateway::start(Db::Sqlite, config).await;
    let (id, _) = accepted(post_job(&gw, GENERATION, &[]).await).await;
    let (job, _) = wait_finished(&gw.client, &base(&gw), &gw.key, &id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    // The mock's image: a PNG of the requested size (1024x1024).
    let png = base64::engine::general_purpose::STANDARD
        .decode(job["result"]["data"][0]["b64_json"].as_str().expect("b64"))
        .expect("base64");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    assert_eq!(png[16..24], [0, 0, 4, 0, 0, 0, 4, 0], "1024x1024");
    assert_eq!(gw.usage_rows(1).await[0].cost_nanousd, Some(40_000_000));
    gw.shutdown().await;
}

#[tokio::test]
async fn a_finished_job_is_deleted_after_its_retention() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let config = test_config(&provider.base_url(), "[jobs]\nretention = \"1s\"\n");
    let gw = TestGateway::start(Db::Sqlite, &config).await;
    let (id, _) = accepted(post_job(&gw, GENERATION, &[]).await).await;
    let (job, _) = wait_finished(&gw.client, &base(&gw), &gw.key, &id).await;
    assert_eq!(job["status"], "succeeded");
    let result = gw.job_results_dir().join(&id);
    assert!(result.exists(), "the result is in the result store");
    assert!(stored_job(&*gw.store, &id).await.is_some());
    let deadline = Instant::now() + Duration::from_secs(5);
    while result.exists() || stored_job(&*gw.store, &id).await.is_some() {
        assert!(
            Instant::now() < deadline,
            "the sweeper deletes the job's row and result"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _) = get_job(&gw.client, &base(&gw), &gw.key, &id).await;
    assert_eq!(status, 404);
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// The real binary: a job whose call is in flight at a kill -9.

fn binary_config(dir: &Path, database_url: &str, provider: &str) -> PathBuf {
    binary::write_one_model_config(
        dir,
        database_url,
        "5s",
        (
            "standin",
            &format!("base_url = \"{provider}\"\napi_key_env = \"TEST_PIAPI_KEY\""),
        ),
        "[jobs]\nlease = \"1s\"\n",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_in_flight_at_kill_9_is_reported_failed_after_the_restart() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    provider.set_delay(Duration::from_secs(600));
    let dir = tempfile::tempdir().expect("tempdir");
    let database_url = format!("sqlite:{}", dir.path().join("imagegate.db").display());
    let store = imagegate::store::connect(&database_url)
        .await
        .expect("store");
    store.migrate().await.expect("migrate");
    let issued = imagegate::auth::issue_key("svc");
    store.create_key(issued.new.clone()).await.expect("key");
    let key = issued.key;
    let config = binary_config(dir.path(), &database_url, &provider.base_url());
    let serve = || {
        let mut command = binary::command(&config);
        command
            .arg("serve")
            .env("TEST_PIAPI_KEY", PROVIDER_KEY)
            .env("RUST_LOG", "info");
        binary::serve(command)
    };
    let client = reqwest::Client::new();

    let (mut child, addr, _) = serve().await.into_parts();
    let base = format!("http://{addr}");
    let response = client
        .post(format!("{base}/v1/images/generations"))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .header("prefer", "respond-async")
        .body(GENERATION)
        .send()
        .await
        .expect("send");
    let (id, request_id) = accepted(response).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while provider.requests().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the job's call reaches the provider"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_, text) = get_job(&client, &base, &key, &id).await;
    let job: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(job["status"], "in_progress", "{job}");
    signal(&child, "-KILL");
    child.wait().await.expect("wait");

    let (mut child, addr, log) = serve().await.into_parts();
    let base = format!("http://{addr}");
    let (status, text) = get_job(&client, &base, &key, &id).await;
    assert_eq!(status, 200, "the job survived the restart: {text}");
    // Failed once the lease of the run that died has run out (jobs.lease = 1s).
    let (job, _) = wait_finished(&client, &base, &key, &id).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["message"], imagegate::jobs::INTERRUPTED);
    assert_eq!(job["error"]["code"], "job_interrupted");
    assert_eq!(job["error"]["type"], "server_error");

    // The usage rows are the ones the crash recovery writes for any call cut off: one
    // interrupted row at the worst case, under the creating request's id.
    let deadline = Instant::now() + Duration::from_secs(10);
    let rows: Vec<UsageRow> = loop {
        let rows = all_rows(&*store).await;
        if !rows.is_empty() || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(rows[0].request_id, request_id);
    assert_eq!(rows[0].outcome, Outcome::Interrupted);
    assert!(rows[0].cost_estimated);
    assert_eq!(rows[0].cost_nanousd, Some(9 * 5000 + 6240 * 40000));
    signal(&child, "-TERM");
    child.wait().await.expect("exits");
    let log = log.await.expect("log");
    assert!(log.contains("async jobs cut off"), "{log}");
    assert_eq!(provider.requests().len(), 1, "not sent again");
}

#[tokio::test]
async fn an_edit_job_is_answered_only_once_its_whole_upload_is_on_disk() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    // One key may take the whole spool here: a key's share is another test's.
    let config = test_config(&provider.base_url(), "[limits]\nmax_share_per_key = 1\n").replacen(
        "[server]\n",
        "[server]\nspool_max_bytes = 4096\n",
        1,
    );
    let gw = TestGateway::start(Db::Sqlite, &config).await;
    let body = Form::edit("gpt-image-1", "add a hat").body();
    let (head, tail) = body.split_at(body.len() / 2);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(2);
    tx.send(Ok(head.to_vec())).await.expect("first half");
    let sending = gw
        .client
        .post(gw.url("/v1/images/edits"))
        .bearer_auth(&gw.key)
        .header("content-type", crate::support::forms::content_type())
        .header("prefer", "respond-async")
        .body(reqwest::Body::wrap_stream(tokio_stream_from(rx)))
        .send();
    tokio::pin!(sending);
    assert!(
        tokio::time::timeout(Duration::from_millis(400), &mut sending)
            .await
            .is_err(),
        "no answer while half the upload is missing"
    );
    assert!(provider.requests().is_empty(), "nothing sent yet");
    tx.send(Ok(tail.to_vec())).await.expect("second half");
    drop(tx);
    let (id, _) = accepted(sending.await.expect("answer")).await;
    let (job, _) = wait_finished(&gw.client, &base(&gw), &gw.key, &id).await;
    assert_eq!(job["status"], "succeeded", "{job}");

    // An upload the spool quota cannot hold gets 503 and makes no job.
    let big = Form::new()
        .text("model", "gpt-image-1")
        .text("prompt", "add a hat")
        .file("image", &vec![b'x'; 8192])
        .body();
    let refused = gw
        .client
        .post(gw.url("/v1/images/edits"))
        .bearer_auth(&gw.key)
        .header("content-type", crate::support::forms::content_type())
        .header("prefer", "respond-async")
        .body(big)
        .send()
        .await
        .expect("send");
    assert_eq!(refused.status(), 503);
    let error: Value = refused.json().await.expect("json");
    assert_eq!(error["error"]["code"], "spool_full");
    let results = std::fs::read_dir(gw.job_results_dir())
        .expect("results")
        .count();
    assert_eq!(results, 1, "the first job's result only");
    let key_id = gw.store.list_keys().await.expect("keys")[0].id;
    let open = gw.store.open_jobs(key_id).await.expect("open jobs");
    assert_eq!(open, 0, "no job left unfinished");
    assert_eq!(provider.requests().len(), 1);
    gw.shutdown().await;
}

/// The receiving half of a channel as a stream of body chunks.
fn tokio_stream_from(
    rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

#[tokio::test]
async fn a_keys_jobs_run_at_most_max_in_flight_at_once_and_polling_is_never_refused() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    provider.set_delay(Duration::from_millis(600));
    let config = test_config(
        &provider.base_url(),
        "[limits]\nmax_in_flight_per_key = 1\n",
    );
    let gw = TestGateway::start(Db::Sqlite, &config).await;
    let first = accepted(post_job(&gw, GENERATION, &[]).await).await.0;
    // The first job's call holds the key's one turn; the key's requests still get in.
    let (second, _) = accepted(post_job(&gw, &GENERATION.replace("fox", "cat"), &[]).await).await;
    assert!(provider.wait_for_requests(1).await);
    for (id, expected) in [(&first, "in_progress"), (&second, "queued")] {
        let (status, text) = get_job(&gw.client, &base(&gw), &gw.key, id).await;
        assert_eq!(status, 200, "{text}");
        let job: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(job["status"], expected, "{job}");
    }
    assert_eq!(
        provider.requests().len(),
        1,
        "the second waits for its turn"
    );
    let (job, _) = wait_finished(&gw.client, &base(&gw), &gw.key, &second).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(provider.requests().len(), 2);
    gw.usage_rows(2).await;
    gw.shutdown().await;
}

/// A result the result store cannot take (here a folder stands at its name) fails the job
/// with 500 and a clear message instead of leaving it `in_progress` for good: nothing half
/// written stays, the call is billed once, and the key's queue slot is given back.
#[tokio::test]
async fn a_result_that_cannot_be_kept_fails_the_job_and_frees_its_slot() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    provider.set_delay(Duration::from_millis(800));
    let config = test_config(&provider.base_url(), "[jobs]\nmax_queued_per_key = 1\n");
    let gw = TestGateway::start(Db::Sqlite, &config).await;
    let (id, request_id) = accepted(post_job(&gw, GENERATION, &[]).await).await;
    let in_the_way = gw.job_results_dir().join(&id);
    std::fs::create_dir_all(in_the_way.join("taken")).expect("a folder in the way");
    let (job, _) = wait_finished(&gw.client, &base(&gw), &gw.key, &id).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["status_code"], 500, "{job}");
    assert_eq!(job["error"]["type"], "server_error", "{job}");
    assert!(
        job["error"]["message"]
            .as_str()
            .expect("message")
            .contains("[results] url"),
        "{job}"
    );
    let left: Vec<_> = std::fs::read_dir(gw.job_results_dir())
        .expect("results")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(
        left,
        [std::ffi::OsString::from(&id)],
        "nothing staged is left"
    );
    let rows = gw.usage_rows(1).await;
    assert_eq!(rows[0].request_id, request_id);
    assert_eq!(
        rows[0].outcome,
        Outcome::Completed,
        "billed once, as answered"
    );

    // Its slot is free again: the next job is taken, and kept.
    std::fs::remove_dir_all(&in_the_way).expect("clear the way");
    let other = r#"{"model":"gpt-image-1","prompt":"another lighthouse"}"#;
    let (next, _) = accepted(post_job(&gw, other, &[]).await).await;
    let (job, _) = wait_finished(&gw.client, &base(&gw), &gw.key, &next).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    gw.shutdown().await;
}

/// The stored jobs once every one of `ids` has finished (read from the database: a revoked
/// key can no longer poll them), as a poll shows them.
async fn finished_records(store: &dyn imagegate::store::Store, ids: &[String]) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut records = Vec::new();
        for id in ids {
            let job = stored_job(store, id).await.expect("job row");
            let error: Option<Value> = job
                .error
                .as_deref()
                .map(|e| serde_json::from_str(e).expect("error json"));
            records.push(serde_json::json!({
                "id": job.id,
                "status": job.status,
                "status_code": job.status_code,
                "error": error,
            }));
        }
        let done = records
            .iter()
            .all(|r| matches!(r["status"].as_str(), Some("succeeded" | "failed")));
        if done || Instant::now() > deadline {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn queued_jobs_of_a_key_revoked_meanwhile_are_not_sent_nor_billed() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    // Long enough that the first job's call outlasts the twenty creations (each one a
    // database transaction), on a loaded machine too.
    provider.set_delay(Duration::from_millis(3000));
    let config = test_config(
        &provider.base_url(),
        "[limits]\nmax_in_flight_per_key = 1\n",
    );
    let gw = TestGateway::start(Db::Postgres, &config).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let body = GENERATION.replace("fox", &format!("fox {i}"));
        ids.push(accepted(post_job(&gw, &body, &[]).await).await.0);
    }
    assert!(gw.store.revoke_key("svc-test").await.expect("revoke"));
    let records = finished_records(&*gw.store, &ids).await;
    let sent = provider.requests().len();
    assert!(sent <= 1, "{sent} jobs sent after the key was revoked");
    let refused: Vec<&Value> = records.iter().filter(|r| r["status"] == "failed").collect();
    assert_eq!(refused.len(), 20 - sent, "{records:#?}");
    for record in refused {
        assert_eq!(record["status_code"], 401, "{record}");
        assert_eq!(record["error"]["code"], "invalid_api_key", "{record}");
    }
    // Only what was sent is billed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(all_rows(&*gw.store).await.len(), sent);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_queued_job_runs_with_its_keys_limits_as_they_are_when_it_starts() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    provider.set_delay(Duration::from_millis(800));
    let config = test_config(
        &provider.base_url(),
        "[limits]\nmax_in_flight_per_key = 1\n",
    );
    let gw = TestGateway::start(Db::Sqlite, &config).await;
    let in_the_past = chrono::Utc::now() - chrono::TimeDelta::minutes(1);
    // dall-e-3 at $0.04 a call: a budget of two calls, cut to what the first one spends.
    let changes = [
        (
            imagegate::store::KeyChanges {
                budget: Some(Some((40_000_000, Some("total".into())))),
                ..Default::default()
            },
            429,
            "insufficient_quota",
        ),
        (
            imagegate::store::KeyChanges {
                models: Some(Some(vec!["gpt-image-1".into()])),
                ..Default::default()
            },
            403,
            "model_not_allowed",
        ),
        (
            imagegate::store::KeyChanges {
                expires_at: Some(Some(in_the_past)),
                ..Default::default()
            },
            401,
            "invalid_api_key",
        ),
    ];
    for (index, (change, status, code)) in changes.into_iter().enumerate() {
        let name = format!("changing-{index}");
        let mut issued = imagegate::auth::issue_key(&name);
        issued.new.limits.budget_nanousd = Some(80_000_000);
        gw.store.create_key(issued.new).await.expect("key");
        let mut ids = Vec::new();
        for prompt in ["first", "second"] {
            let body = format!(r#"{{"model":"dall-e-3","prompt":"{prompt}"}}"#);
            let response = gw
                .client
                .post(gw.url("/v1/images/generations"))
                .bearer_auth(&issued.key)
                .header("content-type", "application/json")
                .header("prefer", "respond-async")
                .body(body)
                .send()
                .await
                .expect("reaches imagegate");
            ids.push(accepted(response).await.0);
        }
        // The first runs; the second waits for the key's one turn while the key changes.
        assert!(provider.wait_for_requests(index + 1).await);
        gw.store
            .update_key(&name, &change)
            .await
            .expect("update")
            .expect("key");
        let records = finished_records(&*gw.store, &ids).await;
        assert_eq!(records[0]["status"], "succeeded", "{records:#?}");
        assert_eq!(records[1]["status"], "failed", "{records:#?}");
        assert_eq!(records[1]["status_code"], status, "{records:#?}");
        assert_eq!(records[1]["error"]["code"], code, "{records:#?}");
    }
    assert_eq!(provider.requests().len(), 3, "no second job was sent");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_keys_finished_jobs_are_bounded_in_count_and_bytes_oldest_expiring_first() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let result_bytes = image_response(1, USAGE).len();
    // Room for three jobs by count, and for two results by size.
    let config = test_config(
        &provider.base_url(),
        &format!(
            "[jobs]\nmax_kept_per_key = 3\nmax_kept_bytes_per_key = {}\n",
            2 * result_bytes + result_bytes / 2
        ),
    );
    let gw = TestGateway::start(Db::Sqlite, &config).await;
    let mut ids = Vec::new();
    // One after the other, so that they finish in order: a failed one (no result), then
    // successes.
    provider.set_handler(|_| {
        respond(
            400,
            "application/json",
            r#"{"error":{"message":"no","type":"invalid_request_error","param":null,"code":null}}"#,
        )
    });
    for i in 0..5 {
        if i == 1 {
            provider.set_handler(|_| respond(200, "application/json", image_response(1, USAGE)));
        }
        let body = GENERATION.replace("fox", &format!("fox {i}"));
        let (id, _) = accepted(post_job(&gw, &body, &[]).await).await;
        wait_finished(&gw.client, &base(&gw), &gw.key, &id).await;
        ids.push(id);
    }
    // The bounds apply once the last job's end is recorded, which a poll may see first.
    let expected = ["expired", "expired", "expired", "succeeded", "succeeded"];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut statuses = Vec::new();
        for id in &ids {
            let (status, text) = get_job(&gw.client, &base(&gw), &gw.key, id).await;
            assert_eq!(status, 200, "{text}");
            let job: Value = serde_json::from_str(&text).expect("json");
            statuses.push(job["status"].as_str().expect("status").to_owned());
        }
        if statuses == expected {
            break;
        }
        // By count (three at most) and by bytes (two results at most), the oldest go first.
        assert!(Instant::now() < deadline, "{statuses:?} for {ids:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let results = std::fs::read_dir(gw.job_results_dir())
        .expect("results")
        .count();
    assert_eq!(results, 2, "expired results are deleted");
    gw.shutdown().await;
}
