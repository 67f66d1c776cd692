//! A key's own limits, set through the admin API: expiry (401, also for a key the cache
//! holds), a model allowlist (403, nothing forwarded or billed), its cap on requests in
//! flight, and its requests per minute, which hold across replicas on one database and are
//! reported in OpenAI's `x-ratelimit-*` headers. Changes take effect within key_cache_ttl.

use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use reqwest::Method;
use serde_json::{Value, json};

use crate::admin_keys::admin;
use crate::on_both_databases;
use crate::support::forms::Form;
use crate::support::*;

/// A key made through the admin API with these settings (`name` included).
async fn create_key(gw: &TestGateway, settings: Value) -> String {
    let (status, created) =
        admin(gw, Method::POST, "/admin/keys", Some(&settings.to_string())).await;
    assert_eq!(status, 201, "{created}");
    created["key"].as_str().expect("key").to_owned()
}

async fn generate(gw: &TestGateway, key: &str, body: Value) -> reqwest::Response {
    gw.post_json_as(key, "/v1/images/generations", &body.to_string())
        .await
}

/// Status and JSON body of a generation of `model` ("" for none) with `key`.
async fn generate_model(gw: &TestGateway, key: &str, model: &str) -> (u16, Value) {
    let body = if model.is_empty() {
        json!({"prompt": "fox"})
    } else {
        json!({"model": model, "prompt": "fox"})
    };
    let response = generate(gw, key, body).await;
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

on_both_databases!(
    an_expired_key_gets_401_even_while_the_cache_holds_it,
    a_model_outside_the_allowlist_gets_403_and_nothing_is_forwarded,
    a_keys_own_max_in_flight_overrides_the_server_default,
    a_keys_rpm_refuses_the_request_past_it_with_openai_headers,
);

async fn an_expired_key_gets_401_even_while_the_cache_holds_it(db: Db) {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    // The cache would serve the key for a minute without asking the database again.
    let config = test_config(&provider.base_url(), "")
        .replace("key_cache_ttl = \"1s\"", "key_cache_ttl = \"60s\"");
    let gw = TestGateway::start(db, &config).await;
    let expires = Utc::now() + chrono::TimeDelta::milliseconds(2500);
    let settings = json!({
        "name": "temp-svc",
        "expires_at": expires.to_rfc3339_opts(SecondsFormat::Micros, true)
    });
    let key = create_key(&gw, settings).await;
    assert_eq!(generate_model(&gw, &key, "gpt-image-1").await.0, 200);

    let wait = (expires - Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(100)).await;
    let (status, body) = generate_model(&gw, &key, "gpt-image-1").await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("expired")),
        "{body}"
    );
    assert_eq!(
        provider.requests().len(),
        1,
        "the expired key's call was not forwarded"
    );
    // A key without an expiry is not affected.
    assert_eq!(generate_model(&gw, &gw.key, "gpt-image-1").await.0, 200);
    gw.usage_rows(2).await;
    gw.shutdown().await;
}

async fn a_model_outside_the_allowlist_gets_403_and_nothing_is_forwarded(db: Db) {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = TestGateway::start(db, &test_config(&provider.base_url(), "")).await;
    // An alias in the list allows its model under every name: the model is what counts.
    let key = create_key(&gw, json!({"name": "narrow", "models": ["img-default"]})).await;
    for model in ["gpt-image-1", "img-default", ""] {
        let (status, body) = generate_model(&gw, &key, model).await;
        assert_eq!(status, 200, "{model:?}: {body}");
    }
    let (status, body) = generate_model(&gw, &key, "dall-e-3").await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "model_not_allowed", "{body}");
    assert_eq!(body["error"]["param"], "model", "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    let form = Form::edit("dall-e-2", "p");
    let edit = gw.post_form_as(&key, "/v1/images/edits", &form).await;
    assert_eq!(edit.status(), 403);
    assert_eq!(
        provider.requests().len(),
        3,
        "the refused calls were not forwarded"
    );
    let rows = gw.usage_rows(3).await;
    assert!(rows.iter().all(|r| r.model == "gpt-image-1"), "{rows:#?}");

    // The model list shows the key what it may use.
    let ids = model_ids(&gw.client, &gw.url("/v1/models"), &key).await;
    assert_eq!(ids, ["gpt-image-1", "img-default"]);
    for (model, status) in [("dall-e-3", 404), ("gpt-image-1", 200)] {
        let response = gw.get_as(&key, &format!("/v1/models/{model}")).await;
        assert_eq!(response.status(), status, "{model}");
    }

    // Cleared by PATCH: every model, within key_cache_ttl (1 s).
    change_and_wait(&gw, "narrow", r#"{"models": null}"#).await;
    let (status, body) = generate_model(&gw, &key, "dall-e-3").await;
    assert_eq!(status, 200, "{body}");
    gw.usage_rows(4).await;
    gw.shutdown().await;
}

/// Changes the key `name` by `PATCH /admin/keys/{name}` with `body` (which must be
/// accepted) and waits out key_cache_ttl (1 s), so the next request sees the change.
async fn change_and_wait(gw: &TestGateway, name: &str, body: &str) {
    let path = format!("/admin/keys/{name}");
    let (status, _) = admin(gw, Method::PATCH, &path, Some(body)).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(1200)).await;
}

async fn a_keys_own_max_in_flight_overrides_the_server_default(db: Db) {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    provider.set_delay(Duration::from_millis(700));
    let gw = TestGateway::start(db, &test_config(&provider.base_url(), "")).await;
    let key = create_key(&gw, json!({"name": "one-at-a-time", "max_in_flight": 1})).await;
    // Two at once: the server default (64) would take both; the key's own cap takes one.
    let statuses = |key: String| {
        let gw = &gw;
        async move {
            let (a, b) = tokio::join!(generate_model(gw, &key, "gpt-image-1"), async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                generate_model(gw, &key, "gpt-image-1").await
            });
            // Whichever came in second (the first may be slower to start) is refused.
            let mut both = [(a.0, a.1), (b.0, b.1)];
            both.sort_by_key(|(status, _)| *status);
            let [(first, _), (second, body)] = both;
            (first, second, body)
        }
    };
    let (first, second, body) = statuses(key.clone()).await;
    assert_eq!((first, second), (200, 429), "{body}");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    // Raised by PATCH, within key_cache_ttl (1 s).
    change_and_wait(&gw, "one-at-a-time", r#"{"max_in_flight": 2}"#).await;
    let (first, second, body) = statuses(key).await;
    assert_eq!((first, second), (200, 200), "{body}");
    gw.usage_rows(3).await;
    gw.shutdown().await;
}

async fn a_keys_rpm_refuses_the_request_past_it_with_openai_headers(db: Db) {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = TestGateway::start(db, &test_config(&provider.base_url(), "")).await;
    let key = create_key(&gw, json!({"name": "slow-svc", "rpm": 3})).await;
    for remaining in ["2", "1", "0"] {
        let response = generate(&gw, &key, json!({"model": "gpt-image-1", "prompt": "fox"})).await;
        assert_eq!(response.status(), 200);
        let headers = response.headers();
        assert_eq!(headers["x-ratelimit-limit-requests"], "3");
        assert_eq!(headers["x-ratelimit-remaining-requests"], remaining);
        let reset = headers["x-ratelimit-reset-requests"]
            .to_str()
            .expect("ascii");
        assert!(reset.ends_with('s'), "{reset}");
    }
    let refused = generate(&gw, &key, json!({"model": "gpt-image-1", "prompt": "fox"})).await;
    assert_eq!(refused.status(), 429);
    let headers = refused.headers().clone();
    assert_eq!(headers["x-ratelimit-limit-requests"], "3");
    assert_eq!(headers["x-ratelimit-remaining-requests"], "0");
    let retry_after: u64 = headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!(
        (15..=20).contains(&retry_after),
        "one request every 20 s: {retry_after}"
    );
    let body: Value = refused.json().await.expect("json");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    assert_eq!(body["error"]["type"], "requests", "{body}");
    // Other keys, and routes other than the image routes, are not counted.
    assert_eq!(generate_model(&gw, &gw.key, "gpt-image-1").await.0, 200);
    let models = gw.get_as(&key, "/v1/models").await;
    assert_eq!(models.status(), 200);
    assert!(models.headers().get("x-ratelimit-limit-requests").is_none());
    assert_eq!(
        provider.requests().len(),
        4,
        "the refused call was not forwarded"
    );
    gw.usage_rows(4).await;
    gw.shutdown().await;
}

/// With rpm = N and N + k calls at once spread over two gateways on one Postgres database,
/// exactly N pass: the count lives in the database, not in either process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpm_holds_across_two_gateways_on_one_postgres_database() {
    const RPM: usize = 5;
    const EXTRA: usize = 11;
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let (_, url) = crate::support::db::fresh_postgres().await;
    let config = test_config(&provider.base_url(), "");
    let one = TestGateway::start_on_as(&url, &config, "replica-one").await;
    let two = TestGateway::start_on_as(&url, &config, "replica-two").await;
    let key = create_key(&one, json!({"name": "shared", "rpm": RPM})).await;
    let calls = (0..RPM + EXTRA).map(|i| {
        let gw = if i % 2 == 0 { &one } else { &two };
        let key = key.clone();
        async move { generate_model(gw, &key, "gpt-image-1").await.0 }
    });
    let statuses = futures_util::future::join_all(calls).await;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((ok, refused), (RPM, EXTRA), "{statuses:?}");
    assert_eq!(provider.requests().len(), RPM);
    one.shutdown().await;
    two.shutdown().await;
}

/// With the rate-limit table locked (its statement waits, as on a database slowed by load),
/// each call waits `key_lookup_timeout` and the replica's own limiter answers: an rpm of 2
/// admits at most 2 a minute, counting the call the database had answered before, and each
/// such answer is counted in `imagegate_rate_limit_local_fallback_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpm_holds_on_the_replica_while_the_database_is_too_slow_to_count_it() {
    use sqlx::{Connection, Executor};

    const FALLBACK: &str = "imagegate_rate_limit_local_fallback_total";
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let (_, url) = crate::support::db::fresh_postgres().await;
    let gw = TestGateway::start_on(&url, &test_config(&provider.base_url(), "")).await;
    let warm = create_key(&gw, json!({"name": "warm", "rpm": 2})).await;
    let cold = create_key(&gw, json!({"name": "cold", "rpm": 2})).await;
    assert_eq!(generate_model(&gw, &warm, "gpt-image-1").await.0, 200);
    // Both keys known to the key cache, so that only the rate limit waits on the lock.
    assert_eq!(gw.get_as(&cold, "/v1/models").await.status(), 200);

    let before = gw.metric(FALLBACK).await;
    let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
    let mut lock = conn.begin().await.expect("begin");
    lock.execute("lock table key_rate_limits in exclusive mode")
        .await
        .expect("lock the rate-limit table");
    let calls = |key: &str| {
        let key = key.to_owned();
        let gw = &gw;
        async move {
            let response =
                generate(gw, &key, json!({"model": "gpt-image-1", "prompt": "fox"})).await;
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            (status, headers)
        }
    };
    let (warm_calls, cold_calls) = tokio::join!(
        futures_util::future::join_all((0..3).map(|_| calls(&warm))),
        futures_util::future::join_all((0..3).map(|_| calls(&cold))),
    );
    let after = gw.metric(FALLBACK).await;
    lock.rollback().await.expect("unlock");

    let admitted = |calls: &[(u16, reqwest::header::HeaderMap)]| {
        calls.iter().filter(|(status, _)| *status == 200).count()
    };
    assert_eq!(
        admitted(&warm_calls),
        1,
        "one of two a minute was used while the database answered: {warm_calls:?}"
    );
    assert_eq!(admitted(&cold_calls), 2, "{cold_calls:?}");
    for (status, headers) in warm_calls.iter().chain(&cold_calls) {
        assert!(*status == 200 || *status == 429, "{status}");
        assert_eq!(headers["x-ratelimit-limit-requests"], "2");
        if *status == 429 {
            let retry_after: u64 = headers["retry-after"]
                .to_str()
                .expect("ascii")
                .parse()
                .expect("seconds");
            assert!((1..=60).contains(&retry_after), "{retry_after}");
        }
    }
    assert!(
        after - before >= 6.0,
        "six local answers: {before} -> {after}"
    );
    assert_eq!(
        provider.requests().len(),
        1 + 3,
        "the refused calls were not sent"
    );
    gw.shutdown().await;
}

/// With `metrics.per_key`: `imagegate_key_requests_total{key,status}` and
/// `imagegate_key_cost_nanousd_total{key}`, by key name: never the key.
#[tokio::test]
async fn per_key_metrics_count_requests_and_cost_by_key_name() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let config = test_config(&provider.base_url(), "[metrics]\nper_key = true\n");
    let gw = TestGateway::start(Db::Sqlite, &config).await;
    // The recorder is the process's: a name no other test uses.
    let name = format!("metered-{}", uuid::Uuid::now_v7().simple());
    let key = create_key(&gw, json!({"name": name, "models": ["gpt-image-1"]})).await;
    for _ in 0..2 {
        assert_eq!(generate_model(&gw, &key, "gpt-image-1").await.0, 200);
    }
    assert_eq!(generate_model(&gw, &key, "dall-e-3").await.0, 403);
    let rows = gw.usage_rows(2).await;
    let cost: i64 = rows.iter().map(|r| r.cost_nanousd.expect("priced")).sum();
    assert!(cost > 0);
    let metrics = gw.metrics().await;
    let line = |prefix: String| {
        metrics
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no {prefix} in:\n{metrics}"))
            .rsplit(' ')
            .next()
            .expect("value")
            .to_owned()
    };
    let requests = |status: &str| {
        line(format!(
            "imagegate_key_requests_total{{key=\"{name}\",status=\"{status}\"}}"
        ))
    };
    assert_eq!(requests("200"), "2");
    assert_eq!(requests("403"), "1");
    assert_eq!(
        line(format!(
            "imagegate_key_cost_nanousd_total{{key=\"{name}\"}}"
        )),
        cost.to_string()
    );
    assert!(!metrics.contains(&key), "no key in /metrics");
    gw.shutdown().await;
}

/// A job's creation is an image call (counted against rpm, checked against the allowlist);
/// polling it is not counted.
#[tokio::test]
async fn async_jobs_are_counted_and_checked_when_created_not_when_polled() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = TestGateway::start(Db::Sqlite, &test_config(&provider.base_url(), "")).await;
    let key = create_key(
        &gw,
        json!({"name": "jobs-svc", "rpm": 3, "models": ["dall-e-3"]}),
    )
    .await;
    let submit = |model: &'static str| {
        gw.client
            .post(gw.url("/v1/images/generations"))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .header("prefer", "respond-async")
            .body(json!({"model": model, "prompt": "fox"}).to_string())
            .send()
    };
    let created = submit("dall-e-3").await.expect("send");
    assert_eq!(created.status(), 202);
    assert_eq!(created.headers()["x-ratelimit-remaining-requests"], "2");
    let job: Value = created.json().await.expect("json");
    let id = job["id"].as_str().expect("id").to_owned();
    for _ in 0..5 {
        let poll = gw.get_as(&key, &format!("/v1/images/jobs/{id}")).await;
        assert_eq!(poll.status(), 200);
        assert!(poll.headers().get("x-ratelimit-limit-requests").is_none());
    }
    let refused = submit("gpt-image-1").await.expect("send");
    assert_eq!(refused.status(), 403);
    let second = submit("dall-e-3").await.expect("send");
    assert_eq!(second.status(), 202);
    assert_eq!(second.headers()["x-ratelimit-remaining-requests"], "0");
    assert_eq!(submit("dall-e-3").await.expect("send").status(), 429);
    gw.usage_rows(2).await;
    assert!(
        provider
            .requests()
            .iter()
            .all(|r| r.json()["model"] == "dall-e-3")
    );
    gw.shutdown().await;
}
