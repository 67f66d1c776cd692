//! The `JobStore` contract, checked by the same test bodies against Postgres and SQLite:
//! the queue limit under concurrent creations, retries, leases, lapsed jobs claimed once,
//! kept bounds and retention.

use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use imagegate::store::{
    Interrupted, JobCreated, JobEnd, JobRow, JobStatus, NewJob, PastRetention, Store,
};

crate::support::db::on_both_backends!(
    unfinished_jobs_are_counted_per_key_and_a_retry_finds_its_job,
    concurrent_creations_never_pass_the_queue_limit,
    a_job_starts_once_and_finishes_once,
    leases_are_renewed_per_replica_and_lapsed_jobs_are_claimed_once,
    finished_jobs_are_kept_within_count_and_bytes_then_deleted_past_retention,
);

/// Far enough back that nothing counts as past retention.
fn long_ago() -> DateTime<Utc> {
    DateTime::<Utc>::UNIX_EPOCH
}

/// A time in whole microseconds (what both databases keep).
fn now() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).expect("time")
}

fn new_job(id: &str, key_id: i64, fingerprint: Option<&str>, replica: &str) -> NewJob {
    let created_at = now();
    NewJob {
        id: id.to_owned(),
        key_id,
        endpoint: "generations".into(),
        request_id: format!("req_{id}"),
        fingerprint: fingerprint.map(str::to_owned),
        created_at,
        replica: replica.to_owned(),
        lease_until: created_at + TimeDelta::seconds(30),
    }
}

async fn create(store: &dyn Store, job: &NewJob, retry: bool, limit: u32) -> JobCreated {
    store
        .create_job(job, retry, limit, long_ago())
        .await
        .expect("create job")
}

fn created(outcome: JobCreated) -> JobRow {
    match outcome {
        JobCreated::New(row) => row,
        other => panic!("expected a new job: {other:?}"),
    }
}

fn why() -> Interrupted {
    Interrupted {
        queued: r#"{"message":"queued"}"#.into(),
        running: r#"{"message":"running"}"#.into(),
    }
}

fn failed(error: &str) -> JobEnd {
    JobEnd::Failed {
        status_code: 400,
        error: error.into(),
    }
}

fn succeeded(id: &str, bytes: i64) -> JobEnd {
    JobEnd::Succeeded {
        status_code: 200,
        result_name: format!("jobs/{id}"),
        result_bytes: bytes,
    }
}

async fn unfinished_jobs_are_counted_per_key_and_a_retry_finds_its_job(store: Arc<dyn Store>) {
    let store = &*store;
    let first = created(create(store, &new_job("j1", 1, Some("f1"), "a"), false, 2).await);
    assert_eq!(first.status, JobStatus::Queued);
    assert_eq!(first.replica, "a");
    assert_eq!(first.request_id, "req_j1");
    // A retry with the same fingerprint gets the first job, even from another replica.
    let again = create(store, &new_job("j1b", 1, Some("f1"), "b"), true, 2).await;
    assert_eq!(again, JobCreated::Existing(first.clone()));
    // The same fingerprint without the retry mark is a new job; another key never gets
    // another key's job.
    created(create(store, &new_job("j2", 1, Some("f1"), "a"), false, 2).await);
    created(create(store, &new_job("k1", 2, Some("f1"), "a"), true, 2).await);
    assert_eq!(
        create(store, &new_job("j3", 1, Some("f3"), "b"), false, 2).await,
        JobCreated::QueueFull
    );
    assert_eq!(store.open_jobs(1).await.expect("open"), 2);
    assert_eq!(store.open_jobs(2).await.expect("open"), 1);
    // A retry of the newest job with that fingerprint finds it, even while the queue is full.
    let latest = create(store, &new_job("j1c", 1, Some("f1"), "b"), true, 2).await;
    assert!(matches!(latest, JobCreated::Existing(row) if row.id == "j2"));

    assert!(
        store
            .finish_job("j1", &failed("{}"), now())
            .await
            .expect("finish")
    );
    assert_eq!(store.open_jobs(1).await.expect("open"), 1);
    created(create(store, &new_job("j3", 1, Some("f3"), "b"), false, 2).await);

    // Read by its key only; hidden once it finished before the cutoff.
    let row = store.job("j1", 1, long_ago()).await.expect("read");
    assert_eq!(row.expect("found").status, JobStatus::Failed);
    assert_eq!(store.job("j1", 2, long_ago()).await.expect("read"), None);
    let later = now() + TimeDelta::seconds(1);
    assert_eq!(store.job("j1", 1, later).await.expect("read"), None);
    assert!(
        store.job("j2", 1, later).await.expect("read").is_some(),
        "unfinished"
    );
    // And a retry after that no longer finds it.
    let retried = store
        .create_job(&new_job("j1d", 1, Some("f1"), "a"), true, 10, later)
        .await
        .expect("create");
    assert!(matches!(retried, JobCreated::Existing(row) if row.id == "j2"));
}

async fn concurrent_creations_never_pass_the_queue_limit(store: Arc<dyn Store>) {
    let tries = (0..20).map(|i| {
        let store = Arc::clone(&store);
        async move {
            let job = new_job(
                &format!("c{i}"),
                7,
                None,
                if i % 2 == 0 { "a" } else { "b" },
            );
            store.create_job(&job, false, 5, long_ago()).await
        }
    });
    let outcomes = futures_util::future::join_all(tries).await;
    let new = outcomes
        .iter()
        .filter(|o| matches!(o, Ok(JobCreated::New(_))))
        .count();
    let full = outcomes
        .iter()
        .filter(|o| matches!(o, Ok(JobCreated::QueueFull)))
        .count();
    assert_eq!((new, full), (5, 15), "{outcomes:?}");
    assert_eq!(store.open_jobs(7).await.expect("open"), 5);
}

async fn a_job_starts_once_and_finishes_once(store: Arc<dyn Store>) {
    let store = &*store;
    created(create(store, &new_job("s1", 1, None, "a"), false, 10).await);
    let started = now();
    assert!(store.start_job("s1", started).await.expect("start"));
    assert!(
        !store.start_job("s1", started).await.expect("start"),
        "once"
    );
    store
        .record_job_call("s1", r#"{"request_id":"req_s1"}"#)
        .await
        .expect("call");
    let row = store
        .job("s1", 1, long_ago())
        .await
        .expect("read")
        .expect("row");
    assert_eq!(row.status, JobStatus::InProgress);
    assert_eq!(row.started_at, Some(started));
    assert_eq!(
        row.call_intent.as_deref(),
        Some(r#"{"request_id":"req_s1"}"#)
    );

    let done = now();
    assert!(
        store
            .finish_job("s1", &succeeded("s1", 123), done)
            .await
            .expect("finish")
    );
    assert!(
        !store
            .finish_job("s1", &failed("{}"), done)
            .await
            .expect("finish"),
        "a finished job stays as it ended"
    );
    let row = store
        .job("s1", 1, long_ago())
        .await
        .expect("read")
        .expect("row");
    assert_eq!(row.status, JobStatus::Succeeded);
    assert_eq!(row.status_code, Some(200));
    assert_eq!(row.result_name.as_deref(), Some("jobs/s1"));
    assert_eq!(row.result_bytes, Some(123));
    assert_eq!(row.completed_at, Some(done));
    assert_eq!(row.error, None);

    // A job that never started (its key was revoked meanwhile) fails from the queue.
    created(create(store, &new_job("s2", 1, None, "a"), false, 10).await);
    let error = r#"{"message":"revoked","type":"invalid_request_error"}"#;
    assert!(
        store
            .finish_job("s2", &failed(error), done)
            .await
            .expect("finish")
    );
    let row = store
        .job("s2", 1, long_ago())
        .await
        .expect("read")
        .expect("row");
    assert_eq!(
        (row.status, row.status_code, row.error.as_deref()),
        (JobStatus::Failed, Some(400), Some(error))
    );
    assert!(
        !store.start_job("s2", now()).await.expect("start"),
        "failed: not run"
    );
}

/// What a claimed job shows: id, status, status code, error and the intent of its call.
type Claimed<'a> = (
    &'a str,
    JobStatus,
    Option<i32>,
    Option<&'a str>,
    Option<&'a str>,
);

async fn leases_are_renewed_per_replica_and_lapsed_jobs_are_claimed_once(store: Arc<dyn Store>) {
    let store = &*store;
    for (id, replica) in [
        ("a1", "a"),
        ("a2", "a"),
        ("b1", "b"),
        ("b2", "b"),
        ("b3", "b"),
    ] {
        created(create(store, &new_job(id, 1, None, replica), false, 10).await);
    }
    // a2 and b2 are running, b2 with its call sent; b3 is finished.
    for id in ["a2", "b2"] {
        assert!(store.start_job(id, now()).await.expect("start"));
    }
    store
        .record_job_call("b2", r#"{"request_id":"req_b2"}"#)
        .await
        .expect("call");
    assert!(
        store
            .finish_job("b3", &failed("{}"), now())
            .await
            .expect("finish")
    );

    // Only the jobs named are renewed when ids are given (the ones a replica's tasks hold),
    // never another replica's.
    let held = ["a1".to_owned(), "b1".to_owned(), "nope".to_owned()];
    let renewed = store
        .renew_job_leases("a", Some(&held), now() + TimeDelta::seconds(10))
        .await
        .expect("renew held");
    assert_eq!(renewed, 1, "a1 only");

    // Past every lease: only a's are renewed, and only b's unfinished ones lapse.
    let later = now() + TimeDelta::seconds(60);
    let renewed = store
        .renew_job_leases("a", None, later + TimeDelta::seconds(30))
        .await
        .expect("renew");
    assert_eq!(renewed, 2);
    let mut claimed = store.claim_lapsed_jobs(later, &why()).await.expect("claim");
    claimed.sort_by(|x, y| x.id.cmp(&y.id));
    let seen: Vec<Claimed> = claimed
        .iter()
        .map(|j| {
            (
                j.id.as_str(),
                j.status,
                j.status_code,
                j.error.as_deref(),
                j.call_intent.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (
                "b1",
                JobStatus::Failed,
                Some(500),
                Some(r#"{"message":"queued"}"#),
                None
            ),
            (
                "b2",
                JobStatus::Failed,
                Some(500),
                Some(r#"{"message":"running"}"#),
                Some(r#"{"request_id":"req_b2"}"#)
            ),
        ]
    );
    assert_eq!(claimed[0].completed_at, Some(later));
    assert!(
        store
            .claim_lapsed_jobs(later, &why())
            .await
            .expect("claim")
            .is_empty(),
        "each lapsed job is claimed once"
    );
    // The replica that ran b2 comes back: its end is not recorded over the failure.
    assert!(
        !store
            .finish_job("b2", &succeeded("b2", 1), now())
            .await
            .expect("finish")
    );
    assert_eq!(store.open_jobs(1).await.expect("open"), 2);
    // Renewals of a replica whose jobs all ended touch nothing.
    assert_eq!(
        store
            .renew_job_leases("b", None, later)
            .await
            .expect("renew"),
        0
    );
}

async fn finished_jobs_are_kept_within_count_and_bytes_then_deleted_past_retention(
    store: Arc<dyn Store>,
) {
    let store = &*store;
    let start = now();
    // Five jobs of key 1 finishing a second apart: a failure, then results of 100 bytes.
    for i in 0..5 {
        let id = format!("r{i}");
        created(create(store, &new_job(&id, 1, None, "a"), false, 10).await);
        let end = if i == 0 {
            failed("{}")
        } else {
            succeeded(&id, 100)
        };
        let at = start + TimeDelta::seconds(i);
        assert!(store.finish_job(&id, &end, at).await.expect("finish"));
    }
    // Another key's job and an unfinished one are not counted.
    created(create(store, &new_job("other", 2, None, "a"), false, 10).await);
    let other_end = start - TimeDelta::seconds(10);
    assert!(
        store
            .finish_job("other", &succeeded("other", 1000), other_end)
            .await
            .expect("finish")
    );
    created(create(store, &new_job("open", 1, None, "a"), false, 10).await);

    // Three at most by count.
    let mut expired = store
        .expire_kept_jobs(1, 3, u64::MAX)
        .await
        .expect("expire");
    expired.sort();
    assert_eq!(expired, ["jobs/r1"], "r0 had no result");
    // Then 250 bytes at most: two results.
    let expired = store.expire_kept_jobs(1, 3, 250).await.expect("expire");
    assert_eq!(expired, ["jobs/r2"]);
    assert!(
        store
            .expire_kept_jobs(1, 3, 250)
            .await
            .expect("again")
            .is_empty()
    );
    let mut statuses = Vec::new();
    for i in 0..5 {
        let row = store
            .job(&format!("r{i}"), 1, long_ago())
            .await
            .expect("read")
            .expect("row");
        statuses.push((row.status, row.result_name.is_some()));
    }
    assert_eq!(
        statuses,
        [
            (JobStatus::Expired, false),
            (JobStatus::Expired, false),
            (JobStatus::Expired, false),
            (JobStatus::Succeeded, true),
            (JobStatus::Succeeded, true),
        ]
    );

    // Past retention: the jobs finished before the cutoff, oldest first, expired ones too.
    let cutoff = start + TimeDelta::milliseconds(3500);
    let past = store.jobs_past_retention(cutoff, 3).await.expect("past");
    let names = |past: &[PastRetention]| {
        past.iter()
            .map(|p| (p.id.clone(), p.result_name.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(&past),
        [
            ("other".to_owned(), Some("jobs/other".to_owned())),
            ("r0".to_owned(), None),
            ("r1".to_owned(), None),
        ]
    );
    let ids: Vec<String> = past.into_iter().map(|p| p.id).collect();
    assert_eq!(store.delete_jobs(&ids).await.expect("delete"), 3);
    assert_eq!(
        store.delete_jobs(&ids).await.expect("again"),
        0,
        "idempotent"
    );
    let past = store.jobs_past_retention(cutoff, 100).await.expect("past");
    assert_eq!(
        names(&past),
        [
            ("r2".to_owned(), None),
            ("r3".to_owned(), Some("jobs/r3".to_owned())),
        ]
    );
    assert_eq!(store.job("r0", 1, long_ago()).await.expect("read"), None);
    assert!(
        store
            .job("open", 1, long_ago())
            .await
            .expect("read")
            .is_some()
    );
}
