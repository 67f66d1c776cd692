//! The `Store` contract, checked by the same test bodies against Postgres and SQLite.

use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use imagegate::store::{
    BudgetPeriod, BudgetState, GroupBy, KeyChanges, KeyLimits, KeyRecord, NewKey,
    RATE_WINDOW_NANOS, Reservation, Reserved, Store, StoreError, UsageFilter, UsageTotals,
};
use imagegate::usage::{Outcome, UsageRow};

use crate::support::rows;

crate::support::db::on_both_backends!(
    migrate_twice_and_ping,
    keys_create_list_find,
    duplicate_key_name_is_refused,
    revoked_key_is_still_found,
    insert_usage_is_idempotent,
    usage_round_trips_every_field,
    usage_report_groups_and_filters,
    usage_report_sums_past_i64,
    budget_reservations_never_grant_past_the_budget,
    budget_settles_once_at_the_real_cost,
    budget_holds_of_dead_calls_expire_and_periods_roll,
    key_limits_round_trip_and_change,
    rate_limit_allows_rpm_requests_at_once_then_refuses,
    dashboard_sessions_live_until_their_expiry_or_their_deletion,
);

fn new_key(name: &str, hash: &str) -> NewKey {
    NewKey {
        name: name.to_owned(),
        prefix: format!("ig_{name}"),
        hash: hash.to_owned(),
        limits: Default::default(),
    }
}

/// Creates the key `name` with `hash`, which must succeed.
async fn create(store: &dyn Store, name: &str, hash: &str) -> KeyRecord {
    store
        .create_key(new_key(name, hash))
        .await
        .unwrap_or_else(|err| panic!("create {name}: {err:?}"))
}

/// Tries to create the key `name` with `hash`, which must be refused (`why` says why).
async fn refused(store: &dyn Store, name: &str, hash: &str, why: &str) -> StoreError {
    store.create_key(new_key(name, hash)).await.expect_err(why)
}

/// A report of every row, one line per key.
fn by_key() -> UsageFilter {
    UsageFilter {
        key_name: None,
        since: None,
        group_by: GroupBy::Key,
        ..Default::default()
    }
}

/// Test times are written out to the microsecond: both databases keep microseconds.
fn at(rfc3339: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(rfc3339)
        .expect("a valid test timestamp")
        .with_timezone(&Utc)
}

fn usage_row(request_id: &str, created_at: DateTime<Utc>) -> UsageRow {
    UsageRow {
        created_at,
        ..rows::usage_row(request_id)
    }
}

async fn migrate_twice_and_ping(store: Arc<dyn Store>) {
    // The helper has migrated once already; starting again must find nothing to do.
    store.migrate().await.expect("second migrate");
    store.ping().await.expect("ping");
}

async fn keys_create_list_find(store: Arc<dyn Store>) {
    let before = Utc::now() - TimeDelta::minutes(1);
    let alice = create(&*store, "alice", "aa11").await;
    let bob = create(&*store, "bob", "bb22").await;
    let after = Utc::now() + TimeDelta::minutes(1);

    assert_eq!(alice.name, "alice");
    assert_eq!(alice.prefix, "ig_alice");
    assert_eq!(alice.hash, "aa11");
    assert_eq!(alice.revoked_at, None);
    assert!(before < alice.created_at && alice.created_at < after);
    assert_ne!(alice.id, bob.id);

    assert_eq!(
        store.list_keys().await.expect("list"),
        vec![alice.clone(), bob.clone()]
    );
    assert_eq!(
        store.find_key_by_hash("bb22").await.expect("find bob"),
        Some(bob)
    );
    assert_eq!(
        store.find_key_by_hash("aa11").await.expect("find alice"),
        Some(alice)
    );
    assert_eq!(store.find_key_by_hash("cc33").await.expect("find"), None);
}

async fn duplicate_key_name_is_refused(store: Arc<dyn Store>) {
    let alice = create(&*store, "alice", "aa11").await;

    let err = refused(&*store, "alice", "ff99", "a second alice").await;
    assert!(
        matches!(&err, StoreError::DuplicateKeyName(name) if name == "alice"),
        "{err:?}"
    );

    // A clash on the hash is not a clash on the name and must not be reported as one.
    let err = refused(&*store, "carol", "aa11", "a second key with alice's hash").await;
    assert!(matches!(err, StoreError::Database(_)), "{err:?}");

    assert_eq!(store.list_keys().await.expect("list"), vec![alice]);
}

async fn revoked_key_is_still_found(store: Arc<dyn Store>) {
    let alice = create(&*store, "alice", "aa11").await;
    let bob = create(&*store, "bob", "bb22").await;

    assert!(store.revoke_key("alice").await.expect("revoke"));
    assert!(!store.revoke_key("alice").await.expect("revoke again"));
    assert!(!store.revoke_key("nobody").await.expect("revoke unknown"));

    // Auth must see the key to answer "revoked" rather than "unknown".
    let found = store
        .find_key_by_hash("aa11")
        .await
        .expect("find")
        .expect("a revoked key is still found");
    let revoked_at = found.revoked_at.expect("revoked_at is set");
    assert!(revoked_at >= alice.created_at);
    assert_eq!((found.id, &found.name), (alice.id, &alice.name));

    // The second revoke changed nothing, not even the time.
    let keys = store.list_keys().await.expect("list");
    assert_eq!(keys, vec![found, bob]);

    // Rotation: the revoked key's name is free again, for one active key at a time.
    let rotated = create(&*store, "alice", "ff99").await; // a revoked key's name is reused
    assert_ne!(rotated.id, alice.id);
    let err = refused(&*store, "alice", "ee88", "two active keys of one name").await;
    assert!(matches!(err, StoreError::DuplicateKeyName(_)), "{err:?}");
    assert!(store.revoke_key("alice").await.expect("revoke the new one"));
    let keys = store.list_keys().await.expect("list");
    let alices: Vec<_> = keys.iter().filter(|k| k.name == "alice").collect();
    assert_eq!(alices.len(), 2);
    assert!(alices.iter().all(|k| k.revoked_at.is_some()), "{alices:?}");
    let found = store.find_key_by_hash("aa11").await.expect("find");
    assert_eq!(found.expect("old key").revoked_at, Some(revoked_at));
}

async fn insert_usage_is_idempotent(store: Arc<dyn Store>) {
    assert_eq!(store.insert_usage(&[]).await.expect("empty batch"), 0);

    let t = at("2025-03-01T12:00:00.000001Z");
    let batch = vec![
        usage_row("req-1", t),
        usage_row("req-2", t),
        usage_row("req-3", t),
    ];
    assert_eq!(store.insert_usage(&batch).await.expect("first"), 3);
    assert_eq!(store.insert_usage(&batch).await.expect("replay"), 0);

    // A replay that overlaps new work writes only the new rows, and a request id twice
    // in one batch counts once.
    let mut changed = usage_row("req-1", t);
    changed.cost_nanousd = Some(999);
    let mixed = vec![changed, usage_row("req-4", t), usage_row("req-4", t)];
    assert_eq!(store.insert_usage(&mixed).await.expect("mixed"), 1);

    for id in ["req-1", "req-2", "req-3", "req-4"] {
        let rows = store.usage_for_request(id).await.expect("read back");
        assert_eq!(rows.len(), 1, "{id}");
    }
    // The first write wins: a replay never rewrites what was stored.
    let rows = store.usage_for_request("req-1").await.expect("read back");
    assert_eq!(rows[0].cost_nanousd, Some(1_000));
    assert!(
        store
            .usage_for_request("req-5")
            .await
            .expect("read back")
            .is_empty()
    );

    let report = store.usage_report(&by_key()).await.expect("report");
    assert_eq!(report.len(), 1);
    assert_eq!(report[0].requests, 4);
    assert_eq!(report[0].cost_nanousd, 4_000);

    // A backlog shipped at once: far more rows than one statement's worth of parameters.
    let backlog: Vec<UsageRow> = (0..3_000)
        .map(|i| usage_row(&format!("backlog-{i}"), t))
        .collect();
    assert_eq!(store.insert_usage(&backlog).await.expect("backlog"), 3_000);
    assert_eq!(store.insert_usage(&backlog).await.expect("again"), 0);
    let rows = store.usage_for_request("backlog-2999").await.expect("read");
    assert_eq!(rows.len(), 1);
}

async fn usage_round_trips_every_field(store: Arc<dyn Store>) {
    // Every field away from its default, values past i32 where the type allows, JSON
    // with odd spacing and key order (stored as sent, not normalised).
    let full = UsageRow {
        request_id: "req-full".to_owned(),
        key_id: 9_000_000_001,
        key_name: "alice".to_owned(),
        model: "gpt-image-1".to_owned(),
        provider: "azure-eu".to_owned(),
        upstream_model: "gpt-image-1-2025-04-15".to_owned(),
        endpoint: "edits".to_owned(),
        status: 502,
        outcome: Outcome::UpstreamError,
        streamed: true,
        n: Some(4),
        size: Some("1536x1024".to_owned()),
        quality: Some("médium".to_owned()),
        images: 3,
        text_input_tokens: 3_000_000_001,
        image_input_tokens: 3_000_000_002,
        cached_text_input_tokens: 3_000_000_003,
        cached_image_input_tokens: 3_000_000_004,
        input_tokens: 6_000_000_003,
        output_tokens: 5_000_000_005,
        total_tokens: 11_000_000_008,
        cost_nanousd: Some(123_456_789_012_345),
        latency_ms: 4_000_000_000,
        created_at: at("2025-06-30T23:59:59.123456Z"),
        raw_usage: Some(
            r#"{"total_tokens":3,  "input_tokens": 1,"output_tokens":2, "input_tokens_details":{}}"#
                .to_owned(),
        ),
        usage_suspect: true,
        cost_estimated: true,
        attempt: 3,
        client_request_id: Some("req".to_owned()),
        cause: Some("http_502".to_owned()),
    };
    // Every field at its zero or none.
    let bare = UsageRow {
        key_id: 0,
        key_name: "bob".to_owned(),
        model: "dall-e-3".to_owned(),
        upstream_model: "dall-e-3".to_owned(),
        endpoint: "variations".to_owned(),
        status: 0,
        outcome: Outcome::Failed,
        n: None,
        size: None,
        quality: None,
        images: 0,
        text_input_tokens: 0,
        input_tokens: 0,
        output_tokens: 0,
        total_tokens: 0,
        cost_nanousd: Some(0),
        latency_ms: 0,
        created_at: at("1999-12-31T23:59:59.000001Z"),
        client_request_id: None,
        ..rows::usage_row("req-bare")
    };
    let completed = UsageRow {
        request_id: "req-completed".to_owned(),
        outcome: Outcome::Completed,
        created_at: at("2025-01-01T00:00:00Z"),
        ..bare.clone()
    };

    let batch = [full.clone(), bare.clone(), completed.clone()];
    assert_eq!(store.insert_usage(&batch).await.expect("insert"), 3);
    for row in batch {
        assert_eq!(
            store
                .usage_for_request(&row.request_id)
                .await
                .expect("read back"),
            vec![row]
        );
    }
}

/// Four rows whose amounts are powers of two, so every sum names the rows it added.
fn report_rows() -> Vec<UsageRow> {
    let row = |id: &str, key: &str, model: &str, provider: &str, time: &str, f: i64| UsageRow {
        key_name: key.to_owned(),
        model: model.to_owned(),
        provider: provider.to_owned(),
        images: i32::try_from(f).expect("small"),
        input_tokens: 10 * f,
        output_tokens: 100 * f,
        total_tokens: 110 * f,
        // Past i32 on its own, so a narrowing sum anywhere would show.
        cost_nanousd: Some(1_000_000_000_000 * f),
        ..usage_row(id, at(time))
    };
    vec![
        // The last microsecond of a day and the first of the next: day grouping is UTC
        // and exact at the boundary.
        row(
            "r1",
            "alice",
            "gpt-image-1",
            "openai",
            "2025-03-01T23:59:59.999999Z",
            1,
        ),
        row(
            "r2",
            "alice",
            "gpt-image-1",
            "azure",
            "2025-03-02T00:00:00Z",
            2,
        ),
        // Upper case sorts before lower case in byte order, whatever a collation says.
        row(
            "r3",
            "Bob",
            "dall-e-3",
            "openai",
            "2025-03-02T12:00:00.5Z",
            4,
        ),
        row(
            "r4",
            "Bob",
            "gpt-image-1",
            "openai",
            "2025-03-03T00:00:00.000001Z",
            8,
        ),
    ]
}

/// Totals of `requests` rows whose power-of-two factors add up to `f`.
fn totals(group: &str, requests: i64, f: i128) -> UsageTotals {
    UsageTotals {
        group: group.to_owned(),
        requests,
        billed: requests,
        images: f,
        text_input_tokens: 10 * i128::from(requests),
        input_tokens: 10 * f,
        output_tokens: 100 * f,
        total_tokens: 110 * f,
        cost_nanousd: 1_000_000_000_000 * f,
        ..UsageTotals::default()
    }
}

async fn usage_report_groups_and_filters(store: Arc<dyn Store>) {
    let report = async |key_name: Option<&str>, since: Option<&str>, group_by: GroupBy| {
        store
            .usage_report(&UsageFilter {
                key_name: key_name.map(str::to_owned),
                since: since.map(at),
                group_by,
                ..Default::default()
            })
            .await
            .expect("report")
    };

    assert_eq!(report(None, None, GroupBy::Key).await, vec![]);
    assert_eq!(
        store
            .insert_usage(&report_rows())
            .await
            .expect("insert rows"),
        4
    );

    assert_eq!(
        report(None, None, GroupBy::Key).await,
        vec![totals("Bob", 2, 12), totals("alice", 2, 3)]
    );
    assert_eq!(
        report(None, None, GroupBy::Model).await,
        vec![totals("dall-e-3", 1, 4), totals("gpt-image-1", 3, 11)]
    );
    assert_eq!(
        report(None, None, GroupBy::Provider).await,
        vec![totals("azure", 1, 2), totals("openai", 3, 13)]
    );
    assert_eq!(
        report(None, None, GroupBy::Day).await,
        vec![
            totals("2025-03-01", 1, 1),
            totals("2025-03-02", 2, 6),
            totals("2025-03-03", 1, 8),
        ]
    );

    // Filter by key.
    assert_eq!(
        report(Some("alice"), None, GroupBy::Day).await,
        vec![totals("2025-03-01", 1, 1), totals("2025-03-02", 1, 2)]
    );
    assert_eq!(report(Some("nobody"), None, GroupBy::Key).await, vec![]);

    // `since` includes a row at exactly that instant, and a microsecond later excludes it.
    assert_eq!(
        report(None, Some("2025-03-02T00:00:00Z"), GroupBy::Key).await,
        vec![totals("Bob", 2, 12), totals("alice", 1, 2)]
    );
    assert_eq!(
        report(None, Some("2025-03-02T00:00:00.000001Z"), GroupBy::Key).await,
        vec![totals("Bob", 2, 12)]
    );
    // An offset is only another way to write the same instant.
    assert_eq!(
        report(None, Some("2025-03-01T20:00:00-04:00"), GroupBy::Provider).await,
        vec![totals("azure", 1, 2), totals("openai", 2, 12)]
    );

    // Both filters together.
    assert_eq!(
        report(Some("Bob"), Some("2025-03-03T00:00:00Z"), GroupBy::Model).await,
        vec![totals("gpt-image-1", 1, 8)]
    );
    assert_eq!(
        report(None, Some("2025-03-04T00:00:00Z"), GroupBy::Day).await,
        vec![]
    );
}

#[tokio::test]
async fn sqlite_connect_creates_the_directory_and_file() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("not").join("yet").join("imagegate.db");
    let store = imagegate::store::connect(&format!("sqlite:{}", path.display()))
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    store.ping().await.expect("ping");
    assert!(path.is_file());
}

#[tokio::test]
async fn connect_refuses_other_schemes() {
    let err = imagegate::store::connect("mysql://localhost/imagegate")
        .await
        .err()
        .expect("mysql is not supported");
    assert!(err.to_string().contains("postgres://"), "{err}");
}

/// Rows holding i64's largest values: their sums are past i64, and the report gives them
/// exactly (Postgres' `sum(...)::bigint` and SQLite's `sum` failed with an overflow).
async fn usage_report_sums_past_i64(store: Arc<dyn Store>) {
    const MAX: i64 = i64::MAX;
    let huge = |id: &str| UsageRow {
        images: i32::MAX,
        text_input_tokens: MAX,
        input_tokens: MAX,
        output_tokens: MAX,
        total_tokens: MAX,
        cost_nanousd: Some(MAX),
        ..usage_row(id, at("2025-03-01T00:00:00Z"))
    };
    let rows: Vec<UsageRow> = (0..3).map(|i| huge(&format!("huge-{i}"))).collect();
    store.insert_usage(&rows).await.expect("insert");
    // One small negative row too: the halves SQLite sums in must put negatives back exactly.
    let negative = UsageRow {
        cost_nanousd: Some(-5),
        ..usage_row("negative", at("2025-03-01T00:00:00Z"))
    };
    store.insert_usage(&[negative]).await.expect("insert");
    let report = store
        .usage_report(&by_key())
        .await
        .expect("a report whose sums pass i64");
    let max = i128::from(MAX);
    assert_eq!(
        report,
        vec![UsageTotals {
            group: "alice".to_owned(),
            requests: 4,
            billed: 4,
            images: 3 * i128::from(i32::MAX) + 1,
            text_input_tokens: 3 * max + 10,
            input_tokens: 3 * max + 10,
            output_tokens: 3 * max + 100,
            total_tokens: 3 * max + 110,
            cost_nanousd: 3 * max - 5,
            ..UsageTotals::default()
        }]
    );
}

/// 4 US cents: the price of one call in the budget tests.
const CALL: i64 = 40_000_000;

/// Creates key 1 (the key of the test usage rows) with a budget of `limit` a day: a
/// reservation reads the budget from the key's row.
async fn budgeted(store: &Arc<dyn Store>, limit: i64) {
    let mut key = new_key("budgeted", "hash-budgeted");
    key.limits = KeyLimits {
        budget_nanousd: Some(limit),
        budget_period: Some("day".into()),
        ..KeyLimits::default()
    };
    assert_eq!(store.create_key(key).await.expect("create key").id, 1);
}

fn reservation(request_id: &str, now: DateTime<Utc>) -> Reservation {
    Reservation {
        request_id: request_id.to_owned(),
        key_id: 1,
        amount_nanousd: CALL,
        now,
        expires_at: now + TimeDelta::minutes(11),
    }
}

async fn state(store: &Arc<dyn Store>) -> BudgetState {
    store
        .budget_state(1)
        .await
        .expect("budget state")
        .expect("a budget row")
}

async fn budget_reservations_never_grant_past_the_budget(store: Arc<dyn Store>) {
    let now = Utc::now();
    let limit = 50 * CALL;
    budgeted(&store, limit).await;
    let calls = (0..200).map(|i| {
        let store = Arc::clone(&store);
        async move { store.reserve(&reservation(&format!("req-{i}"), now)).await }
    });
    let verdicts = futures_util::future::join_all(calls).await;
    let granted = verdicts
        .iter()
        .filter(|v| matches!(v, Ok(Reserved::Granted { .. })))
        .count();
    let refused = verdicts
        .iter()
        .filter(|v| {
            matches!(
                v,
                Ok(Reserved::Refused {
                    remaining_nanousd: 0,
                    period: BudgetPeriod::Day,
                })
            )
        })
        .count();
    assert_eq!((granted, refused), (50, 150), "{verdicts:?}");
    let held = state(&store).await;
    assert_eq!((held.spent_nanousd, held.reserved_nanousd), (0, limit));
}

async fn budget_settles_once_at_the_real_cost(store: Arc<dyn Store>) {
    let now = Utc::now();
    let limit = 4 * CALL;
    budgeted(&store, limit).await;
    for id in ["a", "b", "c", "u"] {
        let verdict = store.reserve(&reservation(id, now)).await.expect("reserve");
        assert!(matches!(verdict, Reserved::Granted { .. }), "{verdict:?}");
    }
    // "a" cost less than its worst case, "b" exactly that; "c" was never sent; "u" has no
    // price (its row has no cost, and it releases its hold all the same).
    let rows = [
        UsageRow {
            cost_nanousd: None,
            ..usage_row("u", now)
        },
        UsageRow {
            cost_nanousd: Some(CALL / 4),
            ..usage_row("a", now)
        },
        UsageRow {
            cost_nanousd: Some(CALL),
            ..usage_row("b", now)
        },
    ];
    assert_eq!(store.insert_usage(&rows).await.expect("settle"), 3);
    assert!(store.release("c").await.expect("release"));
    assert!(!store.release("c").await.expect("release again"));
    let settled = state(&store).await;
    assert_eq!(
        (settled.spent_nanousd, settled.reserved_nanousd),
        (CALL / 4 + CALL, 0)
    );
    // A replayed batch is not new: it settles nothing again.
    assert_eq!(store.insert_usage(&rows).await.expect("replay"), 0);
    assert_eq!(state(&store).await, settled);
    // What the real costs left is free again: a quarter call short of two calls.
    let next = store.reserve(&reservation("d", now)).await.expect("d");
    assert_eq!(
        next,
        Reserved::Granted {
            remaining_nanousd: limit - CALL / 4 - 2 * CALL
        }
    );
}

async fn budget_holds_of_dead_calls_expire_and_periods_roll(store: Arc<dyn Store>) {
    let now = at("2026-12-06T23:50:00.000000Z");
    let limit = 2 * CALL;
    budgeted(&store, limit).await;
    for id in ["dead-1", "dead-2"] {
        let mut hold = reservation(id, now);
        hold.expires_at = now + TimeDelta::minutes(5);
        assert!(matches!(
            store.reserve(&hold).await.expect("reserve"),
            Reserved::Granted { .. }
        ));
    }
    // Both holds are live: nothing is left.
    let soon = now + TimeDelta::minutes(4);
    assert_eq!(
        store.reserve(&reservation("x", soon)).await.expect("x"),
        Reserved::Refused {
            remaining_nanousd: 0,
            period: BudgetPeriod::Day,
        }
    );
    // Past their deadline, whoever reserves next releases them.
    let later = now + TimeDelta::minutes(6);
    assert!(matches!(
        store.reserve(&reservation("y", later)).await.expect("y"),
        Reserved::Granted { remaining_nanousd } if remaining_nanousd == CALL
    ));
    assert_eq!(state(&store).await.reserved_nanousd, CALL);
    // "y" is settled at its full cost: the day's budget has one call left.
    store
        .insert_usage(&[usage_row("y", later)])
        .await
        .expect("settle y");
    let spent = state(&store).await;
    assert_eq!((spent.spent_nanousd, spent.reserved_nanousd), (1_000, 0));
    // The next UTC day starts from nothing spent.
    let tomorrow = now + TimeDelta::hours(1);
    assert!(matches!(
        store.reserve(&reservation("z", tomorrow)).await.expect("z"),
        Reserved::Granted { remaining_nanousd } if remaining_nanousd == limit - CALL
    ));
    let rolled = state(&store).await;
    assert_eq!(rolled.period_start, at("2026-12-07T00:00:00.000000Z"));
    assert_eq!((rolled.spent_nanousd, rolled.reserved_nanousd), (0, CALL));
}

async fn key_limits_round_trip_and_change(store: Arc<dyn Store>) {
    let metadata = serde_json::json!({"team": "search", "ticket": 42});
    let limits = KeyLimits {
        budget_nanousd: Some(12_500_000_000),
        budget_period: Some("month".into()),
        rpm: Some(60),
        max_in_flight: Some(4),
        models: Some(vec!["gpt-image-1".into(), "img".into()]),
        expires_at: Some(at("2031-01-02T03:04:05.000006Z")),
        metadata: metadata.as_object().cloned(),
    };
    let alice = store
        .create_key(NewKey {
            limits: limits.clone(),
            ..new_key("alice", "aa11")
        })
        .await
        .expect("create alice");
    assert_eq!(alice.limits, limits);
    let found = store.find_key_by_hash("aa11").await.expect("find");
    assert_eq!(found.as_ref(), Some(&alice));

    // Changed fields change, cleared ones clear, the others stay.
    let changes = KeyChanges {
        rpm: Some(Some(5)),
        models: Some(None),
        budget: Some(None),
        ..KeyChanges::default()
    };
    let changed = store
        .update_key("alice", &changes)
        .await
        .expect("update")
        .expect("alice is active");
    let expected = KeyLimits {
        rpm: Some(5),
        models: None,
        budget_nanousd: None,
        budget_period: None,
        ..limits.clone()
    };
    assert_eq!(changed.limits, expected);
    assert_eq!((changed.id, &changed.hash), (alice.id, &alice.hash));
    assert_eq!(
        store.list_keys().await.expect("list"),
        vec![changed.clone()]
    );

    // No change at all still answers with the key.
    let same = store
        .update_key("alice", &KeyChanges::default())
        .await
        .expect("empty update");
    assert_eq!(same, Some(changed));

    // A budget without a period keeps the one the key has, or is a total.
    let budget = |nanousd, period: Option<&str>| KeyChanges {
        budget: Some(Some((nanousd, period.map(str::to_owned)))),
        ..KeyChanges::default()
    };
    let set = store
        .update_key("alice", &budget(5, None))
        .await
        .expect("update");
    let set = set.expect("alice").limits;
    assert_eq!(
        (set.budget_nanousd, set.budget_period.as_deref()),
        (Some(5), Some("total"))
    );
    store
        .update_key("alice", &budget(6, Some("day")))
        .await
        .expect("update");
    let set = store
        .update_key("alice", &budget(7, None))
        .await
        .expect("update");
    let set = set.expect("alice").limits;
    assert_eq!(
        (set.budget_nanousd, set.budget_period.as_deref()),
        (Some(7), Some("day"))
    );

    // Unknown and revoked keys are not changed.
    let unknown = store.update_key("nobody", &changes).await.expect("update");
    assert_eq!(unknown, None);
    assert!(store.revoke_key("alice").await.expect("revoke"));
    let revoked = store.update_key("alice", &changes).await.expect("update");
    assert_eq!(revoked, None);
}

async fn rate_limit_allows_rpm_requests_at_once_then_refuses(store: Arc<dyn Store>) {
    let interval = RATE_WINDOW_NANOS / 3;
    let mut states = Vec::new();
    for _ in 0..5 {
        states.push(store.take_request(7, 3).await.expect("take"));
    }
    let allowed: Vec<bool> = states.iter().map(|s| s.allowed).collect();
    assert_eq!(allowed, [true, true, true, false, false], "{states:?}");
    // Each request allowed moved the theoretical arrival time one interval on; refusals
    // left it where it was.
    let first = states[0];
    assert_eq!(first.tat_ns, first.at_ns + interval, "{states:?}");
    assert_eq!(states[2].tat_ns, first.at_ns + 3 * interval, "{states:?}");
    assert_eq!(states[3].tat_ns, states[2].tat_ns);
    assert_eq!(states[4].tat_ns, states[2].tat_ns);
    assert!(states[4].at_ns >= first.at_ns);
    // Another key has its own limit.
    assert!(store.take_request(8, 3).await.expect("take").allowed);
}

async fn dashboard_sessions_live_until_their_expiry_or_their_deletion(store: Arc<dyn Store>) {
    let now = Utc::now();
    let expires = now + TimeDelta::hours(12);
    store
        .create_session("hash-a", now, expires)
        .await
        .expect("create");
    store
        .create_session("hash-b", now, expires)
        .await
        .expect("create");
    let active = |hash: &'static str, at: DateTime<Utc>| {
        let store = Arc::clone(&store);
        async move { store.session_active(hash, at).await.expect("check") }
    };
    assert!(active("hash-a", now).await);
    assert!(active("hash-a", expires - TimeDelta::microseconds(1)).await);
    assert!(!active("hash-a", expires).await, "over at its expiry");
    assert!(!active("hash-unknown", now).await);
    assert!(store.delete_session("hash-a").await.expect("delete"));
    assert!(!active("hash-a", now).await, "deleted: over");
    assert!(!store.delete_session("hash-a").await.expect("delete again"));
    assert!(active("hash-b", now).await, "another session goes on");
    // A login after hash-b's expiry removes its row: even a check dated before it finds none.
    store
        .create_session("hash-c", expires, expires + TimeDelta::hours(12))
        .await
        .expect("create");
    assert!(
        !active("hash-b", now).await,
        "expired rows are deleted at the next login"
    );
    assert!(active("hash-c", expires).await);
}
