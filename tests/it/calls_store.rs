//! The `CallStore` contract (calls in flight, for duplicate protection across replicas),
//! checked by the same test bodies against Postgres and SQLite.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use imagegate::store::{CallRecord, CallState, KeptCall, Store};

crate::support::db::on_both_backends!(
    a_running_call_is_found_until_it_ends,
    a_kept_call_round_trips_and_a_late_registration_does_not_undo_it,
    the_newest_live_call_of_a_fingerprint_is_found,
    expired_calls_are_ignored_then_swept_with_their_results,
);

/// A whole number of microseconds: what both databases keep.
fn at(seconds: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + seconds, 123_000).expect("time")
}

fn running(fingerprint: &str, request_id: &str, started: i64, expires: i64) -> CallRecord {
    CallRecord {
        fingerprint: fingerprint.to_owned(),
        request_id: request_id.to_owned(),
        replica: "replica-a".to_owned(),
        state: CallState::Running,
        started_at: at(started),
        expires_at: at(expires),
    }
}

fn kept(call: &CallRecord, expires: i64) -> CallRecord {
    CallRecord {
        state: CallState::Kept(KeptCall {
            result: format!("kept/{}-{}", call.fingerprint, call.request_id),
            status: 200,
            content_type: Some("application/json".into()),
            provider: Some("piapi".into()),
        }),
        expires_at: at(expires),
        ..call.clone()
    }
}

async fn a_running_call_is_found_until_it_ends(store: Arc<dyn Store>) {
    let call = running("f1", "req_1", 0, 100);
    store.register_call(&call).await.expect("register");
    // Registering twice (a retried write) changes nothing.
    store.register_call(&call).await.expect("register again");
    assert_eq!(
        store.find_call("f1", at(1)).await.expect("find"),
        Some(call.clone())
    );
    assert_eq!(
        store.get_call("f1", "req_1", at(1)).await.expect("get"),
        Some(call.clone())
    );
    assert_eq!(store.find_call("f2", at(1)).await.expect("find"), None);
    assert!(store.end_call("f1", "req_1").await.expect("end"));
    assert!(!store.end_call("f1", "req_1").await.expect("end twice"));
    assert_eq!(store.find_call("f1", at(1)).await.expect("find"), None);
    assert_eq!(
        store.get_call("f1", "req_1", at(1)).await.expect("get"),
        None
    );
}

async fn a_kept_call_round_trips_and_a_late_registration_does_not_undo_it(store: Arc<dyn Store>) {
    let call = running("f1", "req_1", 0, 100);
    store.register_call(&call).await.expect("register");
    let kept = kept(&call, 700);
    store.keep_call(&kept).await.expect("keep");
    assert_eq!(
        store.find_call("f1", at(200)).await.expect("find"),
        Some(kept.clone())
    );
    // A call whose registration never landed (the database was away) can still be kept,
    // and the registration arriving after it leaves it kept.
    let other = kept_alone(&*store).await;
    store
        .register_call(&running("f2", "req_2", 0, 100))
        .await
        .expect("late registration");
    assert_eq!(
        store.find_call("f2", at(1)).await.expect("find"),
        Some(other)
    );
}

async fn kept_alone(store: &dyn Store) -> CallRecord {
    let kept = kept(&running("f2", "req_2", 0, 100), 700);
    store.keep_call(&kept).await.expect("keep unregistered");
    kept
}

async fn the_newest_live_call_of_a_fingerprint_is_found(store: Arc<dyn Store>) {
    let old = running("f1", "req_old", 0, 100);
    let new = running("f1", "req_new", 10, 110);
    store.register_call(&new).await.expect("register");
    store.register_call(&old).await.expect("register");
    assert_eq!(
        store.find_call("f1", at(20)).await.expect("find"),
        Some(new.clone())
    );
    assert_eq!(
        store.find_call("f1", at(105)).await.expect("find"),
        Some(new.clone())
    );
    // Past both expiries (their replicas died), neither is found.
    assert_eq!(store.find_call("f1", at(110)).await.expect("find"), None);
    assert!(store.end_call("f1", "req_new").await.expect("end"));
    assert_eq!(
        store.find_call("f1", at(20)).await.expect("find"),
        Some(old)
    );
}

async fn expired_calls_are_ignored_then_swept_with_their_results(store: Arc<dyn Store>) {
    let dead = running("f1", "req_dead", 0, 100);
    let kept_early = kept(&running("f2", "req_k1", 0, 100), 300);
    let kept_late = kept(&running("f3", "req_k2", 0, 100), 900);
    store.register_call(&dead).await.expect("register");
    for call in [&kept_early, &kept_late] {
        store.keep_call(call).await.expect("keep");
    }
    assert_eq!(
        store
            .get_call("f1", "req_dead", at(100))
            .await
            .expect("get"),
        None
    );
    let mut swept = store.sweep_calls(at(300)).await.expect("sweep");
    swept.sort();
    assert_eq!(
        swept,
        vec!["kept/f2-req_k1".to_owned()],
        "the dead call held no result"
    );
    assert_eq!(
        store.find_call("f1", at(0)).await.expect("find"),
        None,
        "deleted"
    );
    assert_eq!(
        store.find_call("f2", at(0)).await.expect("find"),
        None,
        "deleted"
    );
    assert_eq!(
        store.find_call("f3", at(300)).await.expect("find"),
        Some(kept_late)
    );
    assert!(store.sweep_calls(at(301)).await.expect("sweep").is_empty());
}
