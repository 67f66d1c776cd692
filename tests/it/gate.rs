//! Authentication is on by default: every route of the router answers 401 without a key,
//! except the public routes, listed in one place, and the dashboard's, which send a browser
//! without a session to their login form.

use serde_json::Value;

use crate::support::*;
use imagegate::routes;

#[tokio::test]
async fn every_route_but_the_public_ones_answers_401_without_a_key() {
    let provider = StandIn::json(200, &image_response(1, "")).await;
    let gw = TestGateway::start(Db::Sqlite, &test_config(&provider.base_url(), "")).await;
    let listed = routes::list();
    let lists = [
        routes::PUBLIC,
        routes::ADMIN,
        routes::DASHBOARD,
        routes::DASHBOARD_OPEN,
    ];
    for path in lists.concat() {
        assert!(
            listed.iter().any(|(_, p)| *p == path),
            "{path} is listed but is not a route"
        );
    }
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    for (method, template) in &listed {
        let path = template.replace("{model}", "gpt-image-1");
        if routes::DASHBOARD.contains(template) || routes::DASHBOARD_OPEN.contains(template) {
            // Neither a key nor the admin token as a bearer opens a dashboard page.
            let response = no_redirects
                .request(method.clone(), gw.url(&path))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .expect("send");
            if routes::DASHBOARD.contains(template) {
                assert_eq!(response.status(), 303, "{method} {path}");
                assert_eq!(response.headers()["location"], "/dashboard/login");
            } else {
                assert_eq!(response.status(), 200, "{method} {path} is open");
            }
            continue;
        }
        for key in [None, Some("ig-not-a-key-at-all-0000000000000000000000000")] {
            let mut request = gw.client.request(method.clone(), gw.url(&path));
            if let Some(key) = key {
                request = request.bearer_auth(key);
            }
            let response = request
                .header("content-type", "application/json")
                .body(r#"{"model":"gpt-image-1","prompt":"fox"}"#)
                .send()
                .await
                .expect("send");
            let status = response.status().as_u16();
            if routes::PUBLIC.contains(template) {
                assert_eq!(status, 200, "{method} {path} is public");
                continue;
            }
            assert_eq!(status, 401, "{method} {path} with key {key:?}");
            let body: Value = response.json().await.expect("an OpenAI error body");
            assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        }
    }
    assert!(provider.requests().is_empty(), "nothing was forwarded");
    gw.shutdown().await;
}
