//! A budget holds whatever the order of a request's fields: the official SDKs send `n`,
//! `size` and `quality` after `model`, so an upload's hold made when `model` arrives is
//! raised (or the call cut before its body ends) as the later fields raise its worst case;
//! and a field sent twice is refused, in multipart and JSON alike.

use std::time::{Duration, Instant};

use imagegate::auth::issue_key;
use imagegate::store::{BudgetState, KeyLimits, Store};
use imagegate::upstream::{Endpoint, RequestSummary};
use imagegate::usage::price::worst_case_nanousd;
use serde_json::Value;

use crate::support::forms::Form;
use crate::support::gateway::all_rows;
use crate::support::standin::{Received, StandIn, image_response, respond};
use crate::support::{Db, TestGateway, test_config};

crate::on_both_databases!(
    fields_after_the_model_that_raise_the_worst_case_past_the_budget_cut_the_call,
    fields_after_the_model_raise_a_hold_the_budget_covers,
    a_field_sent_twice_is_refused_and_nothing_is_billed,
);

const USD: i64 = 1_000_000_000;
/// What the stand-in bills a 4096x4096 high-quality edit of ten images at: what a provider
/// that was sent the whole request would charge.
const BIG_USAGE: &str = r#"{"total_tokens":650010,"input_tokens":10,"output_tokens":650000,"input_tokens_details":{"text_tokens":10,"image_tokens":0}}"#;

fn provider_answers_ten_images() -> impl Fn(&Received) -> axum::response::Response {
    |_| respond(200, "application/json", image_response(10, BIG_USAGE))
}

/// A key with a budget of `nanousd` in all.
async fn budgeted(store: &dyn Store, name: &str, nanousd: i64) -> (String, i64) {
    let mut issued = issue_key(name);
    issued.new.limits = KeyLimits {
        budget_nanousd: Some(nanousd),
        budget_period: Some("total".to_owned()),
        ..KeyLimits::default()
    };
    let record = store.create_key(issued.new).await.expect("create key");
    (issued.key, record.id)
}

/// The key's budget once nothing is reserved any more (or after 20 s, as it is then).
async fn settled(store: &dyn Store, key_id: i64) -> BudgetState {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let state = store.budget_state(key_id).await.expect("budget state");
        let state = state.unwrap_or(BudgetState {
            period_start: chrono::DateTime::UNIX_EPOCH,
            spent_nanousd: 0,
            reserved_nanousd: 0,
        });
        if state.reserved_nanousd == 0 || Instant::now() > deadline {
            return state;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// gpt-image-2's price in the test config and the images an edit may send, as imagegate
/// reads them.
fn gpt_image_2_price(gw: &TestGateway) -> (imagegate::config::Price, usize) {
    let config = imagegate::config::Config::load(&gw.config_path, &crate::support::test_env())
        .expect("config");
    let price = config.models["gpt-image-2"].routes[0].price.clone();
    (price, config.server.uploads.max_images)
}

/// The form of an edit or variation as the Python SDK orders it (prompt, model, n, then
/// the rest, then the images), or with `model` first as the Node SDK sends it, asking for
/// ten 4096x4096 high-quality images, optionally streamed.
fn big_form(endpoint: Endpoint, model_first: bool, stream: bool) -> Form {
    let mut form = Form::new();
    if model_first {
        form = form.text("model", "gpt-image-2");
    }
    if endpoint == Endpoint::Edits {
        form = form.text("prompt", "fox");
    }
    if !model_first {
        form = form.text("model", "gpt-image-2");
    }
    form = form.text("n", "10");
    if endpoint == Endpoint::Edits {
        form = form.text("quality", "high");
    }
    form = form.text("size", "4096x4096");
    if stream {
        form = form.text("stream", "true").text("partial_images", "3");
    }
    form.image()
}

fn path_of(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::Edits => "/v1/images/edits",
        _ => "/v1/images/variations",
    }
}

/// The SDKs' field orders, for edits (plain and streamed) and variations.
const CASES: [(Endpoint, bool, bool); 5] = [
    (Endpoint::Edits, false, false),
    (Endpoint::Edits, true, false),
    (Endpoint::Edits, false, true),
    (Endpoint::Variations, false, false),
    (Endpoint::Variations, true, false),
];

async fn fields_after_the_model_that_raise_the_worst_case_past_the_budget_cut_the_call(db: Db) {
    let provider = StandIn::start(provider_answers_ten_images()).await;
    let gw = TestGateway::start(db, &test_config(&provider.base_url(), "")).await;
    let (price, max_images) = gpt_image_2_price(&gw);
    let budget = 3 * USD;
    for (index, (endpoint, model_first, stream)) in CASES.into_iter().enumerate() {
        let case = format!("{endpoint:?}, model first: {model_first}, stream: {stream}");
        // What is known when `model` arrives fits the budget; the whole request does not.
        let at_model = RequestSummary {
            prompt_chars: if model_first || endpoint != Endpoint::Edits {
                0
            } else {
                3
            },
            ..RequestSummary::default()
        };
        let whole = RequestSummary {
            n: Some(10),
            size: Some("4096x4096".into()),
            quality: (endpoint == Endpoint::Edits).then(|| "high".into()),
            prompt_chars: 3,
            stream,
            partial_images: stream.then_some(3),
        };
        let held = worst_case_nanousd(&price, endpoint, &at_model, max_images).expect("priced");
        let worst = worst_case_nanousd(&price, endpoint, &whole, max_images).expect("priced");
        assert!(held <= budget && worst > budget, "{case}: {held} {worst}");

        let (key, key_id) = budgeted(&*gw.store, &format!("capped-{index}"), budget).await;
        let form = big_form(endpoint, model_first, stream);
        let response = gw.post_form_as(&key, path_of(endpoint), &form).await;
        let status = response.status().as_u16();
        let body: Value = response.json().await.expect("json");
        assert_eq!(status, 429, "{case}: {body}");
        assert_eq!(
            body["error"]["code"], "insufficient_quota",
            "{case}: {body}"
        );
        let state = settled(&*gw.store, key_id).await;
        assert_eq!(
            (state.spent_nanousd, state.reserved_nanousd),
            (0, 0),
            "{case}: nothing spent, the hold given back"
        );
    }
    assert!(
        provider.complete_requests().is_empty(),
        "no provider received a whole (billable) request"
    );
    assert!(all_rows(&*gw.store).await.is_empty(), "nothing billed");
    // As a job: received whole, then refused when it runs, unsent.
    let (key, _) = budgeted(&*gw.store, "capped-job", budget).await;
    let form = big_form(Endpoint::Edits, false, false);
    let response = gw
        .client
        .post(gw.url("/v1/images/edits"))
        .bearer_auth(&key)
        .header("content-type", form.content_type())
        .header("prefer", "respond-async")
        .body(form.body())
        .send()
        .await
        .expect("reaches imagegate");
    assert_eq!(response.status(), 202);
    let job: Value = response.json().await.expect("json");
    let id = job["id"].as_str().expect("id").to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    let job = loop {
        let job: Value = gw
            .get_as(&key, &format!("/v1/images/jobs/{id}"))
            .await
            .json()
            .await
            .expect("json");
        if job["status"] == "failed" || Instant::now() > deadline {
            break job;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(job["status_code"], 429, "{job}");
    assert_eq!(job["error"]["code"], "insufficient_quota", "{job}");
    assert!(provider.complete_requests().is_empty());
    // The same fields before `model` are refused before anything is sent, as before.
    let (key, _) = budgeted(&*gw.store, "capped-before", budget).await;
    let form = Form::new()
        .text("prompt", "fox")
        .text("n", "10")
        .text("size", "4096x4096")
        .text("quality", "high")
        .text("model", "gpt-image-2")
        .image();
    let response = gw.post_form_as(&key, "/v1/images/edits", &form).await;
    assert_eq!(response.status(), 429);
    gw.shutdown().await;
}

async fn fields_after_the_model_raise_a_hold_the_budget_covers(db: Db) {
    let provider = StandIn::start(provider_answers_ten_images()).await;
    let gw = TestGateway::start(db, &test_config(&provider.base_url(), "")).await;
    let budget = 100 * USD;
    let (key, key_id) = budgeted(&*gw.store, "roomy", budget).await;
    let form = big_form(Endpoint::Edits, false, false);
    let response = gw.post_form_as(&key, "/v1/images/edits", &form).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["data"].as_array().map(Vec::len), Some(10));
    let rows = gw.usage_rows(1).await;
    let cost = rows[0].cost_nanousd.expect("priced");
    assert_eq!(rows[0].size.as_deref(), Some("4096x4096"));
    let state = settled(&*gw.store, key_id).await;
    assert_eq!((state.spent_nanousd, state.reserved_nanousd), (cost, 0));
    assert!(cost <= budget);
    let sent = provider.complete_requests();
    assert_eq!(sent.len(), 1);
    gw.shutdown().await;
}

async fn a_field_sent_twice_is_refused_and_nothing_is_billed(db: Db) {
    let provider = StandIn::start(provider_answers_ten_images()).await;
    let gw = TestGateway::start(db, &test_config(&provider.base_url(), "")).await;
    // dall-e-2 at $0.02 an image: `n=1` before `model` holds $0.02 of $0.05; the `n=10`
    // after it would have been forwarded too, and billed at $0.20.
    let (key, key_id) = budgeted(&*gw.store, "small", USD / 20).await;
    let form = Form::new()
        .text("n", "1")
        .text("model", "dall-e-2")
        .text("prompt", "fox")
        .image()
        .text("n", "10");
    let response = gw.post_form_as(&key, "/v1/images/edits", &form).await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["param"], "n", "{body}");
    assert_eq!(body["error"]["code"], "duplicate_parameter", "{body}");
    // Twice before `model`, and `model` itself twice.
    for form in [
        Form::new()
            .text("size", "256x256")
            .text("size", "1024x1024")
            .text("model", "dall-e-2")
            .text("prompt", "fox")
            .image(),
        Form::new()
            .text("model", "dall-e-2")
            .text("prompt", "fox")
            .text("model", "gpt-image-2")
            .image(),
    ] {
        let response = gw.post_form_as(&key, "/v1/images/edits", &form).await;
        assert_eq!(response.status(), 400);
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["error"]["code"], "duplicate_parameter", "{body}");
    }
    // JSON: the same refusal, naming the field.
    let response = gw
        .post_json_as(
            &key,
            "/v1/images/generations",
            r#"{"model":"dall-e-2","prompt":"fox","n":1,"n":10}"#,
        )
        .await;
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("json");
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "n", "{body}");
    assert!(
        provider.complete_requests().is_empty(),
        "nothing reached a provider whole"
    );
    assert!(all_rows(&*gw.store).await.is_empty(), "nothing billed");
    let state = settled(&*gw.store, key_id).await;
    assert_eq!((state.spent_nanousd, state.reserved_nanousd), (0, 0));
    gw.shutdown().await;
}
