//! Replicas made visible: the heartbeat rows' store suite on both databases; two gateways on
//! one Postgres listed by `GET /admin/replicas` with a warning when their settings differ;
//! a reload written at once; `/readyz`'s `shared_state` through a database outage; and two
//! real `imagegate serve` processes on one database and one file.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use imagegate::store::{ReplicaRow, Store};
use serde_json::Value;

use crate::on_both_databases;
use crate::support::binary;
use crate::support::postgres::Cluster;
use crate::support::*;

// ---------------------------------------------------------------------------------------
// The store suite.

on_both_databases!(beats_replace_a_replicas_row_and_old_rows_are_forgotten);

async fn fresh_store(db: Db) -> (Arc<dyn Store>, Option<tempfile::TempDir>) {
    match db {
        Db::Postgres => (db::fresh_postgres().await.0, None),
        Db::Sqlite => {
            let (store, dir) = db::fresh_sqlite().await;
            (store, Some(dir))
        }
    }
}

fn at(seconds: i64, micros: u32) -> DateTime<Utc> {
    Utc.timestamp_opt(1_790_000_000 + seconds, micros * 1000)
        .single()
        .expect("time")
}

fn row(id: &str, last_seen: DateTime<Utc>, hash: &str) -> ReplicaRow {
    ReplicaRow {
        id: id.to_owned(),
        version: "1.2.3".to_owned(),
        started_at: at(0, 250),
        last_seen,
        calls_in_flight: 3,
        config_hash: hash.to_owned(),
    }
}

async fn beats_replace_a_replicas_row_and_old_rows_are_forgotten(db: Db) {
    let (store, _dir) = fresh_store(db).await;
    let long_ago = at(-3600, 0);
    assert!(store.replicas().await.expect("list").is_empty());
    let first = row("b", at(10, 123_456), "aaaa");
    store.beat(&first, long_ago).await.expect("beat");
    assert_eq!(store.replicas().await.expect("list"), [first]);
    // The same replica again: its row is replaced, not doubled.
    let again = ReplicaRow {
        calls_in_flight: 0,
        config_hash: "bbbb".into(),
        ..row("b", at(15, 1), "bbbb")
    };
    store.beat(&again, long_ago).await.expect("beat");
    let other = row("a", at(16, 0), "bbbb");
    store.beat(&other, long_ago).await.expect("beat");
    assert_eq!(
        store.replicas().await.expect("list"),
        [other.clone(), again.clone()],
        "one row per replica, by id"
    );
    // A beat forgets the rows last seen before its cutoff: "b" was last seen at 15.
    let third = row("c", at(20, 0), "bbbb");
    store.beat(&third, at(15, 2)).await.expect("beat");
    let ids: Vec<String> = store
        .replicas()
        .await
        .expect("list")
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, ["a", "c"]);
    assert!(store.forget_replica("a").await.expect("forget"));
    assert!(!store.forget_replica("a").await.expect("forget"), "gone");
    assert_eq!(store.replicas().await.expect("list"), [third]);
}

// ---------------------------------------------------------------------------------------
// GET /admin/replicas.

async fn replicas_of(gw: &TestGateway) -> Value {
    let response = gw
        .client
        .get(gw.url("/admin/replicas"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    response.json().await.expect("json")
}

/// Polls `/admin/replicas` on `gw` until `done` holds (10 s at most); the last answer.
async fn replicas_until(gw: &TestGateway, done: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    for _ in 0..100 {
        last = replicas_of(gw).await;
        if done(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("/admin/replicas never got there: {last:#}");
}

/// The replica that answered, in its own listing.
fn this(listing: &Value) -> &Value {
    let mine: Vec<&Value> = listing["data"]
        .as_array()
        .expect("list")
        .iter()
        .filter(|r| r["this"] == true)
        .collect();
    assert_eq!(mine.len(), 1, "{listing:#}");
    mine[0]
}

fn live(listing: &Value) -> u64 {
    listing["live"].as_u64().expect("live")
}

#[tokio::test]
async fn admin_replicas_lists_the_replicas_of_one_database_and_warns_when_they_differ() {
    let (store, url) = db::fresh_postgres().await;
    let config = test_config(&dead_url(), "");
    let a = TestGateway::start_on_as(&url, &config, "svc-a").await;
    // Another setting on b, as a replica left behind by a rollout would have.
    let other = config.replacen(
        "max_json_body_bytes = 65536",
        "max_json_body_bytes = 65000",
        1,
    );
    assert_ne!(other, config);
    let b = TestGateway::start_on_as(&url, &other, "svc-b").await;

    // The admin token, not a client key: OpenAI's error shape either way.
    for auth in [None, Some(a.key.as_str())] {
        let mut request = a.client.get(a.url("/admin/replicas"));
        if let Some(key) = auth {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.expect("send");
        assert_eq!(response.status(), 401);
        let body: Value = response.json().await.expect("json");
        assert!(body["error"]["message"].is_string(), "{body}");
        assert!(body["error"].get("type").is_some() && body["error"].get("code").is_some());
    }

    let seen_by_a = replicas_until(&a, |l| live(l) == 2).await;
    let seen_by_b = replicas_until(&b, |l| live(l) == 2).await;
    let (id_a, id_b) = (
        this(&seen_by_a)["id"].clone(),
        this(&seen_by_b)["id"].clone(),
    );
    assert_ne!(id_a, id_b, "each replica has its own name");
    for replica in seen_by_a["data"].as_array().expect("list") {
        assert_eq!(replica["status"], "live");
        assert_eq!(replica["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(replica["calls_in_flight"], 0);
        assert_eq!(replica["config_hash"].as_str().map(str::len), Some(16));
        for time in ["started_at", "last_seen"] {
            let text = replica[time].as_str().expect("a time");
            DateTime::parse_from_rfc3339(text).expect("RFC 3339");
        }
    }
    let warnings = seen_by_a["warnings"].as_array().expect("warnings");
    assert_eq!(warnings.len(), 1, "{seen_by_a:#}");
    let warning = warnings[0].as_str().expect("text");
    assert!(
        warning.starts_with("live replicas run 2 different settings")
            && warning.contains(id_a.as_str().expect("id"))
            && warning.contains(id_b.as_str().expect("id")),
        "{warning}"
    );
    assert_eq!(seen_by_b["warnings"], seen_by_a["warnings"]);
    assert_eq!(seen_by_a["heartbeat_seconds"], 5);

    // A replica gone without a clean stop is listed as stale, and warns of nothing.
    let now = Utc::now();
    let dead = ReplicaRow {
        id: "dead-replica".into(),
        version: "0.0.1".into(),
        started_at: now - chrono::Duration::hours(1),
        last_seen: now - chrono::Duration::minutes(1),
        calls_in_flight: 7,
        config_hash: "0123456789abcdef".into(),
    };
    store
        .beat(&dead, now - chrono::Duration::hours(1))
        .await
        .expect("beat");
    let listing = replicas_of(&a).await;
    let rows = listing["data"].as_array().expect("list");
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[2]["id"], "dead-replica", "stale ones last");
    assert_eq!(rows[2]["status"], "stale");
    assert_eq!(live(&listing), 2);
    assert_eq!(listing["warnings"].as_array().map(Vec::len), Some(1));
    // A live replica of another version.
    let newer = ReplicaRow {
        id: "newer-replica".into(),
        version: "99.0.0".into(),
        last_seen: Utc::now(),
        ..dead
    };
    store
        .beat(&newer, now - chrono::Duration::hours(1))
        .await
        .expect("beat");
    let listing = replicas_of(&a).await;
    let warnings: Vec<&str> = listing["warnings"]
        .as_array()
        .expect("warnings")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        warnings
            .iter()
            .any(|w| w.starts_with("live replicas run 3 different settings")),
        "{warnings:?}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.starts_with("live replicas run 2 different versions")
                && w.contains("99.0.0 on newer-replica")),
        "{warnings:?}"
    );
    assert!(store.forget_replica("newer-replica").await.expect("forget"));

    // A clean stop deletes the replica's row.
    b.shutdown().await;
    let listing = replicas_until(&a, |l| {
        l["data"]
            .as_array()
            .is_some_and(|rows| rows.iter().all(|r| r["id"] != id_b))
    })
    .await;
    assert_eq!(live(&listing), 1);
    assert!(listing["warnings"].as_array().expect("list").is_empty());
    a.shutdown().await;
}

#[tokio::test]
async fn a_reload_writes_the_new_settings_hash_and_the_calls_in_flight_at_once() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    // Long enough to be in flight still when the reload's beat is written, under load too
    // (the call ends at the upstream timeout, 5 s).
    provider.set_delay(Duration::from_secs(8));
    let gw = TestGateway::start(Db::Sqlite, &test_config(&provider.base_url(), "")).await;
    let before = this(&replicas_until(&gw, |l| live(l) == 1).await).clone();
    assert_eq!(before["calls_in_flight"], 0);

    // A call held by the provider, then a reload with another setting.
    let (client, url, key) = (
        gw.client.clone(),
        gw.url("/v1/images/generations"),
        gw.key.clone(),
    );
    #[expect(clippy::disallowed_methods, reason = "the test awaits it")]
    let call = tokio::spawn(async move {
        let body = serde_json::json!({"model": "gpt-image-1", "prompt": "slow"});
        let response = client.post(url).bearer_auth(key).json(&body).send().await;
        response.expect("send").status()
    });
    assert!(
        provider.wait_for_requests(1).await,
        "the call reached the provider"
    );
    let file = std::fs::read_to_string(&gw.config_path).expect("config");
    let changed = file.replacen(
        "max_json_body_bytes = 65536",
        "max_json_body_bytes = 65000",
        1,
    );
    assert_ne!(changed, file);
    std::fs::write(&gw.config_path, changed).expect("write config");
    let reloaded = gw
        .client
        .post(gw.url("/admin/reload"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("send");
    assert_eq!(reloaded.status(), 200);
    let started = std::time::Instant::now();
    // Written at the next look (every 0.5 s), not at the next heartbeat (5 s).
    let after = replicas_until(&gw, |l| this(l)["config_hash"] != before["config_hash"]).await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(this(&after)["calls_in_flight"], 1, "{after:#}");
    assert_eq!(this(&after)["started_at"], before["started_at"]);
    // Past the test config's upstream_total_timeout (5 s): 504, not a concern here.
    call.await.expect("call");
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// /readyz through an outage.

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_says_shared_state_is_degraded_while_the_database_is_lost_and_ok_once_back() {
    let cluster = Arc::new(blocking(Cluster::start).await);
    let gw = TestGateway::start_on(&cluster.url(), &test_config(&dead_url(), "")).await;
    let body = gw.readyz().await;
    assert_eq!(body["shared_state"], "ok", "{body}");
    replicas_until(&gw, |l| live(l) == 1).await;

    // The key is known to this replica before the outage (a known key is served through it).
    let models = gw.get_as(&gw.key, "/v1/models").await;
    assert_eq!(models.status(), 200);

    let c = Arc::clone(&cluster);
    blocking(move || c.stop()).await;
    let body = gw.readyz().await;
    let degraded = body["shared_state"].as_str().expect("text").to_owned();
    assert!(
        degraded.starts_with("degraded: ")
            && degraded.contains("duplicate protection is limited to this replica")
            && degraded.contains("async jobs can be neither created nor read"),
        "{body}"
    );
    assert_eq!(body["status"], "not_ready", "{body}");
    eprintln!("readyz while the database is lost: {body}");
    let response = gw
        .client
        .get(gw.url("/admin/replicas"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 503);
    let error: Value = response.json().await.expect("json");
    assert_eq!(error["error"]["code"], "not_ready", "{error}");
    assert_eq!(error["error"]["type"], "server_error", "{error}");
    // Jobs live in the database: with it lost, a job is neither created nor read, and the
    // answer says so (503 jobs_unavailable, Retry-After), never a bare 500.
    let job = async_job(&gw).await;
    assert_eq!(job.status(), 503);
    assert_eq!(job.headers()["retry-after"], "1");
    let error: Value = job.json().await.expect("json");
    assert_eq!(error["error"]["code"], "jobs_unavailable", "{error}");
    assert_eq!(error["error"]["type"], "server_error", "{error}");
    let poll = gw.get_as(&gw.key, "/v1/images/jobs/imgjob_0").await;
    assert_eq!(poll.status(), 503);
    let error: Value = poll.json().await.expect("json");
    assert_eq!(error["error"]["code"], "jobs_unavailable", "{error}");
    // Past a heartbeat or two: the failed beats are retried, never fatal.
    tokio::time::sleep(Duration::from_secs(6)).await;

    let c = Arc::clone(&cluster);
    blocking(move || c.resume()).await;
    let mut body = Value::Null;
    for _ in 0..300 {
        body = gw.readyz().await;
        if body["shared_state"] == "ok" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(body["shared_state"], "ok", "back without a restart: {body}");
    assert_eq!(body["status"], "ready", "{body}");
    // The heartbeat is written again: the replica is live, seen after the outage.
    let resumed = Utc::now();
    let listing = replicas_until(&gw, |l| {
        live(l) == 1
            && this(l)["last_seen"]
                .as_str()
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .is_some_and(|t| t > resumed)
    })
    .await;
    assert_eq!(this(&listing)["status"], "live");
    // Jobs are taken again once the database answers.
    assert_eq!(async_job(&gw).await.status(), 202);
    gw.shutdown().await;
    drop(cluster);
}

/// An async generation job posted to `gw` with its key.
async fn async_job(gw: &TestGateway) -> reqwest::Response {
    gw.client
        .post(gw.url("/v1/images/generations"))
        .bearer_auth(&gw.key)
        .header("content-type", "application/json")
        .header("prefer", "respond-async")
        .body(r#"{"model":"gpt-image-1","prompt":"a red fox"}"#)
        .send()
        .await
        .expect("reaches imagegate")
}

// ---------------------------------------------------------------------------------------
// Two real processes.

/// One file for every replica: its folders are relative, so that each process (started in
/// its own working folder) keeps its own journal and spool, as pods do, while the file's
/// settings, and so their hash, are the same.
fn shared_config(dir: &Path, database_url: &str) -> std::path::PathBuf {
    let toml = format!(
        r#"
default_model = "gpt-image-1"
[server]
listen = "127.0.0.1:0"
shutdown_grace = "5s"
journal_dir = "data/journal"
spool_dir = "data/spool"
[database]
url = "{database_url}"
[results]
url = "file://{results}"
[providers.mock]
kind = "mock"
delay = "10ms"
[models."gpt-image-1"]
routes = [{{ provider = "mock", model = "gpt-image-1" }}]
[pricing.mock."gpt-image-1"]
{prices}"#,
        results = dir.join("results").display(),
        prices = binary::TOKEN_PRICES,
    );
    let path = dir.join("imagegate.toml");
    std::fs::write(&path, toml).expect("write config");
    path
}

async fn serve_in(config: &Path, workdir: &Path) -> binary::Served {
    std::fs::create_dir_all(workdir).expect("workdir");
    let mut command = binary::command(config);
    command
        .arg("serve")
        .current_dir(workdir)
        .env("RUST_LOG", "info")
        .env("IMAGEGATE_ADMIN_TOKEN", ADMIN_TOKEN);
    binary::serve(command).await.into_parts()
}

async fn listing_at(addr: &str) -> Value {
    let response = reqwest::Client::new()
        .get(format!("http://{addr}/admin/replicas"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    response.json().await.expect("json")
}

async fn listing_until(addr: &str, done: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    for _ in 0..100 {
        last = listing_at(addr).await;
        if done(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("/admin/replicas never got there: {last:#}");
}

#[tokio::test]
async fn two_serve_processes_on_one_database_see_each_other_and_a_clean_stop_leaves() {
    let (_, url) = db::fresh_postgres().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = shared_config(dir.path(), &url);
    let (mut one, addr_one, _log_one) = serve_in(&config, &dir.path().join("one")).await;
    let (mut two, addr_two, log_two) = serve_in(&config, &dir.path().join("two")).await;

    let listing = listing_until(&addr_one, |l| live(l) == 2).await;
    assert!(
        listing["warnings"].as_array().expect("list").is_empty(),
        "one file, one version: {listing:#}"
    );
    let rows = listing["data"].as_array().expect("list");
    assert_eq!(rows[0]["config_hash"], rows[1]["config_hash"]);
    let id_two = this(&listing_at(&addr_two).await)["id"].clone();
    assert_ne!(this(&listing)["id"], id_two);
    // Each keeps its journal in its own folder.
    for name in ["one", "two"] {
        assert!(
            dir.path().join(name).join("data/journal").is_dir(),
            "{name}"
        );
    }

    let status = binary::terminate(&mut two, Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}");
    let log = log_two.await.expect("log");
    assert!(!log.contains("replica row not deleted"), "{log}");
    let listing = listing_until(&addr_one, |l| live(l) == 1).await;
    assert_eq!(
        listing["data"].as_array().map(Vec::len),
        Some(1),
        "{listing:#}"
    );
    assert!(listing["data"][0]["id"] != id_two);
    let status = binary::terminate(&mut one, Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}");
}
