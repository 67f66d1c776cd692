//! Async jobs across replicas on one Postgres database and one result store: any replica
//! answers a job's polls, the queue limit holds across them, and a job whose replica died
//! is failed `job_interrupted` by another one and billed once (in-process gateways, and
//! two real processes).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use imagegate::usage::{Intent, Outcome};
use serde_json::Value;

use crate::jobs::{accepted, wait_finished};
use crate::support::binary::{self, signal, terminate};
use crate::support::*;

const GENERATION: &str = r#"{"model":"gpt-image-1","prompt":"a red fox","size":"1024x1024"}"#;

/// The `[jobs]` and `[results]` sections of replicas sharing the result store `shared`.
fn shared(shared: &Path, jobs: &str) -> String {
    format!(
        "[jobs]\nlease = \"1s\"\n{jobs}\n[results]\nurl = \"file://{}\"\n",
        shared.display()
    )
}

/// POSTs `body` as an async job to `gw` with `key`.
async fn post_job(gw: &TestGateway, key: &str, body: &str) -> reqwest::Response {
    gw.client
        .post(gw.url("/v1/images/generations"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .header("prefer", "respond-async")
        .body(body.to_owned())
        .send()
        .await
        .expect("reaches imagegate")
}

/// GET /v1/images/jobs/{id} on `base` with `key`: status and body text.
async fn poll(client: &reqwest::Client, base: &str, key: &str, id: &str) -> (u16, String) {
    let response = client
        .get(format!("{base}/v1/images/jobs/{id}"))
        .bearer_auth(key)
        .send()
        .await
        .expect("reaches imagegate");
    let status = response.status().as_u16();
    (status, response.text().await.expect("text"))
}

#[tokio::test]
async fn a_job_created_on_one_replica_is_answered_alike_by_both() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    provider.set_delay(Duration::from_millis(400));
    let results = tempfile::tempdir().expect("tempdir");
    let (store, url) = crate::support::db::fresh_postgres().await;
    let config = test_config(&provider.base_url(), &shared(results.path(), ""));
    let a = TestGateway::start_on_as(&url, &config, "a").await;
    let b = TestGateway::start_on_as(&url, &config, "b").await;
    let key = &a.key;
    let (id, request_id) = accepted(post_job(&a, key, GENERATION).await).await;

    // While it runs and once it finished, every poll, alternating A and B, is answered.
    let replicas = [&a, &b];
    let mut running = Vec::new();
    for i in 0..10 {
        let gw = replicas[i % 2];
        let (status, text) = poll(&gw.client, &gw.url(""), key, &id).await;
        assert_eq!(status, 200, "poll {i} on {}: {text}", ["A", "B"][i % 2]);
        let job: Value = serde_json::from_str(&text).expect("json");
        running.push(job["status"].as_str().expect("status").to_owned());
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(
        running.iter().any(|s| s == "in_progress"),
        "polled while it ran: {running:?}"
    );
    wait_finished(&b.client, &b.url(""), key, &id).await;
    let mut answers = Vec::new();
    for i in 0..10 {
        let gw = replicas[i % 2];
        let (status, text) = poll(&gw.client, &gw.url(""), key, &id).await;
        assert_eq!(status, 200, "poll {i}: {text}");
        answers.push(text);
    }
    assert!(answers.iter().all(|t| *t == answers[0]), "{answers:#?}");
    let job: Value = serde_json::from_str(&answers[0]).expect("json");
    assert_eq!(job["status"], "succeeded", "{job}");
    // The result bytes, as the result store holds them, inside every answer.
    let stored = std::fs::read(results.path().join("jobs").join(&id)).expect("stored result");
    let stored = String::from_utf8(stored).expect("utf-8");
    assert_eq!(stored, image_response(1, USAGE));
    assert!(
        answers[0].ends_with(&format!("\"result\":{stored}}}")),
        "{}",
        answers[0]
    );

    assert_eq!(provider.requests().len(), 1, "one provider call");
    let rows = a.usage_rows(1).await;
    assert_eq!(rows[0].request_id, request_id);
    drop(store);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn max_queued_per_key_counts_the_jobs_of_every_replica() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    provider.set_delay(Duration::from_millis(1500));
    let results = tempfile::tempdir().expect("tempdir");
    let (_store, url) = crate::support::db::fresh_postgres().await;
    let jobs = shared(results.path(), "max_queued_per_key = 2");
    let config = test_config(&provider.base_url(), &jobs);
    let a = TestGateway::start_on_as(&url, &config, "a").await;
    let b = TestGateway::start_on_as(&url, &config, "b").await;
    let key = a.key.clone();
    let prompt = |n: usize| GENERATION.replace("a red fox", &format!("fox {n}"));
    let first = accepted(post_job(&a, &key, &prompt(1)).await).await.0;
    accepted(post_job(&b, &key, &prompt(2)).await).await;
    for (gw, n) in [(&a, 3), (&b, 4)] {
        let refused = post_job(gw, &key, &prompt(n)).await;
        assert_eq!(refused.status(), 429);
        let error: Value = refused.json().await.expect("json");
        assert_eq!(error["error"]["code"], "job_queue_full", "{error}");
        assert_eq!(error["error"]["type"], "requests", "{error}");
    }
    // B's own key has its own queue.
    accepted(post_job(&b, &b.key, &prompt(5)).await).await;
    wait_finished(&a.client, &a.url(""), &key, &first).await;
    accepted(post_job(&b, &key, &prompt(6)).await).await;
    a.usage_rows(4).await;
    let sent: Vec<String> = provider
        .requests()
        .iter()
        .map(|r| r.json()["prompt"].as_str().expect("prompt").to_owned())
        .collect();
    assert_eq!(sent.len(), 4, "{sent:?}");
    assert!(
        !sent.iter().any(|p| p == "fox 3" || p == "fox 4"),
        "{sent:?}"
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// Rows left by a replica that is gone (its leases long run out): one job whose call was
/// sent, one still queued. The live replica fails both, and bills the sent one once.
#[tokio::test]
async fn jobs_of_a_replica_that_is_gone_are_failed_by_another_and_billed_once() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let results = tempfile::tempdir().expect("tempdir");
    let (store, url) = crate::support::db::fresh_postgres().await;
    let config = test_config(&provider.base_url(), &shared(results.path(), ""));
    let b = TestGateway::start_on_as(&url, &config, "b").await;
    let key = store
        .list_keys()
        .await
        .expect("keys")
        .into_iter()
        .find(|k| k.name == "b")
        .expect("b's key");
    let long_ago = chrono::Utc::now() - chrono::TimeDelta::minutes(5);
    // Leased until later while the test sets them up, then run out all at once.
    let later = chrono::Utc::now() + chrono::TimeDelta::minutes(5);
    let gone = |id: &str| imagegate::store::NewJob {
        id: id.to_owned(),
        key_id: key.id,
        endpoint: "generations".into(),
        request_id: format!("req_{id}"),
        fingerprint: None,
        created_at: long_ago,
        replica: "gone-0000".into(),
        lease_until: later,
    };
    let running = "imgjob_running";
    let queued = "imgjob_queued";
    for id in [running, queued] {
        let created = store
            .create_job(&gone(id), false, 10, long_ago)
            .await
            .expect("create");
        assert!(matches!(created, imagegate::store::JobCreated::New(_)));
    }
    assert!(store.start_job(running, long_ago).await.expect("start"));
    let intent = Intent {
        request_id: format!("req_{running}"),
        key_id: key.id,
        key_name: key.name.clone(),
        model: "gpt-image-1".into(),
        provider: "piapi".into(),
        upstream_model: "gpt-image-1".into(),
        endpoint: "generations".into(),
        streamed: false,
        n: Some(1),
        size: Some("1024x1024".into()),
        quality: None,
        worst_case_nanousd: Some(250_000_000),
        attempt: 1,
        client_request_id: None,
        created_at: long_ago,
    };
    let intent = serde_json::to_string(&intent).expect("json");
    store
        .record_job_call(running, &intent)
        .await
        .expect("record the call");
    let ran_out = store
        .renew_job_leases("gone-0000", None, long_ago)
        .await
        .expect("leases run out");
    assert_eq!(ran_out, 2);

    for (id, message) in [
        (running, imagegate::jobs::INTERRUPTED),
        (queued, imagegate::jobs::INTERRUPTED_QUEUED),
    ] {
        let (job, _) = wait_finished(&b.client, &b.url(""), &b.key, id).await;
        assert_eq!(job["status"], "failed", "{job}");
        assert_eq!(job["status_code"], 500, "{job}");
        assert_eq!(job["error"]["code"], "job_interrupted", "{job}");
        assert_eq!(job["error"]["type"], "server_error", "{job}");
        assert_eq!(job["error"]["message"], message, "{job}");
    }
    let rows = b.usage_rows(1).await;
    assert_eq!(rows[0].request_id, format!("req_{running}"));
    assert_eq!(rows[0].outcome, Outcome::Interrupted);
    assert_eq!(rows[0].cost_nanousd, Some(250_000_000));
    assert!(rows[0].cost_estimated);
    // Later rounds find nothing more to bill.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(all_rows(&*store).await.len(), 1);
    assert!(provider.requests().is_empty(), "nothing is re-run");
    b.shutdown().await;
}

/// A job of this very replica that no task of it runs any more (its end could not be
/// recorded, or its task died) is not kept alive by the replica's renewals: its lease runs
/// out and it is failed `job_interrupted`, so that it neither blocks its key's queue nor
/// stays `queued` for ever.
#[tokio::test]
async fn a_job_no_task_holds_lapses_even_on_its_own_live_replica() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let results = tempfile::tempdir().expect("tempdir");
    let (store, url) = crate::support::db::fresh_postgres().await;
    let config = test_config(&provider.base_url(), &shared(results.path(), ""));
    let a = TestGateway::start_on_as(&url, &config, "a").await;
    let replica = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let rows = store.replicas().await.expect("replicas");
            if let Some(row) = rows.first() {
                break row.id.clone();
            }
            assert!(Instant::now() < deadline, "the replica's heartbeat row");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let key = store
        .list_keys()
        .await
        .expect("keys")
        .into_iter()
        .find(|k| k.name == "a")
        .expect("a's key");
    let now = chrono::Utc::now();
    let orphan = imagegate::store::NewJob {
        id: "imgjob_orphan".into(),
        key_id: key.id,
        endpoint: "generations".into(),
        request_id: "req_orphan".into(),
        fingerprint: None,
        created_at: now,
        replica,
        lease_until: now + chrono::TimeDelta::seconds(1),
    };
    store
        .create_job(&orphan, false, 10, now)
        .await
        .expect("create");
    let (job, _) = wait_finished(&a.client, &a.url(""), &a.key, "imgjob_orphan").await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "job_interrupted", "{job}");
    assert!(provider.requests().is_empty(), "nothing was run");
    a.shutdown().await;
}

/// A replica stopped while its job's call runs past the shutdown grace ends its leases as
/// it stops: another replica fails the job at its next round (a third of the lease, 1 s
/// here), not once the lease (3 s) has run out, at least 2 s after the stop.
#[tokio::test]
async fn a_job_cut_off_by_a_stop_is_failed_by_another_replica_at_once() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    provider.set_delay(Duration::from_secs(600));
    let results = tempfile::tempdir().expect("tempdir");
    let (store, url) = crate::support::db::fresh_postgres().await;
    let jobs = format!(
        "[jobs]\nlease = \"3s\"\n[results]\nurl = \"file://{}\"\n",
        results.path().display()
    );
    let config = test_config(&provider.base_url(), &jobs).replacen(
        "shutdown_grace = \"5s\"",
        "shutdown_grace = \"300ms\"",
        1,
    );
    let a = TestGateway::start_on_as(&url, &config, "a").await;
    let b = TestGateway::start_on_as(&url, &config, "b").await;
    let key = a.key.clone();
    let (id, request_id) = accepted(post_job(&a, &key, GENERATION).await).await;
    assert!(provider.wait_for_requests(1).await);
    a.shutdown().await;
    let stopped = Instant::now();
    let (job, _) = wait_finished(&b.client, &b.url(""), &key, &id).await;
    assert!(
        stopped.elapsed() < Duration::from_millis(1800),
        "failed {:?} after the stop",
        stopped.elapsed()
    );
    assert_eq!(job["error"]["code"], "job_interrupted", "{job}");
    assert_eq!(
        job["error"]["message"],
        imagegate::jobs::INTERRUPTED,
        "{job}"
    );
    let rows = b.usage_rows(1).await;
    assert_eq!(rows[0].request_id, request_id);
    assert_eq!(rows[0].outcome, Outcome::Interrupted);
    drop(store);
    b.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Two real processes on one Postgres: a job polled on the other replica, then its replica
// killed.

/// A `serve` config in `dir` (its own journal and spool) on `database_url`, with the result
/// store `results` shared by the replicas.
fn replica_config(dir: &Path, database_url: &str, results: &Path, provider: &str) -> PathBuf {
    let toml = format!(
        r#"
default_model = "gpt-image-1"
[server]
listen = "127.0.0.1:0"
shutdown_grace = "5s"
journal_dir = "{journal}"
spool_dir = "{spool}"
[jobs]
lease = "1s"
[results]
url = "file://{results}"
[database]
url = "{database_url}"
[providers.standin]
base_url = "{provider}"
api_key_env = "TEST_PIAPI_KEY"
[models."gpt-image-1"]
routes = [{{ provider = "standin", model = "gpt-image-1" }}]
[pricing.standin."gpt-image-1"]
{prices}"#,
        journal = dir.join("journal").display(),
        spool = dir.join("spool").display(),
        results = results.display(),
        prices = binary::TOKEN_PRICES,
    );
    let path = dir.join("imagegate.toml");
    std::fs::write(&path, toml).expect("write config");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_a_job_is_polled_on_the_other_and_failed_there_when_its_replica_dies() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    provider.set_delay(Duration::from_secs(600));
    let (store, url) = crate::support::db::fresh_postgres().await;
    let results = tempfile::tempdir().expect("tempdir");
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let serve = |dir: &Path| {
        let config = replica_config(dir, &url, results.path(), &provider.base_url());
        let mut command = binary::command(&config);
        command
            .arg("serve")
            .env("TEST_PIAPI_KEY", PROVIDER_KEY)
            .env("RUST_LOG", "info");
        binary::serve(command)
    };
    let (mut a, addr_a, _) = serve(dir_a.path()).await.into_parts();
    let (mut b, addr_b, log_b) = serve(dir_b.path()).await.into_parts();
    let issued = imagegate::auth::issue_key("svc");
    store.create_key(issued.new.clone()).await.expect("key");
    let key = issued.key;
    let (base_a, base_b) = (format!("http://{addr_a}"), format!("http://{addr_b}"));
    let client = reqwest::Client::new();

    let response = client
        .post(format!("{base_a}/v1/images/generations"))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .header("prefer", "respond-async")
        .body(GENERATION)
        .send()
        .await
        .expect("send");
    let (id, request_id) = accepted(response).await;
    assert!(
        provider.wait_for_requests(1).await,
        "the call reaches the provider"
    );
    for base in [&base_b, &base_a, &base_b] {
        let (status, text) = poll(&client, base, &key, &id).await;
        assert_eq!(status, 200, "{base}: {text}");
        let job: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(job["status"], "in_progress", "{job}");
    }
    // A dies with the job's call in flight; B notices once A's lease ran out.
    let killed = Instant::now();
    signal(&a, "-KILL");
    a.wait().await.expect("wait");
    let (job, _) = wait_finished(&client, &base_b, &key, &id).await;
    let noticed = killed.elapsed();
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "job_interrupted", "{job}");
    assert_eq!(
        job["error"]["message"],
        imagegate::jobs::INTERRUPTED,
        "{job}"
    );
    assert!(
        noticed < Duration::from_secs(5),
        "noticed after {noticed:?}"
    );

    // One interrupted row at the worst case, under the creating request's id.
    let deadline = Instant::now() + Duration::from_secs(10);
    let rows = loop {
        let rows = all_rows(&*store).await;
        if !rows.is_empty() || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(rows[0].request_id, request_id);
    assert_eq!(rows[0].outcome, Outcome::Interrupted);
    assert_eq!(rows[0].cost_nanousd, Some(9 * 5000 + 6240 * 40000));
    assert!(terminate(&mut b, Duration::from_secs(10)).await.success());
    let log = log_b.await.expect("log");
    assert!(log.contains("async jobs cut off"), "{log}");
    assert_eq!(all_rows(&*store).await.len(), 1, "billed once");
    assert_eq!(provider.requests().len(), 1, "not sent again");
    eprintln!("replica died: job failed job_interrupted on the other after {noticed:?}");
}
