//! Duplicate protection across replicas: a retry the balancer sends to another replica finds
//! its original through the database and collects its answer from the shared result store,
//! instead of a second provider call and a second billed row.

use std::path::Path;
use std::time::{Duration, Instant};

use sqlx::PgPool;

use crate::support::binary::{self, Served};
use crate::support::gateway::write_config;
use crate::support::*;

const GEN: &str = "/v1/images/generations";
const BODY: &str = r#"{"model":"gpt-image-1","prompt":"a fox on two replicas"}"#;
/// How long the stand-in provider takes over each call: longer than a first try waits.
const PROVIDER_TAKES: Duration = Duration::from_millis(1500);
/// How long the first try's client waits before it gives up (the SDK's timeout).
const CLIENT_GIVES_UP: Duration = Duration::from_millis(500);

/// Two gateways, A and B, on one fresh Postgres database and one results folder.
struct Pair {
    a: TestGateway,
    b: TestGateway,
    db: PgPool,
    _results: tempfile::TempDir,
}

impl Pair {
    async fn start(provider: &StandIn) -> Pair {
        let (_, url) = crate::support::db::fresh_postgres().await;
        let results = tempfile::tempdir().expect("tempdir");
        let config = shared_config(provider, results.path());
        let a = TestGateway::start_on_as(&url, &config, "a").await;
        let b = TestGateway::start_on_as(&url, &config, "b").await;
        let db = PgPool::connect(&url).await.expect("connect");
        Pair {
            a,
            b,
            db,
            _results: results,
        }
    }

    async fn shutdown(self) {
        self.a.shutdown().await;
        self.b.shutdown().await;
    }
}

/// The test config on `provider`, whose results go to the folder `results`.
fn shared_config(provider: &StandIn, results: &Path) -> String {
    test_config(
        &provider.base_url(),
        &format!("[results]\nurl = \"file://{}\"\n", results.display()),
    )
}

/// The calls in flight as the database holds them: (request id, replica, state).
async fn calls(db: &PgPool) -> Vec<(String, String, String)> {
    sqlx::query_as("select request_id, replica, state from calls_in_flight order by started_at")
        .fetch_all(db)
        .await
        .expect("calls_in_flight")
}

/// Waits (5 s at most) until a call is in `state`; how long that took.
async fn until_a_call_is(db: &PgPool, state: &str) -> Duration {
    let started = Instant::now();
    while !calls(db).await.iter().any(|(_, _, s)| s == state) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no call became {state}: {:?}",
            calls(db).await
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    started.elapsed()
}

/// The SDK's try number `count` of the generation, with the key `key`, to `base`.
async fn sdk_try(
    base: &str,
    key: &str,
    count: &str,
    timeout: Option<Duration>,
) -> reqwest::Result<reqwest::Response> {
    let mut request = reqwest::Client::new()
        .post(format!("{base}{GEN}"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .header("x-stainless-retry-count", count)
        .body(BODY);
    if let Some(timeout) = timeout {
        request = request.timeout(timeout);
    }
    request.send().await
}

fn base(gw: &TestGateway) -> String {
    format!("http://{}", gw.addr)
}

/// Every usage row, once `expected` are written and a moment later no more came.
async fn settled_rows(gw: &TestGateway, expected: usize) -> Vec<imagegate::usage::UsageRow> {
    gw.usage_rows(expected).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.usage_rows(expected).await
}

#[tokio::test]
async fn a_retry_on_another_replica_attaches_to_the_original_still_running() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    provider.set_delay(PROVIDER_TAKES);
    let p = Pair::start(&provider).await;
    let key = p.a.key.clone();

    // A knows the key already (a model list costs nothing): what is timed below is the
    // call's registration, not a cold key cache.
    let models = p.a.get_as(&key, "/v1/models").await;
    assert_eq!(models.status(), 200);
    // The first try goes to A and its client gives up; meanwhile A's registration lands.
    let (base_a, base_b) = (base(&p.a), base(&p.b));
    let sent = Instant::now();
    let (first, registered) =
        tokio::join!(sdk_try(&base_a, &key, "0", Some(CLIENT_GIVES_UP)), async {
            until_a_call_is(&p.db, "running").await;
            sent.elapsed()
        });
    assert!(
        first.is_err(),
        "the first try timed out on the client's side"
    );
    // Timed by A from the call's start (the process's recorder: every test's calls).
    let (sum, count) = (
        p.a.metric("imagegate_duplicate_registration_seconds_sum")
            .await,
        p.a.metric("imagegate_duplicate_registration_seconds_count")
            .await,
    );
    let after_start = Duration::from_secs_f64(sum / count.max(1.0));
    eprintln!(
        "registration visible {registered:?} after the first try was sent; written {after_start:?} after its call started"
    );
    assert!(after_start < Duration::from_millis(500), "{after_start:?}");
    // From the client's side too (a slower measure: it includes the request's way in).
    assert!(registered < Duration::from_secs(1), "{registered:?}");
    let running = calls(&p.db).await;
    assert_eq!(running.len(), 1, "{running:?}");

    // The balancer sends the retry to B: it waits for A's call and gets its answer.
    let retry = sdk_try(&base_b, &key, "1", Some(Duration::from_secs(10)))
        .await
        .expect("retry");
    assert_eq!(retry.status(), 200);
    assert_eq!(retry.headers()["x-imagegate-duplicate"], "attached");
    assert_eq!(retry.headers()["x-imagegate-provider"], "piapi");
    let original = retry.headers()["x-imagegate-original-request-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert_eq!(original, running[0].0, "the original's request id");
    assert_eq!(retry.text().await.expect("body"), image_response(1, USAGE));

    let rows = settled_rows(&p.a, 1).await;
    eprintln!(
        "attached across replicas: {} provider call(s), {} usage row(s)",
        provider.requests().len(),
        rows.len()
    );
    assert_eq!(
        provider.requests().len(),
        1,
        "one provider call for two tries"
    );
    assert_eq!(
        rows[0].request_id, original,
        "the one row is the original's"
    );
    p.shutdown().await;
}

#[tokio::test]
async fn a_retry_on_another_replica_after_the_original_client_left_replays_its_result() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    provider.set_delay(PROVIDER_TAKES);
    let p = Pair::start(&provider).await;
    let key = p.a.key.clone();
    let first = sdk_try(&base(&p.a), &key, "0", Some(CLIENT_GIVES_UP)).await;
    assert!(first.is_err(), "the client gave up before the answer");
    // A runs the call to its end with nobody waiting, and keeps the answer.
    until_a_call_is(&p.db, "kept").await;
    p.a.usage_rows(1).await;
    let kept = calls(&p.db).await;

    let started = Instant::now();
    let retry = sdk_try(&base(&p.b), &key, "1", Some(Duration::from_secs(10)))
        .await
        .expect("retry");
    assert_eq!(retry.status(), 200);
    assert_eq!(retry.headers()["x-imagegate-duplicate"], "replayed");
    assert_eq!(retry.headers()["x-imagegate-provider"], "piapi");
    assert_eq!(
        retry.headers()["x-imagegate-original-request-id"],
        kept[0].0.as_str()
    );
    assert_eq!(retry.text().await.expect("body"), image_response(1, USAGE));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "replayed at once"
    );

    let rows = settled_rows(&p.a, 1).await;
    eprintln!(
        "replayed across replicas: {} provider call(s), {} usage row(s)",
        provider.requests().len(),
        rows.len()
    );
    assert_eq!(provider.requests().len(), 1);
    p.shutdown().await;
}

#[tokio::test]
async fn a_retry_on_another_replica_after_a_delivered_answer_is_a_new_call_at_once() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    provider.set_delay(Duration::from_millis(300));
    let p = Pair::start(&provider).await;
    let key = p.a.key.clone();
    let first = sdk_try(&base(&p.a), &key, "0", None).await.expect("first");
    assert_eq!(first.status(), 200);
    first
        .bytes()
        .await
        .expect("the whole answer reached its client");

    let started = Instant::now();
    let retry = sdk_try(&base(&p.b), &key, "1", Some(Duration::from_secs(10)))
        .await
        .expect("retry");
    assert_eq!(retry.status(), 200);
    assert!(retry.headers().get("x-imagegate-duplicate").is_none());
    retry.bytes().await.expect("body");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "a new call at once, took {took:?}"
    );
    assert_eq!(provider.requests().len(), 2);
    settled_rows(&p.a, 2).await;
    // Both calls ended delivered: nothing is left for a retry.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(calls(&p.db).await, vec![]);
    p.shutdown().await;
}

#[tokio::test]
async fn a_retry_on_another_replica_after_a_failed_original_is_a_new_call() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    provider.set_delay(Duration::from_millis(300));
    provider.set_handler(|_| respond(500, "text/plain", "oops"));
    let p = Pair::start(&provider).await;
    let key = p.a.key.clone();
    let first = sdk_try(&base(&p.a), &key, "0", None).await.expect("first");
    assert_eq!(first.status(), 502);
    first.bytes().await.expect("body");

    provider.set_handler(|_| respond(200, "application/json", image_response(1, USAGE)));
    let started = Instant::now();
    let retry = sdk_try(&base(&p.b), &key, "1", Some(Duration::from_secs(10)))
        .await
        .expect("retry");
    assert_eq!(retry.status(), 200);
    assert!(retry.headers().get("x-imagegate-duplicate").is_none());
    assert_eq!(retry.text().await.expect("body"), image_response(1, USAGE));
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(provider.requests().len(), 2);
    settled_rows(&p.a, 2).await;
    p.shutdown().await;
}

/// `imagegate serve` on `database_url`, its files in `dir` and its results in `results`.
async fn replica(dir: &Path, database_url: &str, provider: &StandIn, results: &Path) -> Served {
    let config = write_config(dir, database_url, &shared_config(provider, results));
    let mut command = binary::command(&config);
    command.arg("serve").env("TEST_PIAPI_KEY", "pk-test");
    binary::serve(command).await.into_parts()
}

#[tokio::test]
async fn two_processes_on_one_postgres_pay_once_for_a_retry_sent_to_the_other() {
    let (store, url) = crate::support::db::fresh_postgres().await;
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    provider.set_delay(PROVIDER_TAKES);
    let (dir_a, dir_b, results) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let (mut a, addr_a, log_a) = replica(dir_a.path(), &url, &provider, results.path()).await;
    let (mut b, addr_b, log_b) = replica(dir_b.path(), &url, &provider, results.path()).await;
    let issued = imagegate::auth::issue_key("two-processes");
    store.create_key(issued.new).await.expect("key");

    let first = sdk_try(
        &format!("http://{addr_a}"),
        &issued.key,
        "0",
        Some(CLIENT_GIVES_UP),
    )
    .await;
    assert!(
        first.is_err(),
        "the first try timed out on the client's side"
    );
    let retry = sdk_try(
        &format!("http://{addr_b}"),
        &issued.key,
        "1",
        Some(Duration::from_secs(10)),
    )
    .await
    .expect("retry");
    assert_eq!(retry.status(), 200);
    assert_eq!(retry.headers()["x-imagegate-duplicate"], "attached");
    let original = retry.headers()["x-imagegate-original-request-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let retry_id = retry.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert_eq!(retry.text().await.expect("body"), image_response(1, USAGE));
    assert_eq!(provider.requests().len(), 1);

    let mut rows = Vec::new();
    for _ in 0..100 {
        rows = all_rows(&*store).await;
        if !rows.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rows_now = all_rows(&*store).await;
    assert_eq!(rows_now.len(), 1, "{rows:#?}");
    assert_eq!(rows_now[0].request_id, original);

    binary::terminate(&mut a, Duration::from_secs(10)).await;
    binary::terminate(&mut b, Duration::from_secs(10)).await;
    let log_b = log_b.await.expect("log");
    let _ = log_a.await;
    // B's log links the retry to its original in one line.
    assert!(
        log_b.lines().any(|line| line.contains(&retry_id)
            && line.contains(&original)
            && line.contains("attached")),
        "{log_b}"
    );
}

#[tokio::test]
async fn a_result_the_store_cannot_take_is_dropped_and_its_retry_is_a_new_call() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    provider.set_delay(PROVIDER_TAKES);
    let p = Pair::start(&provider).await;
    // A file where the kept results' folder would be: no kept result can be written.
    std::fs::write(p._results.path().join("kept"), b"in the way").expect("block");
    let key = p.a.key.clone();
    let first = sdk_try(&base(&p.a), &key, "0", Some(CLIENT_GIVES_UP)).await;
    assert!(first.is_err(), "the client gave up before the answer");
    // The original runs to its end and is billed once; its result could not be kept.
    p.a.usage_rows(1).await;
    let started = Instant::now();
    while !calls(&p.db).await.is_empty() {
        assert!(started.elapsed() < Duration::from_secs(5), "the row goes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    provider.set_delay(Duration::ZERO);
    let retry = sdk_try(&base(&p.b), &key, "1", Some(Duration::from_secs(10)))
        .await
        .expect("retry");
    assert_eq!(retry.status(), 200);
    assert!(retry.headers().get("x-imagegate-duplicate").is_none());
    retry.bytes().await.expect("body");
    assert_eq!(
        provider.requests().len(),
        2,
        "nothing kept: the retry calls again"
    );
    let rows = settled_rows(&p.a, 2).await;
    assert_ne!(
        rows[0].request_id, rows[1].request_id,
        "one row per provider call"
    );
    p.shutdown().await;
}

#[tokio::test]
async fn without_the_database_protection_holds_on_each_replica_and_comes_back_with_it() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    provider.set_delay(PROVIDER_TAKES);
    let p = Pair::start(&provider).await;
    let key = p.a.key.clone();
    // The table is away: every read and write of calls in flight fails.
    sqlx::query("alter table calls_in_flight rename to calls_in_flight_away")
        .execute(&p.db)
        .await
        .expect("rename");
    let first = sdk_try(&base(&p.a), &key, "0", Some(CLIENT_GIVES_UP)).await;
    assert!(first.is_err());
    // A retry on the same replica still finds its original in the replica's own table...
    let same = sdk_try(&base(&p.a), &key, "1", Some(Duration::from_secs(10)))
        .await
        .expect("retry on A");
    assert_eq!(same.headers()["x-imagegate-duplicate"], "attached");
    same.bytes().await.expect("body");
    assert_eq!(provider.requests().len(), 1);
    // ...while one on the other replica cannot: a new call, not an error or a hang.
    provider.set_delay(Duration::ZERO);
    let other = sdk_try(&base(&p.b), &key, "2", Some(Duration::from_secs(10)))
        .await
        .expect("retry on B");
    assert_eq!(other.status(), 200);
    assert!(other.headers().get("x-imagegate-duplicate").is_none());
    other.bytes().await.expect("body");
    assert_eq!(provider.requests().len(), 2);

    // The table is back: with no restart, a retry on B finds an original on A again.
    sqlx::query("alter table calls_in_flight_away rename to calls_in_flight")
        .execute(&p.db)
        .await
        .expect("rename back");
    provider.set_delay(PROVIDER_TAKES);
    let body = r#"{"model":"gpt-image-1","prompt":"after the database came back"}"#;
    let first = reqwest::Client::new()
        .post(format!("{}{GEN}", base(&p.a)))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(body)
        .timeout(CLIENT_GIVES_UP)
        .send()
        .await;
    assert!(first.is_err());
    let retry = reqwest::Client::new()
        .post(format!("{}{GEN}", base(&p.b)))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .header("x-stainless-retry-count", "1")
        .body(body)
        .send()
        .await
        .expect("retry on B");
    assert_eq!(retry.headers()["x-imagegate-duplicate"], "attached");
    retry.bytes().await.expect("body");
    assert_eq!(provider.requests().len(), 3);
    settled_rows(&p.a, 3).await;
    p.shutdown().await;
}

#[tokio::test]
async fn a_running_call_of_a_replica_that_died_is_ignored_past_its_time() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let p = Pair::start(&provider).await;
    let key = p.a.key.clone();
    let key_id =
        p.a.store
            .list_keys()
            .await
            .expect("keys")
            .into_iter()
            .find(|k| k.name == "a")
            .expect("key a")
            .id;
    let fingerprint = imagegate::dedupe::Dedupe::fingerprint(
        key_id,
        imagegate::upstream::Endpoint::Generations,
        None,
        BODY.as_bytes(),
    );
    // What a replica killed mid-call leaves: a running row, past the time its call could take.
    sqlx::query(
        "insert into calls_in_flight (fingerprint, request_id, replica, state, started_at, \
         expires_at) values ($1, 'req_dead', 'dead-replica', 'running', \
         now() - interval '1 hour', now() - interval '1 minute')",
    )
    .bind(hex::encode(fingerprint))
    .execute(&p.db)
    .await
    .expect("insert");
    let started = Instant::now();
    let retry = sdk_try(&base(&p.b), &key, "1", Some(Duration::from_secs(10)))
        .await
        .expect("retry");
    assert_eq!(retry.status(), 200);
    assert!(retry.headers().get("x-imagegate-duplicate").is_none());
    retry.bytes().await.expect("body");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "not held by a dead call"
    );
    assert_eq!(provider.requests().len(), 1);
    // The sweeper (every replica's) deletes it.
    let swept = Instant::now();
    while calls(&p.db).await.iter().any(|(id, _, _)| id == "req_dead") {
        assert!(swept.elapsed() < Duration::from_secs(15), "swept");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    p.shutdown().await;
}

/// A balancer on port 0 that sends each new connection to the next of `backends` in turn.
async fn round_robin(backends: [String; 2]) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    #[expect(clippy::disallowed_methods, reason = "lives until the test ends")]
    tokio::spawn(async move {
        let mut turn = 0;
        while let Ok((mut client, _)) = listener.accept().await {
            let backend = backends[turn % 2].clone();
            turn += 1;
            #[expect(clippy::disallowed_methods, reason = "ends with its connection")]
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(&backend).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn the_python_sdk_with_default_retries_across_two_replicas_pays_once() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    // Longer than the SDK waits for a try: its first try and its first retry time out.
    provider.set_delay(Duration::from_millis(2500));
    let p = Pair::start(&provider).await;
    let balancer = round_robin([p.a.addr.to_string(), p.b.addr.to_string()]).await;
    let python = tokio::task::spawn_blocking(crate::sdk::sdk_python)
        .await
        .expect("venv");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/replicas.py");
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(format!("{balancer}/v1"))
        .arg(&p.a.key)
        .arg("1.0")
        .output()
        .await
        .expect("run the SDK script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let call: serde_json::Value = serde_json::from_str(stdout.trim()).expect("json line");
    eprintln!("the SDK through a round-robin balancer: {call}");
    assert_eq!(call["ok"], true, "{call}");
    assert_eq!(call["images"], 1);
    assert!(call["retries"].as_u64() >= Some(1), "{call}");
    assert!(
        !call["duplicate"].is_null(),
        "answered from the original: {call}"
    );
    let rows = settled_rows(&p.a, 1).await;
    eprintln!(
        "the SDK across replicas: {} provider call(s), {} usage row(s)",
        provider.requests().len(),
        rows.len()
    );
    assert_eq!(
        provider.requests().len(),
        1,
        "one provider call for every try"
    );
    p.shutdown().await;
}
