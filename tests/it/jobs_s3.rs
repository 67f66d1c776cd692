//! Async jobs with the result store on S3 (a real S3-protocol server, see `support::s3`):
//! two replicas on one Postgres answer a job's polls alike from the bucket, and retention
//! deletes the job's object there.

use std::time::{Duration, Instant};

use bytes::Bytes;
use imagegate::results::{Location, Results};
use serde_json::Value;

use crate::jobs::{accepted, wait_finished};
use crate::support::s3::S3Server;
use crate::support::*;

const GENERATION: &str = r#"{"model":"gpt-image-1","prompt":"a red fox","size":"1024x1024"}"#;
const BUCKET: &str = "imagegate-results";

/// The `[jobs]` and `[results]` sections of replicas sharing the bucket's `prod/` prefix.
fn on_s3(jobs: &str) -> String {
    format!("[jobs]\nlease = \"1s\"\n{jobs}\n[results]\nurl = \"s3://{BUCKET}/prod\"\n")
}

async fn post_job(gw: &TestGateway) -> reqwest::Response {
    gw.client
        .post(gw.url("/v1/images/generations"))
        .bearer_auth(&gw.key)
        .header("content-type", "application/json")
        .header("prefer", "respond-async")
        .body(GENERATION)
        .send()
        .await
        .expect("reaches imagegate")
}

async fn poll(gw: &TestGateway, key: &str, id: &str) -> (u16, String) {
    let response = gw
        .client
        .get(gw.url(&format!("/v1/images/jobs/{id}")))
        .bearer_auth(key)
        .send()
        .await
        .expect("reaches imagegate");
    let status = response.status().as_u16();
    (status, response.text().await.expect("text"))
}

/// The bucket as a third party sees it (no prefix).
async fn bucket(s3: &S3Server) -> Results {
    Results::open(
        &Location::parse(&format!("s3://{BUCKET}")).expect("url"),
        &*s3.env(),
    )
    .expect("open the bucket")
}

#[tokio::test]
async fn two_replicas_answer_a_job_from_the_bucket() {
    let s3 = S3Server::start().await;
    s3.create_bucket(BUCKET).await;
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    provider.set_delay(Duration::from_millis(300));
    let (_store, url) = crate::support::db::fresh_postgres().await;
    let config = test_config(&provider.base_url(), &on_s3(""));
    let a = TestGateway::start_on_with_env(&url, &config, "a", s3.env()).await;
    let b = TestGateway::start_on_with_env(&url, &config, "b", s3.env()).await;

    let (id, request_id) = accepted(post_job(&a).await).await;
    let (job, _) = wait_finished(&b.client, &b.url(""), &a.key, &id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let mut answers = Vec::new();
    for gw in [&a, &b, &a, &b] {
        let (status, text) = poll(gw, &a.key, &id).await;
        assert_eq!(status, 200, "{text}");
        answers.push(text);
    }
    assert!(answers.iter().all(|t| *t == answers[0]), "{answers:#?}");
    let answer: Value = serde_json::from_str(&answers[0]).expect("json");
    assert!(answer["result"]["data"].is_array(), "{answer}");

    // The result is an object in the bucket, under the configured prefix.
    let stored = bucket(&s3)
        .await
        .read_all(&format!("prod/jobs/{id}"))
        .await
        .expect("read the bucket")
        .expect("the job's object is in the bucket");
    assert_eq!(stored, Bytes::from(image_response(1, USAGE)));
    assert_eq!(provider.requests().len(), 1, "one provider call");
    let rows = a.usage_rows(1).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].request_id, request_id);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn retention_deletes_a_jobs_object_from_the_bucket() {
    let s3 = S3Server::start().await;
    s3.create_bucket(BUCKET).await;
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let (_store, url) = crate::support::db::fresh_postgres().await;
    let config = test_config(&provider.base_url(), &on_s3("retention = \"2s\""));
    let gw = TestGateway::start_on_with_env(&url, &config, "a", s3.env()).await;

    let (id, _) = accepted(post_job(&gw).await).await;
    let (job, _) = wait_finished(&gw.client, &gw.url(""), &gw.key, &id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let bucket = bucket(&s3).await;
    let name = format!("prod/jobs/{id}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while bucket.read_all(&name).await.expect("read").is_some() {
        assert!(
            Instant::now() < deadline,
            "retention deletes the job's object within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let listed = bucket.list("prod/jobs").await.expect("list");
    assert!(listed.is_empty(), "{listed:?}");
    let (status, text) = poll(&gw, &gw.key, &id).await;
    assert_eq!(status, 404, "a job past retention is gone: {text}");
    gw.shutdown().await;
}
