//! `GET /admin/usage` and `GET /admin/requests` on a known set of usage rows: sums to the
//! nano-dollar, every grouping and filter, JSON and CSV, pages walked by cursor, and bad
//! parameters refused with the parameter named.

use chrono::{DateTime, NaiveDate, Utc};
use imagegate::usage::{Outcome, UsageRow};
use serde_json::{Value, json};

use crate::on_both_databases;
use crate::support::captures::capture;
use crate::support::rows::usage_row;
use crate::support::*;

on_both_databases!(
    usage_groups_and_sums_to_the_nano_dollar,
    usage_filters_narrow_the_rows,
    usage_as_csv,
    requests_are_paged_newest_first,
    bad_parameters_are_refused_naming_them,
    unpriced_rows_are_unpriced_never_zero,
    a_key_named_like_a_formula_is_text_in_every_csv_and_exact_in_json,
    refused_requests_are_counted_per_key_and_reason,
);

/// Two replicas on one Postgres: each counts the refusals it sees and writes them to the
/// shared table, and either one's `GET /admin/refusals` shows the sum of both.
#[tokio::test]
async fn refusals_on_two_replicas_add_up_in_the_shared_database() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let (_store, url) = crate::support::db::fresh_postgres().await;
    let config = test_config(&provider.base_url(), "");
    let a = TestGateway::start_on_as(&url, &config, "a").await;
    let b = TestGateway::start_on_as(&url, &config, "b").await;
    let created = a
        .client
        .post(a.url("/admin/keys"))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body(r#"{"name": "narrow", "models": ["dall-e-3"]}"#)
        .send()
        .await
        .expect("create");
    assert_eq!(created.status(), 201);
    let created: Value = created.json().await.expect("json");
    let narrow = created["key"].as_str().expect("key").to_owned();

    let body = r#"{"model":"gpt-image-1","prompt":"a lighthouse"}"#;
    for gw in [&a, &b, &b] {
        let response = gw
            .post_json_as(&narrow, "/v1/images/generations", body)
            .await;
        assert_eq!(response.status(), 403);
    }
    for gw in [&a, &b] {
        let mut shown = Value::Null;
        for _ in 0..120 {
            shown = admin_json(gw, "/admin/refusals?key=narrow").await;
            if shown["total"] == 3 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(
            shown["data"],
            json!([{"key": "narrow", "reason": "model_not_allowed", "count": 3}]),
            "{shown}"
        );
    }
    assert_eq!(
        provider.requests().len(),
        0,
        "nothing refused reached the provider"
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// Requests refused before any provider call are counted per key and reason, in memory
/// and written in batches, and `GET /admin/refusals` shows them: over `rpm` (JSON), a model
/// outside the key's list (JSON, and multipart as the Python SDK sends an edit).
async fn refused_requests_are_counted_per_key_and_reason(db: Db) {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = TestGateway::start(db, &test_config(&provider.base_url(), "")).await;
    let admin = |method: reqwest::Method, path: &str, body: &str| {
        gw.client
            .request(method, gw.url(path))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
    };
    let created = admin(
        reqwest::Method::POST,
        "/admin/keys",
        r#"{"name": "limited", "rpm": 1}"#,
    )
    .await
    .expect("create");
    assert_eq!(created.status(), 201);
    let limited: Value = created.json().await.expect("json");
    let limited = limited["key"].as_str().expect("key").to_owned();
    let changed = admin(
        reqwest::Method::PATCH,
        "/admin/keys/svc-test",
        r#"{"models": ["dall-e-3"]}"#,
    )
    .await
    .expect("patch");
    assert_eq!(changed.status(), 200);
    // key_cache_ttl is 1 s.
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;

    let body = r#"{"model":"gpt-image-1","prompt":"a lighthouse"}"#;
    let statuses = [
        gw.post_json_as(&limited, "/v1/images/generations", body)
            .await
            .status(),
        gw.post_json_as(&limited, "/v1/images/generations", body)
            .await
            .status(),
        gw.post_json_as(&limited, "/v1/images/generations", body)
            .await
            .status(),
        gw.post_json("/v1/images/generations", body).await.status(),
        gw.replay(&capture("python1x_edit_one")).await.status(),
    ];
    assert_eq!(statuses.map(|s| s.as_u16()), [200, 429, 429, 403, 403]);

    let mut shown = Value::Null;
    for _ in 0..80 {
        shown = admin_json(&gw, "/admin/refusals").await;
        if shown["total"] == 4 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        shown["data"],
        json!([
            {"key": "limited", "reason": "rpm", "count": 2},
            {"key": "svc-test", "reason": "model_not_allowed", "count": 2},
        ]),
        "{shown}"
    );
    assert_eq!(
        shown["by_reason"],
        json!({"rpm": 2, "model_not_allowed": 2})
    );
    let one = admin_json(&gw, "/admin/refusals?key=limited&since=2020-01-01").await;
    assert_eq!(one["total"], 2, "{one}");
    let none = admin_json(&gw, "/admin/refusals?until=2020-01-01").await;
    assert_eq!(none["total"], 0, "{none}");
    // Nothing refused was sent or billed: one usage row, the one call let through.
    gw.usage_rows(1).await;
    assert_eq!(provider.requests().len(), 1);
    gw.shutdown().await;
}

/// The day the known rows end on for these tests.
pub fn last_day() -> NaiveDate {
    NaiveDate::from_ymd_opt(2025, 3, 3).expect("date")
}

fn at(day: NaiveDate, days_before: i64, time: &str) -> DateTime<Utc> {
    let day = day - chrono::Duration::days(days_before);
    DateTime::parse_from_rfc3339(&format!("{day}T{time}Z"))
        .expect("time")
        .with_timezone(&Utc)
}

/// Six calls over three days ending on `last`: three keys (one whose name is markup), two
/// models, two providers, every outcome, every kind of token. r1 and r2 share an instant.
pub fn known_rows(last: NaiveDate) -> Vec<UsageRow> {
    let zero = |row: UsageRow| UsageRow {
        images: 0,
        text_input_tokens: 0,
        image_input_tokens: 0,
        cached_text_input_tokens: 0,
        cached_image_input_tokens: 0,
        input_tokens: 0,
        output_tokens: 0,
        total_tokens: 0,
        cost_nanousd: Some(0),
        ..row
    };
    vec![
        UsageRow {
            key_name: "alice".into(),
            provider: "piapi".into(),
            cached_text_input_tokens: 2,
            cost_nanousd: Some(1_234_567_891),
            created_at: at(last, 2, "10:15:00"),
            ..usage_row("r1")
        },
        UsageRow {
            key_name: "alice".into(),
            provider: "apiyi".into(),
            status: 502,
            outcome: Outcome::UpstreamError,
            latency_ms: 80,
            created_at: at(last, 2, "10:15:00"),
            ..zero(usage_row("r2"))
        },
        UsageRow {
            key_id: 2,
            key_name: "bob".into(),
            model: "dall-e-3".into(),
            provider: "piapi".into(),
            images: 2,
            cost_nanousd: Some(80_000_000),
            created_at: at(last, 2, "23:59:59.999999"),
            ..zero(usage_row("r3"))
        },
        UsageRow {
            key_id: 2,
            key_name: "bob".into(),
            provider: "piapi".into(),
            status: 200,
            outcome: Outcome::Interrupted,
            cost_nanousd: Some(500_000_001),
            cost_estimated: true,
            created_at: at(last, 1, "00:00:00"),
            ..zero(usage_row("r4"))
        },
        UsageRow {
            key_id: 3,
            key_name: "<b>carol</b>".into(),
            provider: "apiyi".into(),
            text_input_tokens: 20,
            image_input_tokens: 300,
            cached_image_input_tokens: 100,
            input_tokens: 320,
            output_tokens: 4000,
            total_tokens: 4320,
            cost_nanousd: Some(7),
            latency_ms: 9_876,
            created_at: at(last, 0, "08:00:00"),
            ..usage_row("r5")
        },
        UsageRow {
            model: "dall-e-3".into(),
            provider: "piapi".into(),
            status: 502,
            outcome: Outcome::Failed,
            created_at: at(last, 0, "08:30:00"),
            ..zero(usage_row("r6"))
        },
    ]
}

/// A gateway whose database holds [`known_rows`] ending on `last`.
pub async fn gateway_with_known_rows(db: Db, last: NaiveDate) -> TestGateway {
    let provider = dead_url();
    let gw = TestGateway::start(db, &test_config(&provider, "")).await;
    let inserted = gw
        .store
        .insert_usage(&known_rows(last))
        .await
        .expect("insert");
    assert_eq!(inserted, 6);
    gw
}

pub async fn admin_get(gw: &TestGateway, path_and_query: &str) -> reqwest::Response {
    gw.client
        .get(gw.url(path_and_query))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("send")
}

async fn admin_json(gw: &TestGateway, path_and_query: &str) -> Value {
    let response = admin_get(gw, path_and_query).await;
    assert_eq!(response.status(), 200, "{path_and_query}");
    response.json().await.expect("json")
}

/// A report line: counts, then tokens (text, image, cached text, cached image, output),
/// then the cost in nano-USD; input and total tokens follow from those.
fn line(group: (&str, &str), counts: [i64; 4], tokens: [i64; 5], nanos: i64) -> Value {
    let [requests, billed, failed, images] = counts;
    let [text, image, cached_text, cached_image, output] = tokens;
    let dollars = imagegate::usage::price::format_usd(nanos);
    json!({
        group.0: group.1, "requests": requests, "billed": billed, "failed": failed,
        "client_requests": requests, "client_failures": failed, "unpriced": 0, "images": images, "text_input_tokens": text,
        "image_input_tokens": image, "cached_text_input_tokens": cached_text,
        "cached_image_input_tokens": cached_image, "input_tokens": text + image,
        "output_tokens": output, "total_tokens": text + image + output,
        "cost_usd": dollars, "cost_nanousd": nanos,
    })
}

async fn usage_groups_and_sums_to_the_nano_dollar(db: Db) {
    let gw = gateway_with_known_rows(db, last_day()).await;
    let report = admin_json(&gw, "/admin/usage").await;
    assert_eq!(report["object"], "list");
    assert_eq!(report["group_by"], "key");
    // Byte order: '<' sorts before lower-case letters.
    assert_eq!(
        report["data"],
        json!([
            line(
                ("key", "<b>carol</b>"),
                [1, 1, 0, 1],
                [20, 300, 0, 100, 4000],
                7
            ),
            line(
                ("key", "alice"),
                [3, 1, 2, 1],
                [10, 0, 2, 0, 100],
                1_234_567_891
            ),
            line(("key", "bob"), [2, 2, 0, 2], [0; 5], 580_000_001),
        ])
    );
    let by_day = admin_json(&gw, "/admin/usage?group_by=day").await;
    assert_eq!(
        by_day["data"],
        json!([
            line(
                ("day", "2025-03-01"),
                [3, 2, 1, 3],
                [10, 0, 2, 0, 100],
                1_314_567_891
            ),
            line(("day", "2025-03-02"), [1, 1, 0, 0], [0; 5], 500_000_001),
            line(
                ("day", "2025-03-03"),
                [2, 1, 1, 1],
                [20, 300, 0, 100, 4000],
                7
            ),
        ])
    );
    let by_hour = admin_json(&gw, "/admin/usage?group_by=hour").await;
    let hours: Vec<(&str, &str)> = by_hour["data"]
        .as_array()
        .expect("list")
        .iter()
        .map(|l| (l["hour"].as_str().unwrap(), l["cost_usd"].as_str().unwrap()))
        .collect();
    assert_eq!(
        hours,
        [
            ("2025-03-01T10:00Z", "1.234567891"),
            ("2025-03-01T23:00Z", "0.08"),
            ("2025-03-02T00:00Z", "0.500000001"),
            ("2025-03-03T08:00Z", "0.000000007"),
        ]
    );
    let by_provider = admin_json(&gw, "/admin/usage?group_by=provider").await;
    assert_eq!(
        by_provider["data"],
        json!([
            line(
                ("provider", "apiyi"),
                [2, 1, 1, 1],
                [20, 300, 0, 100, 4000],
                7
            ),
            line(
                ("provider", "piapi"),
                [4, 3, 1, 3],
                [10, 0, 2, 0, 100],
                1_814_567_892
            ),
        ])
    );
    let by_model = admin_json(&gw, "/admin/usage?group_by=model&format=json").await;
    assert_eq!(
        by_model["data"],
        json!([
            line(("model", "dall-e-3"), [2, 1, 1, 2], [0; 5], 80_000_000),
            line(
                ("model", "gpt-image-1"),
                [4, 3, 1, 2],
                [30, 300, 2, 100, 4100],
                1_734_567_899
            ),
        ])
    );
    gw.shutdown().await;
}

/// The cost of each group, for compact filter checks.
async fn costs(gw: &TestGateway, query: &str) -> Vec<(String, String)> {
    let report = admin_json(gw, &format!("/admin/usage?{query}")).await;
    let group = report["group_by"].as_str().expect("group_by").to_owned();
    report["data"]
        .as_array()
        .expect("list")
        .iter()
        .map(|l| {
            let name = l[&group].as_str().expect("group").to_owned();
            (name, l["cost_usd"].as_str().expect("cost").to_owned())
        })
        .collect()
}

async fn usage_filters_narrow_the_rows(db: Db) {
    let gw = gateway_with_known_rows(db, last_day()).await;
    let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    };
    // key and model together: r1 and r2.
    assert_eq!(
        costs(&gw, "key=alice&model=gpt-image-1&group_by=provider").await,
        pairs(&[("apiyi", "0.00"), ("piapi", "1.234567891")])
    );
    // provider and a date as since (that day's first instant): r4 and r6.
    assert_eq!(
        costs(&gw, "provider=piapi&since=2025-03-02&group_by=key").await,
        pairs(&[("alice", "0.00"), ("bob", "0.500000001")])
    );
    // A date as until includes that day: r1 to r4.
    assert_eq!(
        costs(&gw, "until=2025-03-02&group_by=day").await,
        pairs(&[("2025-03-01", "1.314567891"), ("2025-03-02", "0.500000001")])
    );
    // An instant as until excludes it; as since includes it (r3 is at its last microsecond).
    assert_eq!(
        costs(
            &gw,
            "since=2025-03-01T23:59:59.999999Z&until=2025-03-02T00:00:00Z&group_by=model"
        )
        .await,
        pairs(&[("dall-e-3", "0.08")])
    );
    // An offset is another way to write the same instant; empty values are no filter.
    assert_eq!(
        costs(&gw, "since=2025-03-02T19:00:00-05:00&key=&model=").await,
        pairs(&[("<b>carol</b>", "0.000000007"), ("alice", "0.00")])
    );
    assert_eq!(costs(&gw, "key=nobody").await, vec![]);
    gw.shutdown().await;
}

async fn usage_as_csv(db: Db) {
    let gw = gateway_with_known_rows(db, last_day()).await;
    let response = admin_get(&gw, "/admin/usage?format=csv&since=2025-03-02").await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/csv; charset=utf-8"
    );
    assert_eq!(
        response.text().await.expect("text"),
        "key,requests,billed,failed,unpriced,images,text_input_tokens,image_input_tokens,\
         cached_text_input_tokens,cached_image_input_tokens,input_tokens,output_tokens,\
         total_tokens,cost_usd,cost_nanousd\n\
         <b>carol</b>,1,1,0,0,1,20,300,0,100,320,4000,4320,0.000000007,7\n\
         alice,1,0,1,0,0,0,0,0,0,0,0,0,0.00,0\n\
         bob,1,1,0,0,0,0,0,0,0,0,0,0,0.500000001,500000001\n"
    );
    gw.shutdown().await;
}

/// Request ids of a `/admin/requests` page and its next cursor.
async fn page(gw: &TestGateway, query: &str) -> (Vec<String>, Option<String>) {
    let page = admin_json(gw, &format!("/admin/requests?{query}")).await;
    let ids = page["data"]
        .as_array()
        .expect("list")
        .iter()
        .map(|r| r["request_id"].as_str().expect("id").to_owned())
        .collect();
    let next = page["next_cursor"].as_str().map(str::to_owned);
    assert_eq!(page["has_more"], next.is_some());
    (ids, next)
}

async fn requests_are_paged_newest_first(db: Db) {
    let gw = gateway_with_known_rows(db, last_day()).await;
    let first = admin_json(&gw, "/admin/requests?limit=1").await;
    assert_eq!(
        first["data"][0],
        json!({
            "request_id": "r6", "client_request_id": "r6", "attempt": 1,
            "created_at": "2025-03-03T08:30:00.000000Z", "key": "alice",
            "model": "dall-e-3", "provider": "piapi", "upstream_model": "gpt-image-1",
            "endpoint": "generations", "status": 502, "outcome": "failed", "cause": null,
            "streamed": false,
            "images": 0, "text_input_tokens": 0, "image_input_tokens": 0,
            "cached_text_input_tokens": 0, "cached_image_input_tokens": 0, "input_tokens": 0,
            "output_tokens": 0, "total_tokens": 0, "cost_usd": "0.00", "cost_nanousd": 0,
            "cost_estimated": false, "latency_ms": 1234,
        })
    );
    // An interrupted call's status, tokens and latency are unknown: null, never 0.
    let interrupted = admin_json(&gw, "/admin/requests?key=bob&limit=1").await;
    let r4 = &interrupted["data"][0];
    assert_eq!(r4["request_id"], "r4", "{interrupted}");
    for unknown in [
        "status",
        "input_tokens",
        "output_tokens",
        "total_tokens",
        "latency_ms",
    ] {
        assert_eq!(r4[unknown], Value::Null, "{unknown}: {r4}");
    }
    assert_eq!(r4["cost_nanousd"], 500_000_001, "{r4}");
    // One row a page, across r1 and r2's shared instant: each row once, in order.
    let mut seen = Vec::new();
    let mut query = "limit=1".to_owned();
    loop {
        let (ids, next) = page(&gw, &query).await;
        seen.extend(ids);
        match next {
            Some(cursor) => query = format!("limit=1&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen, ["r6", "r5", "r4", "r3", "r2", "r1"]);
    let (ids, next) = page(&gw, "limit=4").await;
    assert_eq!(ids, ["r6", "r5", "r4", "r3"]);
    let (ids, next) = page(&gw, &format!("limit=4&cursor={}", next.expect("more"))).await;
    assert_eq!((ids, next), (vec!["r2".to_owned(), "r1".to_owned()], None));
    // Filters apply to pages too; the default limit holds them all.
    let (ids, _) = page(&gw, "key=alice").await;
    assert_eq!(ids, ["r6", "r2", "r1"]);
    let (ids, _) = page(&gw, "key=bob&since=2025-03-02T00:00:00Z").await;
    assert_eq!(ids, ["r4"]);

    // As CSV: the same rows and values; the next page's cursor in a header.
    let response = admin_get(&gw, "/admin/requests?format=csv&key=bob&limit=1").await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/csv; charset=utf-8"
    );
    let cursor = response.headers()["x-next-cursor"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let header = "request_id,client_request_id,attempt,created_at,key,model,provider,\
                  upstream_model,endpoint,status,outcome,cause,streamed,images,text_input_tokens,image_input_tokens,\
                  cached_text_input_tokens,cached_image_input_tokens,input_tokens,\
                  output_tokens,total_tokens,cost_usd,cost_nanousd,cost_estimated,latency_ms";
    assert_eq!(
        response.text().await.expect("csv"),
        format!(
            "{header}\nr4,r4,1,2025-03-02T00:00:00.000000Z,bob,gpt-image-1,piapi,gpt-image-1,\
             generations,,interrupted,,false,0,,,,,,,,0.500000001,500000001,true,\n"
        )
    );
    let query = format!("/admin/requests?format=csv&key=bob&limit=1&cursor={cursor}");
    let response = admin_get(&gw, &query).await;
    assert!(
        response.headers().get("x-next-cursor").is_none(),
        "the last page"
    );
    let csv = response.text().await.expect("csv");
    assert!(csv.ends_with(",1234\n") && csv.contains("\nr3,"), "{csv}");
    gw.shutdown().await;
}

async fn bad_parameters_are_refused_naming_them(db: Db) {
    let gw = gateway_with_known_rows(db, last_day()).await;
    let cases = [
        ("/admin/usage?group_by=week", "group_by"),
        ("/admin/usage?format=xml", "format"),
        ("/admin/usage?since=yesterday", "since"),
        ("/admin/usage?until=2025-13-01", "until"),
        ("/admin/usage?groupby=key", "groupby"),
        ("/admin/usage?key=a&key=b", "key"),
        ("/admin/requests?limit=0", "limit"),
        ("/admin/requests?limit=1001", "limit"),
        ("/admin/requests?limit=ten", "limit"),
        ("/admin/requests?cursor=not-a-cursor", "cursor"),
        ("/admin/requests?since=2025-03-01T00:00:00", "since"),
        ("/admin/requests?format=xml", "format"),
        ("/admin/requests?group_by=day", "group_by"),
    ];
    for (path, param) in cases {
        let response = admin_get(&gw, path).await;
        assert_eq!(response.status(), 400, "{path}");
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["error"]["param"], param, "{path}: {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        assert!(body["error"]["message"].is_string(), "{body}");
    }
    // Without the admin token, or with a client key: 401, no figures.
    for auth in [None, Some(gw.key.clone())] {
        let mut request = gw.client.get(gw.url("/admin/usage"));
        if let Some(key) = auth {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.expect("send");
        assert_eq!(response.status(), 401);
    }
    gw.shutdown().await;
}

/// The row of a table on the dashboard's page whose `data-*` attribute names it.
fn html_row<'a>(body: &'a str, attribute: &str) -> &'a str {
    let start = body
        .find(&format!("<tr {attribute}>"))
        .unwrap_or_else(|| panic!("no row {attribute} in\n{body}"));
    let end = body[start..].find("</tr>").expect("row end");
    &body[start..start + end]
}

/// Rows of an unpriced route (a null cost) are never $0: in `/admin/usage`, `/admin/requests`
/// and the dashboard, a group of unpriced rows only has no cost (null, empty, "unpriced"),
/// and one that mixes them with priced rows shows the priced sum and the unpriced count.
async fn unpriced_rows_are_unpriced_never_zero(db: Db) {
    let gw = TestGateway::start(db, &test_config(&dead_url(), "")).await;
    // Recent, so that the dashboard's default period (the last 30 days) shows them.
    let when = Utc::now() - chrono::Duration::minutes(1);
    let unpriced = |id: &str, key: &str| UsageRow {
        key_name: key.into(),
        model: "gpt-image-1-mini".into(),
        cost_nanousd: None,
        created_at: when,
        ..usage_row(id)
    };
    let rows = [
        UsageRow {
            cost_nanousd: Some(30_000_000),
            created_at: when,
            ..usage_row("p1")
        },
        unpriced("u1", "alice"),
        unpriced("u2", "bob"),
    ];
    assert_eq!(gw.store.insert_usage(&rows).await.expect("insert"), 3);

    // /admin/usage, JSON: the cost of bob's unpriced call is null, alice's is her priced one.
    let by_key = admin_json(&gw, "/admin/usage?group_by=key").await;
    let cost = |line: &Value| {
        (
            line["key"].clone(),
            line["cost_usd"].clone(),
            line["cost_nanousd"].clone(),
            line["unpriced"].clone(),
        )
    };
    assert_eq!(
        by_key["data"]
            .as_array()
            .expect("list")
            .iter()
            .map(cost)
            .collect::<Vec<_>>(),
        [
            (json!("alice"), json!("0.03"), json!(30_000_000), json!(1)),
            (json!("bob"), Value::Null, Value::Null, json!(1)),
        ]
    );
    // CSV: empty cost fields, never 0.
    let csv = admin_get(&gw, "/admin/usage?group_by=model&format=csv").await;
    let csv = csv.text().await.expect("csv");
    let lines: Vec<&str> = csv.lines().collect();
    assert!(lines[1].starts_with("gpt-image-1,1,1,0,0,") && lines[1].ends_with(",0.03,30000000"));
    assert!(lines[2].starts_with("gpt-image-1-mini,2,2,0,2,") && lines[2].ends_with(",,"));
    // /admin/requests: an unpriced row's cost is null, and empty in CSV.
    let requests = admin_json(&gw, "/admin/requests?key=bob").await;
    let row = &requests["data"][0];
    assert_eq!(
        (&row["cost_usd"], &row["cost_nanousd"]),
        (&Value::Null, &Value::Null)
    );
    let csv = admin_get(&gw, "/admin/requests?key=bob&format=csv").await;
    let csv = csv.text().await.expect("csv");
    assert!(
        csv.lines()
            .nth(1)
            .expect("u2")
            .ends_with(",110,,,false,1234"),
        "{csv}"
    );

    // The dashboard: the spend card, the tables, the day's bar and the latest requests.
    let login = crate::dashboard::login(&gw, ADMIN_TOKEN).await;
    let cookie = crate::dashboard::session_of(&login);
    let page = gw
        .client
        .get(gw.url("/dashboard"))
        .header("cookie", &cookie);
    let body = page.send().await.expect("send").text().await.expect("page");
    assert!(
        body.contains(
            "id=\"total-cost\"><span title=\"$0.03 exactly\">$0.03</span> + 2 unpriced</div>"
        ),
        "{body}"
    );
    let cost_cell = |row: &str| {
        let cell = row
            .rsplit("<td class=\"num cost\"")
            .next()
            .expect("cost cell");
        let inner = &cell[cell.find('>').expect("cell") + 1..];
        inner[..inner.find("</td>").expect("cell end")].to_owned()
    };
    assert_eq!(cost_cell(html_row(&body, "data-group=\"bob\"")), "unpriced");
    assert_eq!(
        cost_cell(html_row(&body, "data-group=\"alice\"")),
        "<span title=\"$0.03 exactly\">$0.03</span> + 1 unpriced"
    );
    assert_eq!(
        cost_cell(html_row(&body, "data-group=\"gpt-image-1-mini\"")),
        "unpriced"
    );
    let latest = html_row(&body, "data-request-id=\"u2\"");
    assert!(
        latest.contains(">unpriced</td>") && !latest.contains("0.00"),
        "{latest}"
    );
    let day = when.date_naive();
    assert!(
        body.contains(&format!(
            "data-day=\"{day}\" data-cost-usd=\"0.03\" data-unpriced=\"2\"><title>{day}: \
             $0.03 + 2 unpriced (3 requests)</title>"
        )),
        "{body}"
    );
    // Its download is /admin/usage's CSV, with the same empty cost.
    let download = gw
        .client
        .get(gw.url("/dashboard/usage.csv?group_by=key"))
        .header("cookie", &cookie);
    let download = download
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("csv");
    assert!(
        download
            .lines()
            .nth(2)
            .expect("bob")
            .starts_with("bob,1,1,0,1,")
    );
    assert!(
        download.lines().nth(2).expect("bob").ends_with(",,"),
        "{download}"
    );
    gw.shutdown().await;
}

/// The cells of a CSV text, header line included.
fn csv_cells(text: &str) -> Vec<Vec<String>> {
    csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(text.as_bytes())
        .records()
        .map(|record| {
            record
                .expect("a CSV line")
                .iter()
                .map(str::to_owned)
                .collect()
        })
        .collect()
}

/// The `key` column of a CSV text, checked on the way: no cell of it would be a formula.
fn csv_keys(what: &str, text: &str) -> Vec<String> {
    let cells = csv_cells(text);
    let column = cells[0]
        .iter()
        .position(|c| c == "key")
        .unwrap_or_else(|| panic!("{what}: no key column in\n{text}"));
    for cell in cells.iter().flatten() {
        // A negative number imagegate formatted is a number, not a formula.
        let number = |rest: &str| rest.chars().all(|c| c.is_ascii_digit() || c == '.');
        let live = cell.starts_with(['=', '+', '@', '\t', '\r'])
            || cell.strip_prefix('-').is_some_and(|rest| !number(rest));
        assert!(!live, "{what}: {cell:?} would be a formula in\n{text}");
    }
    cells[1..].iter().map(|line| line[column].clone()).collect()
}

/// A key named `=SUM(1+1)` (a name from before names were restricted, so made through the
/// store) is text in every CSV: `/admin/usage`, `/admin/requests`, the dashboard's two
/// downloads and `imagegate usage`; JSON gives its name exactly.
async fn a_key_named_like_a_formula_is_text_in_every_csv_and_exact_in_json(db: Db) {
    const NAME: &str = "=SUM(1+1)";
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = TestGateway::start(db, &test_config(&provider.base_url(), "")).await;
    let issued = imagegate::auth::issue_key(NAME);
    gw.store.create_key(issued.new).await.expect("create key");
    let call = gw
        .post_json_as(
            &issued.key,
            "/v1/images/generations",
            r#"{"model":"gpt-image-1","prompt":"fox"}"#,
        )
        .await;
    assert_eq!(call.status(), 200);
    assert_eq!(gw.usage_rows(1).await[0].key_name, NAME);
    let text = "'=SUM(1+1)";

    let mut csvs = Vec::new();
    for path in ["/admin/usage?format=csv", "/admin/requests?format=csv"] {
        let response = admin_get(&gw, path).await;
        assert_eq!(response.status(), 200, "{path}");
        csvs.push((path.to_owned(), response.text().await.expect("csv")));
    }
    let login = crate::dashboard::login(&gw, ADMIN_TOKEN).await;
    let cookie = crate::dashboard::session_of(&login);
    for path in [
        "/dashboard/usage.csv?group_by=key",
        "/dashboard/requests.csv",
    ] {
        let response = gw
            .client
            .get(gw.url(path))
            .header("cookie", &cookie)
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), 200, "{path}");
        csvs.push((path.to_owned(), response.text().await.expect("csv")));
    }
    let cli = |args: &[&str]| {
        let out = crate::support::binary::command(&gw.config_path)
            .args(args)
            .output()
            .expect("run imagegate");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {stderr}");
        String::from_utf8(out.stdout).expect("utf-8")
    };
    csvs.push((
        "imagegate usage --format csv".to_owned(),
        cli(&["usage", "--format", "csv"]),
    ));
    for (what, csv) in &csvs {
        assert_eq!(csv_keys(what, csv), [text], "{what}");
    }

    // JSON is exact.
    let usage = admin_json(&gw, "/admin/usage").await;
    assert_eq!(usage["data"][0]["key"], NAME);
    let requests = admin_json(&gw, "/admin/requests").await;
    assert_eq!(requests["data"][0]["key"], NAME);
    let cli_json: Value = serde_json::from_str(&cli(&["usage", "--format", "json"])).expect("json");
    assert_eq!(cli_json[0]["key"], NAME);
    gw.shutdown().await;
}
