//! Routes that serve only some endpoints: routing skips them for the others, and a model
//! none of whose routes serves an endpoint refuses it before any provider call.

use crate::generations::expect_error;
use crate::support::forms::Form;
use crate::support::*;

/// `gpt-image-1.5` behind a generations-only route (`legacy`, like APIYI's) and then an
/// all-endpoints one (`full`); `gen-only` on the legacy route alone.
fn config(legacy: &str, full: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
[providers.legacy]
base_url = "{legacy}"
api_key_env = "TEST_PIAPI_KEY"
[providers.full]
base_url = "{full}"
api_key_env = "TEST_PIAPI_KEY"
[models."gpt-image-1.5"]
routes = [
  {{ provider = "legacy", model = "gpt-image-1.5", endpoints = ["generations"] }},
  {{ provider = "full", model = "gpt-image-1.5" }},
]
[models."gen-only"]
routes = [{{ provider = "legacy", model = "gpt-image-1.5", endpoints = ["generations", "edits"] }}]
[pricing.legacy."gpt-image-1.5"]
per_image = 0.05
[pricing.full."gpt-image-1.5"]
per_image = 0.03
"#
    )
}

#[tokio::test]
async fn an_edit_skips_a_generations_only_route() {
    let legacy = StandIn::json(200, &image_response(1, USAGE)).await;
    let full = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = TestGateway::start(Db::Sqlite, &config(&legacy.base_url(), &full.base_url())).await;

    let response = gw
        .post_form("/v1/images/edits", &Form::edit("gpt-image-1.5", "p"))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-imagegate-provider"], "full");
    assert!(
        response.headers().get("x-imagegate-attempts").is_none(),
        "the skipped route is not an attempt"
    );
    response.bytes().await.expect("body");
    assert!(
        legacy.requests().is_empty(),
        "the legacy route got the edit"
    );
    assert_eq!(full.requests()[0].path, "/v1/images/edits");

    // Generations still go to the legacy route first.
    let response = gw
        .post_json(
            "/v1/images/generations",
            r#"{"model":"gpt-image-1.5","prompt":"p"}"#,
        )
        .await;
    assert_eq!(response.headers()["x-imagegate-provider"], "legacy");
    response.bytes().await.expect("body");

    let rows = gw.usage_rows(2).await;
    let seen: Vec<(&str, &str, Option<i64>)> = rows
        .iter()
        .map(|r| (r.provider.as_str(), r.endpoint.as_str(), r.cost_nanousd))
        .collect();
    assert_eq!(
        seen,
        [
            ("full", "edits", Some(30_000_000)),
            ("legacy", "generations", Some(50_000_000))
        ]
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn an_endpoint_no_route_serves_is_refused_before_any_provider() {
    let legacy = StandIn::json(200, &image_response(1, USAGE)).await;
    let full = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = TestGateway::start(Db::Postgres, &config(&legacy.base_url(), &full.base_url())).await;

    let form = Form::new().text("model", "gen-only").image();
    let error = expect_error(gw.post_form("/v1/images/variations", &form).await, 400).await;
    assert_eq!(error["code"], "unsupported_endpoint");
    assert_eq!(error["param"], "model");
    let message = error["message"].as_str().expect("message");
    assert!(
        message.contains("gen-only") && message.contains("variations"),
        "{message}"
    );

    assert!(legacy.requests().is_empty() && full.requests().is_empty());
    gw.usage_rows(0).await;
    gw.shutdown().await;
}
