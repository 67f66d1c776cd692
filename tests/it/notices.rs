//! Key changes and reloads reach every replica at once: a key created, changed or revoked
//! publishes a notice in its own transaction (both databases, one contract); replicas on
//! one Postgres drop that key from their caches when it arrives (a 300 s key cache TTL, so
//! the TTL cannot be what makes these pass); a budget reservation weighs the budget the
//! database holds, so a lowered budget holds on every replica from the PATCH's answer; a
//! reload on one replica reloads the others; the listener survives Postgres ending its
//! connection and re-reads every key after.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use imagegate::auth::issue_key;
use imagegate::store::{
    BudgetPeriod, BudgetState, KeyChanges, KeyLimits, Notice, Notices, Reservation, Reserved, Store,
};
use reqwest::Method;
use serde_json::{Value, json};

use crate::support::binary::{self, Served};
use crate::support::forms::Form;
use crate::support::gateway::write_config;
use crate::support::{
    ADMIN_TOKEN, PROVIDER_KEY, StandIn, TestGateway, USAGE, all_rows, image_response, respond,
    test_config,
};

crate::support::db::on_both_backends!(
    key_changes_and_reloads_reach_subscribers,
    a_reservation_weighs_the_key_as_stored_now,
);

/// What a replica must see a change within.
const WITHIN: Duration = Duration::from_secs(1);
/// dall-e-3 at $0.04 an image in the test config: a generation's price and worst case.
const CALL: i64 = 40_000_000;

async fn next(notices: &mut Box<dyn Notices>) -> Notice {
    tokio::time::timeout(Duration::from_secs(5), notices.next())
        .await
        .expect("a notice within 5 s")
        .expect("the subscription holds")
}

async fn nothing_more(notices: &mut Box<dyn Notices>) {
    let more = tokio::time::timeout(Duration::from_millis(300), notices.next()).await;
    assert!(more.is_err(), "unexpected notice: {more:?}");
}

fn budget(nanousd: i64, period: &str) -> KeyLimits {
    KeyLimits {
        budget_nanousd: Some(nanousd),
        budget_period: Some(period.to_owned()),
        ..KeyLimits::default()
    }
}

async fn key_changes_and_reloads_reach_subscribers(store: Arc<dyn Store>) {
    let mut notices = store.subscribe().await.expect("subscribe");
    let created = store
        .create_key(issue_key("svc").new)
        .await
        .expect("create");
    assert_eq!(next(&mut notices).await, Notice::Key { id: created.id });
    // A refused change publishes nothing: a duplicate name, a key that is not there.
    assert!(store.create_key(issue_key("svc").new).await.is_err());
    let missing = store
        .update_key("nobody", &KeyChanges::default())
        .await
        .expect("update");
    assert!(missing.is_none());
    nothing_more(&mut notices).await;

    let changes = KeyChanges {
        rpm: Some(Some(60)),
        ..KeyChanges::default()
    };
    store
        .update_key("svc", &changes)
        .await
        .expect("update")
        .expect("the key");
    assert_eq!(next(&mut notices).await, Notice::Key { id: created.id });
    assert!(store.revoke_key("svc").await.expect("revoke"));
    assert_eq!(next(&mut notices).await, Notice::Key { id: created.id });
    assert!(!store.revoke_key("svc").await.expect("revoke again"));
    store.publish_reload("replica-a").await.expect("publish");
    assert_eq!(
        next(&mut notices).await,
        Notice::Reload {
            from: "replica-a".into()
        }
    );
    nothing_more(&mut notices).await;
}

async fn a_reservation_weighs_the_key_as_stored_now(store: Arc<dyn Store>) {
    let mut issued = issue_key("capped");
    issued.new.limits = budget(3 * CALL, "month");
    let key = store.create_key(issued.new).await.expect("create");
    let now = Utc::now();
    let reservation = |id: &str| Reservation {
        request_id: id.to_owned(),
        key_id: key.id,
        amount_nanousd: CALL,
        now,
        expires_at: now + TimeDelta::minutes(5),
    };
    assert_eq!(
        store.reserve(&reservation("r1")).await.expect("r1"),
        Reserved::Granted {
            remaining_nanousd: 2 * CALL
        }
    );
    // Lowered to what is held: the next call is refused, in the key's new period.
    let lowered = KeyChanges {
        budget: Some(Some((CALL, Some("day".into())))),
        ..KeyChanges::default()
    };
    store.update_key("capped", &lowered).await.expect("lower");
    assert_eq!(
        store.reserve(&reservation("r2")).await.expect("r2"),
        Reserved::Refused {
            remaining_nanousd: 0,
            period: BudgetPeriod::Day
        }
    );
    // Raised again: granted against the new amount.
    let raised = KeyChanges {
        budget: Some(Some((4 * CALL, None))),
        ..KeyChanges::default()
    };
    store.update_key("capped", &raised).await.expect("raise");
    assert_eq!(
        store.reserve(&reservation("r3")).await.expect("r3"),
        Reserved::Granted {
            remaining_nanousd: 2 * CALL
        }
    );
    // Cleared: nothing to hold. Revoked: refused, and nothing held either.
    let cleared = KeyChanges {
        budget: Some(None),
        ..KeyChanges::default()
    };
    store.update_key("capped", &cleared).await.expect("clear");
    assert_eq!(
        store.reserve(&reservation("r4")).await.expect("r4"),
        Reserved::Unlimited
    );
    store
        .update_key("capped", &raised)
        .await
        .expect("set again");
    assert!(store.revoke_key("capped").await.expect("revoke"));
    assert_eq!(
        store.reserve(&reservation("r5")).await.expect("r5"),
        Reserved::KeyRevoked
    );
    let held = store
        .budget_state(key.id)
        .await
        .expect("state")
        .expect("a budget row");
    assert_eq!(held.reserved_nanousd, 2 * CALL, "r1 and r3 only: {held:?}");
}

/// The test config with a key cache TTL far longer than any wait here, and one result
/// store for every replica (under `shared`).
fn replica_config(provider: &StandIn, shared: &Path) -> String {
    test_config(
        &provider.base_url(),
        &format!(
            "[limits]\nmax_in_flight_per_key = 256\n\n[results]\nurl = \"file://{}\"\n",
            shared.display()
        ),
    )
    .replace("key_cache_ttl = \"1s\"", "key_cache_ttl = \"300s\"")
}

/// Two replicas A and B on one fresh Postgres; each has a key of its own ("a", "b").
struct Pair {
    a: TestGateway,
    b: TestGateway,
    url: String,
    store: Arc<dyn Store>,
    provider: StandIn,
    _shared: tempfile::TempDir,
}

/// How many connections of the database `url` names are listening for notices.
async fn listening(db: &sqlx::PgPool) -> i64 {
    let (n,): (i64,) = sqlx::query_as(
        "select count(*) from pg_stat_activity \
         where datname = current_database() and query like 'LISTEN%'",
    )
    .fetch_one(db)
    .await
    .expect("count listeners");
    n
}

/// Waits until `n` replicas listen on the database `url` names. A listener drops every
/// cached key when it starts: a test warms caches after that, so that only a notice can
/// drop what it cached.
async fn listeners_up(url: &str, n: i64) {
    let db = sqlx::PgPool::connect(url).await.expect("connect");
    let since = Instant::now();
    while listening(&db).await < n {
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "replicas not listening"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    db.close().await;
}

async fn pair(provider: StandIn) -> Pair {
    let (store, url) = crate::support::db::fresh_postgres().await;
    let shared = tempfile::tempdir().expect("shared results");
    let config = replica_config(&provider, shared.path());
    let a = TestGateway::start_on_as(&url, &config, "a").await;
    let b = TestGateway::start_on_as(&url, &config, "b").await;
    listeners_up(&url, 2).await;
    Pair {
        a,
        b,
        url,
        store,
        provider,
        _shared: shared,
    }
}

async fn admin(gw: &TestGateway, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = gw
        .client
        .request(method, gw.url(path))
        .bearer_auth(ADMIN_TOKEN);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("admin call");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The status of a model listing with `key` on `base` (`http://host:port`): what the door
/// says of the key, at no cost.
async fn door(client: &reqwest::Client, base: &str, key: &str) -> u16 {
    client
        .get(format!("{base}/v1/models"))
        .bearer_auth(key)
        .send()
        .await
        .expect("models")
        .status()
        .as_u16()
}

/// How long after `since` the door of `base` first refused `key` (polled every 5 ms, for at
/// most 10 s).
async fn refused_after(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    since: Instant,
) -> Duration {
    loop {
        if door(client, base, key).await == 401 {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "the key is still served after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_key_revoked_through_a_is_refused_by_b_within_a_second() {
    let p = pair(StandIn::json(200, &image_response(1, USAGE)).await).await;
    let b = p.b.url("");
    // B knows the key (cached for 300 s) before it is revoked.
    assert_eq!(door(&p.b.client, &b, &p.a.key).await, 200);
    let (status, body) = admin(&p.a, Method::DELETE, "/admin/keys/a", None).await;
    assert_eq!(status, 200, "{body}");
    let revoked = Instant::now();
    let delay = refused_after(&p.b.client, &b, &p.a.key, revoked).await;
    eprintln!("revoked through A's admin API: B refused the key after {delay:?}");
    assert!(delay < WITHIN, "{delay:?}");
    // B's own key is untouched.
    assert_eq!(door(&p.b.client, &b, &p.b.key).await, 200);
}

#[tokio::test]
async fn a_key_revoked_through_the_cli_is_refused_by_b_within_a_second() {
    let p = pair(StandIn::json(200, &image_response(1, USAGE)).await).await;
    let b = p.b.url("");
    assert_eq!(door(&p.b.client, &b, &p.a.key).await, 200);
    let mut revoke = tokio::process::Command::from(binary::command(&p.a.config_path));
    revoke
        .args(["keys", "revoke", "a"])
        .env("TEST_PIAPI_KEY", PROVIDER_KEY);
    let out = revoke.output().await.expect("imagegate keys revoke");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let revoked = Instant::now();
    let delay = refused_after(&p.b.client, &b, &p.a.key, revoked).await;
    eprintln!("revoked through the CLI: B refused the key after {delay:?}");
    assert!(delay < WITHIN, "{delay:?}");
}

#[tokio::test]
async fn the_listener_reconnects_after_postgres_ends_its_connection_and_rereads_keys() {
    let p = pair(StandIn::json(200, &image_response(1, USAGE)).await).await;
    let b = p.b.url("");
    assert_eq!(door(&p.b.client, &b, &p.a.key).await, 200);
    let db = sqlx::PgPool::connect(&p.url).await.expect("connect");
    assert_eq!(listening(&db).await, 2, "one listener per replica");
    // A revocation no notice announces (written past the store, as if its notice had been
    // published while B's listener was away): only B's re-reading after it reconnects can
    // see it.
    sqlx::query("update api_keys set revoked_at = now() where name = 'a'")
        .execute(&db)
        .await
        .expect("revoke silently");
    assert_eq!(
        door(&p.b.client, &b, &p.a.key).await,
        200,
        "cached for 300 s"
    );
    let terminated = Instant::now();
    let (ended,): (i64,) = sqlx::query_as(
        "select count(*) from (select pg_terminate_backend(pid) from pg_stat_activity \
         where datname = current_database() and query like 'LISTEN%') t",
    )
    .fetch_one(&db)
    .await
    .expect("terminate the listeners");
    assert_eq!(ended, 2);
    let delay = refused_after(&p.b.client, &b, &p.a.key, terminated).await;
    eprintln!("listeners terminated: B re-read the key after {delay:?}");
    assert!(delay < Duration::from_secs(2), "{delay:?}");
    while listening(&db).await < 2 {
        assert!(
            terminated.elapsed() < Duration::from_secs(10),
            "no reconnect"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "both listeners listening again {:?} after they were terminated",
        terminated.elapsed()
    );
    // Notices are heard again: B's own key, revoked through A.
    assert_eq!(door(&p.b.client, &b, &p.b.key).await, 200);
    let (status, _) = admin(&p.a, Method::DELETE, "/admin/keys/b", None).await;
    assert_eq!(status, 200);
    let delay = refused_after(&p.b.client, &b, &p.b.key, Instant::now()).await;
    eprintln!("after the reconnect: B refused a key revoked through A after {delay:?}");
    assert!(delay < WITHIN, "{delay:?}");
    db.close().await;
}

/// One call made on B during the budget test: when it started and ended, how it was
/// answered.
#[derive(Debug)]
struct Made {
    started: Instant,
    status: u16,
    code: Value,
}

/// A request of the budget test: a JSON generation, or a multipart edit in the Python
/// SDK's field order (`n` after `model`, so its hold is raised as the upload arrives).
#[derive(Clone, Copy, Debug)]
enum Kind {
    Generation,
    Edit,
}

async fn call(gw: &TestGateway, key: &str, kind: Kind) -> (u16, Value) {
    let response = match kind {
        Kind::Generation => {
            let body = json!({"model": "dall-e-3", "prompt": "a lighthouse"}).to_string();
            gw.post_json_as(key, "/v1/images/generations", &body).await
        }
        Kind::Edit => {
            let form = Form::new()
                .text("prompt", "a lighthouse")
                .text("model", "dall-e-2")
                .text("n", "2")
                .text("size", "256x256")
                .image();
            gw.post_form_as(key, "/v1/images/edits", &form).await
        }
    };
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn settled(store: &dyn Store, key_id: i64) -> BudgetState {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let state = store
            .budget_state(key_id)
            .await
            .expect("budget state")
            .expect("a budget row");
        if state.reserved_nanousd == 0 || Instant::now() > deadline {
            return state;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A's key gets a budget of $2, spends some of it through A, then calls run on B without
/// pause while the budget is lowered through A to what was spent: every call B starts
/// after the PATCH answered is refused, and what is billed past the new budget is what
/// B's calls held before it answered.
async fn a_budget_lowered_through_a_holds_on_b_from_the_patch_answer(kind: Kind) {
    // As many images as asked for: one a generation, two an edit ($0.04 either way).
    let images = match kind {
        Kind::Generation => 1,
        Kind::Edit => 2,
    };
    let provider =
        StandIn::start(move |_| respond(200, "application/json", image_response(images, USAGE)))
            .await;
    provider.set_delay(Duration::from_millis(100));
    let p = pair(provider).await;
    let limit = json!({"budget_usd": 2.0, "budget_period": "total"});
    let (status, body) = admin(&p.a, Method::PATCH, "/admin/keys/a", Some(limit)).await;
    assert_eq!(status, 200, "{body}");
    let key_id = p
        .store
        .list_keys()
        .await
        .expect("keys")
        .into_iter()
        .find(|k| k.name == "a")
        .expect("key a")
        .id;
    for _ in 0..3 {
        let (status, body) = call(&p.a, &p.a.key, kind).await;
        assert_eq!(status, 200, "{body}");
    }
    let spent = settled(&*p.store, key_id).await.spent_nanousd;
    assert!(spent > 0);
    // B knows the key and its $2 budget before the load.
    assert_eq!(door(&p.b.client, &p.b.url(""), &p.a.key).await, 200);

    let lowered = Arc::new(tokio::sync::OnceCell::<Instant>::new());
    let answered_ok = Arc::new(AtomicUsize::new(0));
    let workers = (0..6).map(|_| {
        let (b, key, lowered) = (&p.b, p.a.key.clone(), Arc::clone(&lowered));
        let answered_ok = Arc::clone(&answered_ok);
        async move {
            let mut made: Vec<Made> = Vec::new();
            // Until a second past the PATCH's answer, and at least one call started after it
            // (however slow the calls are on a busy machine).
            loop {
                if let Some(at) = lowered.get() {
                    if Instant::now() >= *at + WITHIN && made.iter().any(|m| m.started >= *at) {
                        break;
                    }
                }
                let started = Instant::now();
                let (status, body) = call(b, &key, kind).await;
                if status == 200 {
                    answered_ok.fetch_add(1, Ordering::Relaxed);
                }
                made.push(Made {
                    started,
                    status,
                    code: body["error"]["code"].clone(),
                });
            }
            made
        }
    });
    let patch = async {
        // Calls of B have been granted, and more are in flight, when the budget is lowered.
        let since = Instant::now();
        while answered_ok.load(Ordering::Relaxed) < 2 {
            assert!(
                since.elapsed() < Duration::from_secs(20),
                "B answers nothing"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let cut = json!({"budget_usd": spent as f64 / 1e9});
        let (status, body) = admin(&p.a, Method::PATCH, "/admin/keys/a", Some(cut)).await;
        let answered = Instant::now();
        let answered_at = Utc::now();
        assert_eq!(status, 200, "{body}");
        lowered.set(answered).expect("once");
        answered_at
    };
    let (made, answered_at) = tokio::join!(futures_util::future::join_all(workers), patch);
    let made: Vec<Made> = made.into_iter().flatten().collect();
    let answered = *lowered.get().expect("patched");

    let (before, after): (Vec<&Made>, Vec<&Made>) = made.iter().partition(|m| m.started < answered);
    let granted_before = before.iter().filter(|m| m.status == 200).count();
    let granted_after = after.iter().filter(|m| m.status == 200).count();
    eprintln!(
        "{kind:?}: B made {} calls before the PATCH answered ({granted_before} granted) and {} after ({granted_after} granted)",
        before.len(),
        after.len()
    );
    assert!(after.len() >= 6, "B kept calling after the PATCH: {made:?}");
    assert!(
        granted_before > 0,
        "B's calls ran before the PATCH: {made:?}"
    );
    for m in &after {
        assert_eq!(
            (m.status, m.code.as_str()),
            (429, Some("insufficient_quota")),
            "{m:?}"
        );
    }
    let state = settled(&*p.store, key_id).await;
    let rows = all_rows(&*p.store).await;
    let billed_rows: Vec<_> = rows
        .iter()
        .filter(|r| r.key_id == key_id && r.cost_nanousd.is_some_and(|c| c > 0))
        .collect();
    let billed: i64 = billed_rows.iter().filter_map(|r| r.cost_nanousd).sum();
    let worst = CALL;
    let overspend_after = billed_rows
        .iter()
        .filter(|r| r.created_at >= answered_at)
        .count();
    eprintln!(
        "{kind:?}: budget lowered to {spent} nano-USD; billed {billed} in all, of which {} by calls B held before the PATCH answered; rows of calls started after it: {overspend_after}",
        billed - spent
    );
    assert_eq!(overspend_after, 0, "{billed_rows:#?}");
    assert_eq!(billed_rows.len(), 3 + granted_before, "{billed_rows:#?}");
    assert!(
        billed <= spent + granted_before as i64 * worst,
        "billed {billed}, spent before {spent}"
    );
    assert_eq!((state.spent_nanousd, state.reserved_nanousd), (billed, 0));
    // An edit granted before the PATCH answered whose `n` arrived after it was cut before
    // its body ended (its raised hold refused): the provider got no whole request of it.
    assert_eq!(p.provider.complete_requests().len(), 3 + granted_before);
}

#[tokio::test]
async fn a_budget_lowered_through_a_holds_on_b_for_generations() {
    a_budget_lowered_through_a_holds_on_b_from_the_patch_answer(Kind::Generation).await;
}

#[tokio::test]
async fn a_budget_lowered_through_a_holds_on_b_for_edits_in_the_sdks_field_order() {
    a_budget_lowered_through_a_holds_on_b_from_the_patch_answer(Kind::Edit).await;
}

/// `imagegate serve` for one replica in `dir`, on `url`, with `config`.
async fn replica(dir: &Path, url: &str, config: &str) -> (Served, std::path::PathBuf) {
    let path = write_config(dir, url, config);
    let mut command = binary::command(&path);
    command
        .arg("serve")
        .env("TEST_PIAPI_KEY", PROVIDER_KEY)
        .env("IMAGEGATE_ADMIN_TOKEN", ADMIN_TOKEN);
    (binary::serve(command).await.into_parts(), path)
}

/// The hashes `/metrics` of `addr` shows for `imagegate_config_info`, with their values.
async fn config_hashes(client: &reqwest::Client, addr: &str) -> Vec<(String, f64)> {
    let text = client
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("imagegate_config_info{hash=\"")?;
            let (hash, value) = rest.split_once("\"} ")?;
            Some((hash.to_owned(), value.trim().parse().expect("value")))
        })
        .collect()
}

/// The hash of the configuration in force at `addr` (during a reload, both the old and the
/// new one show 1 for an instant: asked again then).
async fn config_hash(client: &reqwest::Client, addr: &str) -> String {
    for _ in 0..100 {
        let hashes = config_hashes(client, addr).await;
        let current: Vec<_> = hashes.iter().filter(|(_, v)| *v == 1.0).collect();
        if let [(hash, _)] = current[..] {
            return hash.clone();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{addr} shows no single configuration hash");
}

/// Two `imagegate serve` processes on one Postgres: a revocation through A's admin API
/// reaches B, and a reload on A reloads B (and a file B refuses leaves B as it was).
#[tokio::test]
async fn two_processes_share_revocations_and_reloads() {
    let (store, url) = crate::support::db::fresh_postgres().await;
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let shared = tempfile::tempdir().expect("shared results");
    // One worker: a reload builds each provider's client once per worker, which is most of
    // what a reload costs in a debug build on a shared machine.
    let config = replica_config(&provider, shared.path()).replacen(
        "[server]\n",
        "[server]\nworkers = 1\n",
        1,
    );
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let ((mut a, addr_a, _), path_a) = replica(dir_a.path(), &url, &config).await;
    let ((mut b, addr_b, log_b), path_b) = replica(dir_b.path(), &url, &config).await;
    let issued = issue_key("a");
    store.create_key(issued.new).await.expect("create key");
    let key = issued.key;
    listeners_up(&url, 2).await;
    let client = reqwest::Client::new();
    let (base_a, base_b) = (format!("http://{addr_a}"), format!("http://{addr_b}"));
    assert_eq!(door(&client, &base_a, &key).await, 200);
    assert_eq!(door(&client, &base_b, &key).await, 200);

    // A reload on A: both files gained a model alias.
    let hash_b = config_hash(&client, &addr_b).await;
    for path in [&path_a, &path_b] {
        let text = std::fs::read_to_string(path).expect("config");
        let text = text.replace(
            r#"aliases = ["img-default"]"#,
            r#"aliases = ["img-default", "img-new"]"#,
        );
        std::fs::write(path, text).expect("write config");
    }
    let asked = Instant::now();
    let reload = client
        .post(format!("{base_a}/admin/reload"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("reload");
    assert_eq!(reload.status(), 200);
    let reloaded = Instant::now();
    // What a reload itself takes here (most of it building the providers' clients, slow in
    // a debug build): B's takes as long after the notice reaches it.
    let reload_cost = asked.elapsed();
    let body: Value = reload.json().await.expect("json");
    assert_eq!(body["other_replicas"], "asked", "{body}");
    let hash_a = body["config_hash"].as_str().expect("hash").to_owned();
    assert_eq!(config_hash(&client, &addr_a).await, hash_a);
    assert!(
        body["replica"].as_str().is_some_and(|r| !r.is_empty()),
        "{body}"
    );
    let new_hash_b = loop {
        let now = config_hash(&client, &addr_b).await;
        if now != hash_b {
            break now;
        }
        assert!(reloaded.elapsed() < 10 * WITHIN, "B did not reload");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let delay = reloaded.elapsed();
    eprintln!(
        "reload on A: B had reloaded {delay:?} after A answered (a reload takes {reload_cost:?} here)"
    );
    assert!(delay < WITHIN + reload_cost, "{delay:?}");
    let models_b = crate::support::model_ids(&client, &format!("{base_b}/v1/models"), &key).await;
    assert!(models_b.iter().any(|m| m == "img-new"), "{models_b:?}");

    // A file B refuses: B warns and keeps the configuration in force.
    std::fs::write(&path_b, "[server]\nlisten = \"nowhere\"\n").expect("break B's file");
    let reload = client
        .post(format!("{base_a}/admin/reload"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("reload");
    assert_eq!(reload.status(), 200);

    // A revocation through A's admin API.
    let revoke = client
        .delete(format!("{base_a}/admin/keys/a"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("revoke");
    assert_eq!(revoke.status(), 200);
    let delay = refused_after(&client, &base_b, &key, Instant::now()).await;
    eprintln!("two processes: B refused a key revoked through A after {delay:?}");
    assert!(delay < WITHIN, "{delay:?}");
    assert_eq!(config_hash(&client, &addr_b).await, new_hash_b);
    // B counted both reloads it was asked for: the one applied, the one refused.
    let notice = |result: &str| {
        format!("imagegate_config_reloads_total{{trigger=\"notice\",result=\"{result}\"}} 1")
    };
    let metrics_b = client
        .get(format!("{base_b}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for series in [notice("applied"), notice("refused")] {
        assert!(
            metrics_b.lines().any(|l| l == series),
            "{series} in:\n{metrics_b}"
        );
    }

    for child in [&mut a, &mut b] {
        binary::terminate(child, Duration::from_secs(10)).await;
    }
    let log_b = log_b.await.expect("B's log");
    assert!(
        log_b.contains("another replica asked for a reload")
            && log_b.contains("the configuration in force stays"),
        "{log_b}"
    );
}
