//! The `RefusalStore` contract (refused requests per key, reason and minute), checked by
//! the same test bodies against Postgres and SQLite.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use imagegate::store::{RefusalCount, RefusalTotal, Store};

crate::support::db::on_both_backends!(
    counts_add_up_per_key_reason_and_minute,
    totals_cover_a_period_and_a_key,
);

fn minute(n: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + 60 * n, 0).expect("time")
}

fn count(key: &str, reason: &str, at: i64, count: i64) -> RefusalCount {
    RefusalCount {
        key_name: key.to_owned(),
        reason: reason.to_owned(),
        minute: minute(at),
        count,
    }
}

fn total(key: &str, reason: &str, count: i64) -> RefusalTotal {
    RefusalTotal {
        key_name: key.to_owned(),
        reason: reason.to_owned(),
        count,
    }
}

async fn counts_add_up_per_key_reason_and_minute(store: Arc<dyn Store>) {
    store.add_refusals(&[]).await.expect("nothing to add");
    assert_eq!(
        store
            .refusal_totals(None, None, None)
            .await
            .expect("totals"),
        vec![]
    );
    // Two replicas' batches for the same minute add up; a batch holds several keys.
    store
        .add_refusals(&[count("a", "rpm", 0, 3), count("b", "budget", 0, 1)])
        .await
        .expect("first batch");
    store
        .add_refusals(&[count("a", "rpm", 0, 4), count("a", "in_flight", 1, 2)])
        .await
        .expect("second batch");
    assert_eq!(
        store
            .refusal_totals(None, None, None)
            .await
            .expect("totals"),
        vec![
            total("a", "in_flight", 2),
            total("a", "rpm", 7),
            total("b", "budget", 1)
        ]
    );
    // A big batch (a flood's worth of keys) goes in whole.
    let many: Vec<RefusalCount> = (0..3000)
        .map(|i| count(&format!("k{i:04}"), "rpm", 2, 1))
        .collect();
    store.add_refusals(&many).await.expect("big batch");
    let totals = store
        .refusal_totals(None, None, None)
        .await
        .expect("totals");
    assert_eq!(totals.len(), 3003);
}

async fn totals_cover_a_period_and_a_key(store: Arc<dyn Store>) {
    store
        .add_refusals(&[
            count("a", "rpm", 0, 1),
            count("a", "rpm", 10, 2),
            count("a", "model_not_allowed", 20, 4),
            count("b", "rpm", 10, 8),
        ])
        .await
        .expect("add");
    let since = Some(minute(10));
    let until = Some(minute(20));
    assert_eq!(
        store
            .refusal_totals(None, since, until)
            .await
            .expect("period"),
        vec![total("a", "rpm", 2), total("b", "rpm", 8)]
    );
    assert_eq!(
        store
            .refusal_totals(Some("a"), since, None)
            .await
            .expect("key"),
        vec![total("a", "model_not_allowed", 4), total("a", "rpm", 2)]
    );
    assert_eq!(
        store
            .refusal_totals(Some("nobody"), None, None)
            .await
            .expect("none"),
        vec![]
    );
}
