//! Budgets per key: a call's worst case is reserved before it is sent, refused with OpenAI's
//! `insufficient_quota` when the budget cannot hold it, and settled to the real cost with
//! its usage row; on one node (both databases) and across replicas sharing Postgres.

use std::path::Path;
use std::time::{Duration, Instant};

use imagegate::auth::issue_key;
use imagegate::store::{BudgetState, KeyLimits, Store};
use imagegate::usage::Outcome;
use serde_json::Value;

use crate::support::binary::{self, Served, signal};
use crate::support::gateway::{TestGateway, all_rows, write_config};
use crate::support::standin::{StandIn, USAGE, image_response, respond};
use crate::support::{Db, PROVIDER_KEY, test_config};

/// One call's price in the configs below: dall-e-3 at $0.04 per image, one image a call,
/// which is also its worst case.
const CALL: i64 = 40_000_000;
const BODY: &str = r#"{"model":"dall-e-3","prompt":"a lighthouse at dusk"}"#;

crate::on_both_databases!(
    a_key_over_its_budget_gets_insufficient_quota_and_nothing_is_forwarded,
    a_failed_call_gives_its_hold_back,
    a_key_with_a_budget_may_not_use_an_unpriced_model,
);

fn ok_standin_handler() -> impl Fn(&crate::support::standin::Received) -> axum::response::Response {
    |_| respond(200, "application/json", image_response(1, USAGE))
}

/// Creates a key with a budget of `calls` calls in `period` in `store`; returns the key.
async fn budgeted_key(store: &dyn Store, name: &str, calls: i64, period: &str) -> (String, i64) {
    let mut issued = issue_key(name);
    issued.new.limits = KeyLimits {
        budget_nanousd: Some(calls * CALL),
        budget_period: Some(period.to_owned()),
        ..KeyLimits::default()
    };
    let record = store.create_key(issued.new).await.expect("create key");
    (issued.key, record.id)
}

async fn generate(client: &reqwest::Client, base: &str, key: &str) -> (u16, Value, Option<String>) {
    let response = client
        .post(format!("{base}/v1/images/generations"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(BODY)
        .send()
        .await
        .expect("imagegate answers");
    let status = response.status().as_u16();
    let retry = response
        .headers()
        .get("x-should-retry")
        .map(|v| v.to_str().expect("ascii").to_owned());
    (status, response.json().await.expect("json body"), retry)
}

/// Waits until the key's budget has nothing reserved (every call settled), and returns it.
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

async fn a_key_over_its_budget_gets_insufficient_quota_and_nothing_is_forwarded(db: Db) {
    let provider = StandIn::start(ok_standin_handler()).await;
    let gw = TestGateway::start(db, &test_config(&provider.base_url(), "")).await;
    let (key, key_id) = budgeted_key(&*gw.store, "capped", 2, "day").await;
    let base = gw.url("");
    let base = base.as_str();

    for _ in 0..2 {
        let (status, body, _) = generate(&gw.client, base, &key).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, body, retry) = generate(&gw.client, base, &key).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
    assert_eq!(body["error"]["type"], "insufficient_quota", "{body}");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("$0.04") && message.contains("day"),
        "{message}"
    );
    // The SDKs retry a 429 unless told not to: a spent budget stays spent.
    assert_eq!(retry.as_deref(), Some("false"));

    assert_eq!(
        provider.requests().len(),
        2,
        "the refused call reached no provider"
    );
    let rows = gw.usage_rows(2).await;
    assert!(
        rows.iter().all(|r| r.cost_nanousd == Some(CALL)),
        "{rows:#?}"
    );
    let state = settled(&*gw.store, key_id).await;
    assert_eq!((state.spent_nanousd, state.reserved_nanousd), (2 * CALL, 0));
    // The test gateway's own key has no budget: it is not limited.
    let (status, _, _) = generate(&gw.client, base, &gw.key).await;
    assert_eq!(status, 200);
    gw.shutdown().await;
}

async fn a_failed_call_gives_its_hold_back(db: Db) {
    let provider = StandIn::start(|_| {
        respond(
            400,
            "application/json",
            r#"{"error":{"message":"no","type":"invalid_request_error","param":null,"code":null}}"#,
        )
    })
    .await;
    let gw = TestGateway::start(db, &test_config(&provider.base_url(), "")).await;
    let (key, key_id) = budgeted_key(&*gw.store, "one-call", 1, "month").await;
    let base = gw.url("");
    let base = base.as_str();

    // Refused by the provider: the row costs nothing, and the hold goes back to the budget.
    let (status, body, _) = generate(&gw.client, base, &key).await;
    assert_eq!(status, 400, "{body}");
    gw.usage_rows(1).await;
    assert_eq!(settled(&*gw.store, key_id).await.spent_nanousd, 0);

    provider.set_handler(ok_standin_handler());
    let (status, body, _) = generate(&gw.client, base, &key).await;
    assert_eq!(status, 200, "the budget holds one call again: {body}");
    gw.usage_rows(2).await;
    let state = settled(&*gw.store, key_id).await;
    assert_eq!((state.spent_nanousd, state.reserved_nanousd), (CALL, 0));
    gw.shutdown().await;
}

async fn a_key_with_a_budget_may_not_use_an_unpriced_model(db: Db) {
    let provider = StandIn::start(ok_standin_handler()).await;
    let unpriced = r#"
[models."no-price"]
routes = [{ provider = "piapi", model = "no-price" }]

[pricing.piapi."no-price"]
unpriced = true
"#;
    let gw = TestGateway::start(db, &test_config(&provider.base_url(), unpriced)).await;
    let (key, _) = budgeted_key(&*gw.store, "capped", 100, "total").await;
    let body = r#"{"model":"no-price","prompt":"a lighthouse"}"#;
    let refused = gw.post_json_as(&key, "/v1/images/generations", body).await;
    assert_eq!(refused.status(), 403);
    let error: Value = refused.json().await.expect("json");
    assert_eq!(error["error"]["code"], "model_unpriced", "{error}");
    assert_eq!(error["error"]["param"], "model", "{error}");
    assert!(provider.requests().is_empty(), "nothing forwarded");
    // A key without a budget uses it, and its row has no cost.
    let served = gw.post_json("/v1/images/generations", body).await;
    assert_eq!(served.status(), 200);
    let rows = gw.usage_rows(1).await;
    assert_eq!(rows[0].cost_nanousd, None);
    gw.shutdown().await;
}

/// Starts `imagegate serve` on `database_url` in `dir`, in front of `provider`, with
/// upstream calls cut after `total_timeout` and budget holds kept `grace` past that.
async fn replica(
    dir: &Path,
    database_url: &str,
    provider: &StandIn,
    total_timeout: &str,
    grace: &str,
) -> Served {
    let toml = test_config(
        &provider.base_url(),
        // Room for every call of the load at once: only the budget may refuse.
        &format!("[limits]\nbudget_hold_grace = \"{grace}\"\nmax_in_flight_per_key = 256\n"),
    )
    .replace(
        "upstream_total_timeout = \"5s\"",
        &format!("upstream_total_timeout = \"{total_timeout}\""),
    );
    let config = write_config(dir, database_url, &toml);
    let mut command = binary::command(&config);
    command
        .arg("serve")
        .env("TEST_PIAPI_KEY", PROVIDER_KEY)
        .env("IMAGEGATE_ADMIN_TOKEN", crate::support::ADMIN_TOKEN);
    binary::serve(command).await.into_parts()
}

#[tokio::test]
async fn two_replicas_on_one_postgres_grant_exactly_the_budget() {
    let (store, url) = crate::support::db::fresh_postgres().await;
    let provider = StandIn::start(ok_standin_handler()).await;
    // Long enough that many calls overlap on both replicas.
    provider.set_delay(Duration::from_millis(200));
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let (mut a, addr_a, _) = replica(dir_a.path(), &url, &provider, "30s", "60s").await;
    let (mut b, addr_b, _) = replica(dir_b.path(), &url, &provider, "30s", "60s").await;
    let (key, key_id) = budgeted_key(&*store, "fifty", 50, "total").await;

    let client = reqwest::Client::new();
    // Each replica checks the new key once before the burst (a model list costs nothing):
    // the burst is about budgets, not about a cold key cache.
    for addr in [&addr_a, &addr_b] {
        let models = client
            .get(format!("http://{addr}/v1/models"))
            .bearer_auth(&key)
            .send()
            .await
            .expect("models");
        assert_eq!(models.status(), 200);
    }
    let calls = (0..200).map(|i| {
        let base = format!("http://{}", if i % 2 == 0 { &addr_a } else { &addr_b });
        let (client, key) = (client.clone(), key.clone());
        async move { generate(&client, &base, &key).await }
    });
    let answers = futures_util::future::join_all(calls).await;
    let ok = answers
        .iter()
        .filter(|(status, _, _)| *status == 200)
        .count();
    let refused = answers
        .iter()
        .filter(|(status, body, _)| *status == 429 && body["error"]["code"] == "insufficient_quota")
        .count();
    eprintln!("two replicas: {ok} succeeded, {refused} refused (insufficient_quota)");
    let others: Vec<_> = answers
        .iter()
        .filter(|(status, _, _)| *status != 200 && *status != 429)
        .collect();
    assert_eq!((ok, refused), (50, 150), "{others:?}");
    assert_eq!(provider.requests().len(), 50);

    let state = settled(&*store, key_id).await;
    let rows = all_rows(&*store).await;
    let billed: i64 = rows.iter().filter_map(|r| r.cost_nanousd).sum();
    eprintln!(
        "settled: spent {} nano-USD, reserved {}, rows billed {billed}, budget {}",
        state.spent_nanousd,
        state.reserved_nanousd,
        50 * CALL
    );
    assert_eq!(rows.len(), 50);
    assert_eq!(
        (state.spent_nanousd, state.reserved_nanousd),
        (50 * CALL, 0)
    );
    assert_eq!(billed, 50 * CALL);
    for child in [&mut a, &mut b] {
        signal(child, "-TERM");
        child.wait().await.expect("exits");
    }
}

#[tokio::test]
async fn a_killed_replicas_holds_are_released_after_their_deadline_and_its_rows_recovered() {
    let (store, url) = crate::support::db::fresh_postgres().await;
    let fast = StandIn::start(ok_standin_handler()).await;
    let slow = StandIn::start(ok_standin_handler()).await;
    slow.set_delay(Duration::from_secs(60));
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let (mut a, addr_a, _) = replica(dir_a.path(), &url, &fast, "3s", "3s").await;
    let (b, addr_b, _) = replica(dir_b.path(), &url, &slow, "3s", "3s").await;
    let (key, key_id) = budgeted_key(&*store, "four", 4, "total").await;
    let client = reqwest::Client::new();

    // Three calls in flight on B, which dies with them (their clients see the connection
    // close).
    let held_at = Instant::now();
    let in_flight = futures_util::future::join_all((0..3).map(|_| {
        client
            .post(format!("http://{addr_b}/v1/images/generations"))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(BODY)
            .send()
    }));
    let kill = async {
        assert!(slow.wait_for_requests(3).await, "B sent its three calls");
        signal(&b, "-KILL");
    };
    let ((), cut) = tokio::join!(kill, in_flight);
    assert!(cut.iter().all(Result::is_err), "{cut:?}");
    let mut b = b;
    b.wait().await.expect("B is gone");

    // B's holds still count until their deadline (3 s + 3 s): one call is left on A.
    let base_a = format!("http://{addr_a}");
    let (status, body, _) = generate(&client, &base_a, &key).await;
    assert_eq!(status, 200, "{body}");
    let (status, body, _) = generate(&client, &base_a, &key).await;
    assert!(
        held_at.elapsed() < Duration::from_secs(6),
        "the machine was too slow to see the holds live"
    );
    assert_eq!(status, 429, "{body}");

    // Past it, A releases them with its next reservation.
    tokio::time::sleep(Duration::from_secs(6).saturating_sub(held_at.elapsed())).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body, _) = generate(&client, &base_a, &key).await;
    assert_eq!(status, 200, "{body}");
    let state = settled(&*store, key_id).await;
    assert_eq!((state.spent_nanousd, state.reserved_nanousd), (2 * CALL, 0));

    // B, started again on its journal, books its three calls as interrupted, at their
    // worst case: no row is lost, and they count as spent.
    let (mut b, _, _) = replica(dir_b.path(), &url, &slow, "3s", "3s").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let rows = loop {
        let rows = all_rows(&*store).await;
        if rows.len() >= 5 || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let interrupted = rows
        .iter()
        .filter(|r| r.outcome == Outcome::Interrupted)
        .count();
    assert_eq!((rows.len(), interrupted), (5, 3), "{rows:#?}");
    let state = settled(&*store, key_id).await;
    assert_eq!((state.spent_nanousd, state.reserved_nanousd), (5 * CALL, 0));
    for child in [&mut a, &mut b] {
        signal(child, "-TERM");
        child.wait().await.expect("exits");
    }
}

/// A reservation the call stopped waiting for (its key's row locked past the 5 s a call
/// waits: 503 `budget_unavailable`, nothing sent) still lands once the lock goes; it is
/// given back within seconds instead of holding the budget until its deadline.
#[tokio::test]
async fn a_reservation_given_up_on_is_released_when_it_lands() {
    use sqlx::{Connection, Executor};

    let (store, url) = crate::support::db::fresh_postgres().await;
    let provider = StandIn::start(ok_standin_handler()).await;
    let gw = TestGateway::start_on(&url, &test_config(&provider.base_url(), "")).await;
    let (key, key_id) = budgeted_key(&*store, "locked-out", 2, "total").await;
    let base = gw.url("");
    let (status, body, _) = generate(&gw.client, &base, &key).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(settled(&*store, key_id).await.spent_nanousd, CALL);

    let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
    let mut lock = conn.begin().await.expect("begin");
    lock.execute(
        sqlx::query("select 1 from budget_state where key_id = $1 for update").bind(key_id),
    )
    .await
    .expect("lock the key's budget row");
    let (status, body, _) = generate(&gw.client, &base, &key).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "budget_unavailable", "{body}");
    lock.commit().await.expect("unlock");

    // The queued reservation is granted now (at once), then released by the call that gave
    // up on it (its first try is a second after the 503).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut landed = false;
    let state = loop {
        let state = store
            .budget_state(key_id)
            .await
            .expect("budget state")
            .expect("a budget row");
        landed |= state.reserved_nanousd == CALL;
        if (landed && state.reserved_nanousd == 0) || Instant::now() > deadline {
            break state;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        landed,
        "the reservation queued on the lock was granted when it went"
    );
    assert_eq!((state.spent_nanousd, state.reserved_nanousd), (CALL, 0));
    let (status, body, _) = generate(&gw.client, &base, &key).await;
    assert_eq!(status, 200, "the second call fits the budget again: {body}");
    assert_eq!(provider.requests().len(), 2);
    gw.shutdown().await;
}

/// A key with a budget whose call fails at a priced route, and would fail over to a route
/// without a price (which a budget cannot hold), gets the first provider's error: not the
/// 403 of a route it could never use.
#[tokio::test]
async fn a_route_the_budget_cannot_use_does_not_hide_the_first_failure() {
    let failing = StandIn::start(|_| {
        respond(
            503,
            "application/json",
            r#"{"error":{"message":"overloaded","type":"server_error","param":null,"code":null}}"#,
        )
    })
    .await;
    let backup = StandIn::start(ok_standin_handler()).await;
    let extra = format!(
        r#"
[providers.backup]
base_url = "{}"
api_key_env = "TEST_PIAPI_KEY"

[models."two-routes"]
routes = [{{ provider = "piapi", model = "dall-e-3" }}, {{ provider = "backup", model = "no-price" }}]

[pricing.backup."no-price"]
unpriced = true
"#,
        backup.base_url()
    );
    let gw = TestGateway::start(Db::Sqlite, &test_config(&failing.base_url(), &extra)).await;
    let (key, key_id) = budgeted_key(&*gw.store, "capped", 10, "total").await;
    let body = r#"{"model":"two-routes","prompt":"a lighthouse"}"#;
    let response = gw.post_json_as(&key, "/v1/images/generations", body).await;
    let status = response.status();
    let error: Value = response.json().await.expect("json");
    assert_eq!(status, 502, "{error}");
    assert_eq!(error["error"]["code"], "upstream_error", "{error}");
    assert_eq!(
        error["error"]["message"],
        "provider piapi failed (503 Service Unavailable): overloaded"
    );
    assert_eq!(failing.requests().len(), 1);
    assert!(
        backup.requests().is_empty(),
        "nothing sent to the unpriced route"
    );
    let state = settled(&*gw.store, key_id).await;
    assert_eq!((state.spent_nanousd, state.reserved_nanousd), (0, 0));
    gw.shutdown().await;
}
