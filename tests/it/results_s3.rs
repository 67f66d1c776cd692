//! The result store on S3, against a real S3-protocol server (moto, see `support::s3`):
//! the folder's assertions (src/results.rs) again, a result written by one replica's handle
//! and read by another's, a multipart upload, and deletion that leaves nothing listed.

use bytes::Bytes;
use imagegate::results::{Location, Results};

use crate::support::s3::S3Server;

async fn open(s3: &S3Server, url: &str) -> Results {
    Results::open(&Location::parse(url).expect("url"), &*s3.env()).expect("open")
}

#[tokio::test]
async fn s3_shows_an_object_only_once_it_is_whole_and_lists_nothing_after_delete() {
    let s3 = S3Server::start().await;
    s3.create_bucket("imagegate-results").await;
    let results = open(&s3, "s3://imagegate-results/prod").await;
    assert_eq!(results.location(), "s3://imagegate-results/prod");

    let mut writer = results.writer("jobs/a");
    writer.write(b"hello ").await.expect("write");
    assert!(results.read_all("jobs/a").await.expect("read").is_none());
    writer.write(b"world").await.expect("write");
    assert_eq!(writer.finish().await.expect("finish"), 11);
    assert_eq!(
        results.read_all("jobs/a").await.expect("read"),
        Some(Bytes::from_static(b"hello world"))
    );
    let reading = results.read("jobs/a").await.expect("read").expect("found");
    assert_eq!(reading.size, 11);
    let body = axum::body::to_bytes(reading.body, 1 << 20)
        .await
        .expect("body");
    assert_eq!(body, Bytes::from_static(b"hello world"));
    // Under the prefix, in the bucket.
    let bucket = open(&s3, "s3://imagegate-results").await;
    assert_eq!(
        bucket.read_all("prod/jobs/a").await.expect("read"),
        Some(Bytes::from_static(b"hello world"))
    );

    // Another replica's handle on the same bucket reads what this one wrote.
    let other = open(&s3, "s3://imagegate-results/prod").await;
    assert_eq!(
        other.read_all("jobs/a").await.expect("read"),
        Some(Bytes::from_static(b"hello world"))
    );

    let mut dropped = results.writer("jobs/b");
    dropped.write(b"half").await.expect("write");
    drop(dropped);
    assert!(results.read_all("jobs/b").await.expect("read").is_none());

    results
        .put("kept/c", Bytes::from_static(b"c"))
        .await
        .expect("put");
    let mut names: Vec<String> = results
        .list("jobs")
        .await
        .expect("list")
        .into_iter()
        .map(|l| l.name)
        .collect();
    names.sort();
    assert_eq!(names, ["jobs/a"]);
    let kept = results.list("kept").await.expect("list");
    assert_eq!(kept.len(), 1);
    assert_eq!((kept[0].name.as_str(), kept[0].size), ("kept/c", 1));
    assert!(results.list("none").await.expect("list").is_empty());

    // Retention deletes through the handle: nothing is listed or read afterwards.
    results.delete("jobs/a").await.expect("delete");
    results.delete("kept/c").await.expect("delete");
    assert!(results.read("jobs/a").await.expect("read").is_none());
    assert!(results.list("jobs").await.expect("list").is_empty());
    assert!(results.list("kept").await.expect("list").is_empty());
    assert!(other.list("jobs").await.expect("list").is_empty());
}

#[tokio::test]
async fn a_large_result_goes_up_in_parts_and_an_abandoned_one_leaves_nothing() {
    let s3 = S3Server::start().await;
    s3.create_bucket("big").await;
    let results = open(&s3, "s3://big").await;
    // Past the writer's buffer (10 MiB): a multipart upload of several parts.
    let chunk: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    let mut writer = results.writer("jobs/large");
    for _ in 0..23 {
        writer.write(&chunk).await.expect("write");
    }
    assert!(
        results
            .read_all("jobs/large")
            .await
            .expect("read")
            .is_none()
    );
    assert_eq!(writer.finish().await.expect("finish"), 23 * 1024 * 1024);
    let whole = results
        .read_all("jobs/large")
        .await
        .expect("read")
        .expect("found");
    assert_eq!(whole.len(), 23 * 1024 * 1024);
    assert!(whole.chunks(chunk.len()).all(|c| c == chunk.as_slice()));
    let listed = results.list("jobs").await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].size, 23 * 1024 * 1024);

    // Abandoned mid-upload (parts already sent): never visible.
    let mut abandoned = results.writer("jobs/abandoned");
    for _ in 0..12 {
        abandoned.write(&chunk).await.expect("write");
    }
    drop(abandoned);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        results
            .read_all("jobs/abandoned")
            .await
            .expect("read")
            .is_none()
    );
    let names: Vec<String> = results
        .list("jobs")
        .await
        .expect("list")
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert_eq!(names, ["jobs/large"]);
    results.delete("jobs/large").await.expect("delete");
    assert!(results.list("jobs").await.expect("list").is_empty());
}

#[tokio::test]
async fn an_unreachable_bucket_is_an_error_that_names_the_store_and_no_secret() {
    let s3 = S3Server::start().await;
    let results = open(&s3, "s3://no-such-bucket/p").await;
    let err = results
        .put("jobs/x", Bytes::from_static(b"x"))
        .await
        .expect_err("no bucket");
    let text = err.to_string();
    assert!(
        text.starts_with("result store s3://no-such-bucket/p: "),
        "{text}"
    );
    assert!(!text.contains("imagegate-test-secret"), "{text}");
}
