//! The admin API for client keys: create (the key shown once), list (never a key or its
//! hash), change limits, revoke; bad input is refused with the field named and writes
//! nothing; every call needs the admin token.

use reqwest::Method;
use serde_json::{Value, json};

use crate::on_both_databases;
use crate::support::*;

/// An admin call with the admin token: its status and JSON body (null when it has none).
pub async fn admin(
    gw: &TestGateway,
    method: Method,
    path: &str,
    body: Option<&str>,
) -> (u16, Value) {
    let mut request = gw
        .client
        .request(method, gw.url(path))
        .bearer_auth(ADMIN_TOKEN);
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_owned());
    }
    let response = request.send().await.expect("admin call reaches imagegate");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn generate(gw: &TestGateway, key: &str, model: &str) -> u16 {
    let body = json!({"model": model, "prompt": "fox"}).to_string();
    gw.post_json_as(key, "/v1/images/generations", &body)
        .await
        .status()
        .as_u16()
}

on_both_databases!(
    a_key_is_shown_by_name_with_its_budget_standing,
    the_routing_table_in_force_is_shown_without_secrets,
    a_key_is_created_listed_changed_and_revoked,
    bad_input_is_refused_with_its_field_and_writes_nothing,
    new_names_are_plain_and_older_names_keep_working,
);

/// The budget fields `GET /admin/keys/{name}` and the listing give: spent, reserved and
/// remaining, in nano-dollars.
fn standing(view: &Value) -> (i64, i64, i64) {
    let figure = |name: &str| {
        view[name]
            .as_i64()
            .unwrap_or_else(|| panic!("{name}: {view}"))
    };
    (
        figure("spent_nanousd"),
        figure("reserved_nanousd"),
        figure("remaining_nanousd"),
    )
}

/// One key by name, with its budget's standing; the listing shows the same, and so does
/// `imagegate_key_budget_remaining_nanousd` on `/metrics`: while a call is in flight (its
/// worst case held) and after its row settled it (its real cost spent, nothing held).
async fn a_key_is_shown_by_name_with_its_budget_standing(db: Db) {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let per_key = "[metrics]\nper_key = true\n";
    let gw = TestGateway::start(db, &test_config(&provider.base_url(), per_key)).await;
    // The recorder is the process's: a name no other test's gauge has.
    let name = format!("budget-{}", uuid::Uuid::now_v7().simple());
    let body = json!({"name": name, "budget_usd": 5, "budget_period": "day"}).to_string();
    let (status, created) = admin(&gw, Method::POST, "/admin/keys", Some(&body)).await;
    assert_eq!(status, 201, "{created}");
    let key = created["key"].as_str().expect("key").to_owned();
    let path = format!("/admin/keys/{name}");
    let gauge = format!("imagegate_key_budget_remaining_nanousd{{key=\"{name}\"}}");
    const BUDGET: i64 = 5_000_000_000;

    let (status, shown) = admin(&gw, Method::GET, &path, None).await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["name"], name.as_str());
    assert_eq!(standing(&shown), (0, 0, BUDGET));
    assert_eq!(shown["remaining_usd"], "5.00");
    let today = chrono::Utc::now().format("%Y-%m-%dT00:00:00Z").to_string();
    assert_eq!(shown["period_start"], today.as_str(), "{shown}");
    assert!(
        shown.get("key").is_none() && shown.get("hash").is_none(),
        "{shown}"
    );
    // A key without a budget has no standing: null, not 0.
    let (_, plain) = admin(&gw, Method::GET, "/admin/keys/svc-test", None).await;
    for field in [
        "spent_nanousd",
        "reserved_nanousd",
        "remaining_nanousd",
        "remaining_usd",
    ] {
        assert_eq!(plain[field], Value::Null, "{field}: {plain}");
    }
    let (status, unknown) = admin(&gw, Method::GET, "/admin/keys/nobody", None).await;
    assert_eq!(status, 404, "{unknown}");
    assert_eq!(unknown["error"]["code"], "key_not_found");
    assert_eq!(unknown["error"]["type"], "invalid_request_error");
    assert_eq!(unknown["error"]["param"], "name");

    // In flight: the call's worst case is held, nothing spent yet.
    provider.set_delay(std::time::Duration::from_millis(1500));
    let call = generate(&gw, &key, "gpt-image-1");
    let during = async {
        assert!(
            provider.wait_for_requests(1).await,
            "the call reached the provider"
        );
        let (_, shown) = admin(&gw, Method::GET, &path, None).await;
        (standing(&shown), gw.metric(&gauge).await)
    };
    let (status, ((spent, reserved, remaining), gauge_during)) = tokio::join!(call, during);
    assert_eq!(status, 200);
    assert_eq!(spent, 0);
    assert!(reserved > 0, "the worst case is held: {reserved}");
    assert_eq!(remaining, BUDGET - reserved);
    assert_eq!(
        gauge_during, remaining as f64,
        "the gauge is what /admin/keys shows"
    );

    // Settled: its real cost spent (less than the worst case held), nothing held.
    let rows = gw.usage_rows(1).await;
    let cost = rows[0].cost_nanousd.expect("priced");
    assert!(0 < cost && cost < reserved, "cost {cost}, held {reserved}");
    let mut settled = (0, 0, 0);
    for _ in 0..50 {
        settled = standing(&admin(&gw, Method::GET, &path, None).await.1);
        if settled.1 == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(settled, (cost, 0, BUDGET - cost));
    assert_eq!(gw.metric(&gauge).await, (BUDGET - cost) as f64);
    let (_, listed) = admin(&gw, Method::GET, "/admin/keys", None).await;
    let in_list = listed["data"]
        .as_array()
        .expect("list")
        .iter()
        .find(|k| k["name"] == name.as_str())
        .expect("listed")
        .clone();
    let (_, shown) = admin(&gw, Method::GET, &path, None).await;
    assert_eq!(in_list, shown);
    assert_eq!(
        shown["spent_usd"],
        imagegate::usage::price::format_usd(cost)
    );

    // Revoked, it is still shown by name, marked so, and its gauge is gone (not its last
    // figure).
    admin(&gw, Method::DELETE, &path, None).await;
    let (status, revoked) = admin(&gw, Method::GET, &path, None).await;
    assert_eq!(
        (status, &revoked["status"]),
        (200, &json!("revoked")),
        "{revoked}"
    );
    let page = gw.metrics().await;
    assert!(
        !page.lines().any(|l| l.starts_with(&gauge)),
        "a revoked key's budget gauge stays: {gauge}"
    );
    gw.shutdown().await;
}

/// `GET /admin/config`: models, aliases, routes in order with their endpoints and prices,
/// failover, providers with timeouts and breakers, the hash; never the provider key, the
/// admin token or the database password.
async fn the_routing_table_in_force_is_shown_without_secrets(db: Db) {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let extra = r#"
[models."two-routes"]
routes = [{ provider = "piapi", model = "dall-e-2", endpoints = ["generations"] }, { provider = "apiyi", model = "no-price" }]
failover = { on_status = [502, 503], max_attempts = 2 }

[pricing.apiyi."no-price"]
unpriced = true
"#;
    let toml = test_config(&provider.base_url(), extra);
    let db_password = "db-password-never-shown-0123";
    let gw = match db {
        Db::Postgres => {
            // Trust authentication takes any password: one the URL carries and no answer may.
            let url = crate::support::db::fresh_postgres().await.1;
            let url = url.replacen("://postgres@", &format!("://postgres:{db_password}@"), 1);
            assert!(
                url.contains(db_password),
                "the test server's URL names its user: {url}"
            );
            TestGateway::start_on(&url, &toml).await
        }
        Db::Sqlite => TestGateway::start(db, &toml).await,
    };
    let response = gw
        .client
        .get(gw.url("/admin/config"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("text");
    for secret in [PROVIDER_KEY, ADMIN_TOKEN, db_password] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    let config: Value = serde_json::from_str(&text).expect("json");
    let (_, reloaded) = admin(&gw, Method::POST, "/admin/reload", None).await;
    assert_eq!(config["config_hash"], reloaded["config_hash"], "{config}");
    let model = |name: &str| {
        config["models"]
            .as_array()
            .expect("models")
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {config}"))
            .clone()
    };
    let gpt = model("gpt-image-1");
    assert_eq!(gpt["aliases"], json!(["img-default"]));
    let route = &gpt["routes"][0];
    assert_eq!(
        (
            &route["provider"],
            &route["upstream_model"],
            &route["priced"]
        ),
        (&json!("piapi"), &json!("gpt-image-1"), &json!(true)),
        "{route}"
    );
    assert_eq!(
        route["endpoints"],
        json!(["generations", "edits", "variations"])
    );
    assert_eq!(route["price"]["kind"], "tokens");
    assert_eq!(route["price"]["per_token"]["image_output_nanousd"], 40_000);
    assert_eq!(route["defaults"], json!({"quality": "standard"}));
    let two = model("two-routes");
    assert_eq!(
        two["failover"],
        json!({"on_status": [502, 503], "max_attempts": 2})
    );
    let order: Vec<(&Value, &Value)> = two["routes"]
        .as_array()
        .expect("routes")
        .iter()
        .map(|r| (&r["order"], &r["provider"]))
        .collect();
    assert_eq!(
        order,
        [(&json!(1), &json!("piapi")), (&json!(2), &json!("apiyi"))]
    );
    assert_eq!(two["routes"][0]["endpoints"], json!(["generations"]));
    assert_eq!(
        two["routes"][0]["price"],
        json!({"kind": "per_image", "per_image_nanousd": 20_000_000})
    );
    assert_eq!(two["routes"][1]["priced"], false);
    assert_eq!(two["routes"][1]["price"], json!({"kind": "unpriced"}));
    assert!(
        config["aliases"]
            .as_array()
            .expect("aliases")
            .contains(&json!({"alias": "img-default", "model": "gpt-image-1"})),
        "{config}"
    );
    let piapi = config["providers"]
        .as_array()
        .expect("providers")
        .iter()
        .find(|p| p["name"] == "piapi")
        .expect("piapi")
        .clone();
    assert_eq!(piapi["base_url"], format!("{}/", provider.base_url()));
    assert_eq!(piapi["api_key_env"], "TEST_PIAPI_KEY");
    assert_eq!(piapi["total_timeout_ms"], 5_000);
    assert_eq!(piapi["breaker"]["state"], "closed");
    assert!(piapi["breaker"]["failures"].as_u64().is_some(), "{piapi}");
    assert_eq!(config["admin_token_env"], "IMAGEGATE_ADMIN_TOKEN");
    let kind = if matches!(db, Db::Postgres) {
        "postgres"
    } else {
        "sqlite"
    };
    assert_eq!(config["database"]["kind"], kind);
    gw.shutdown().await;
}

async fn a_key_is_created_listed_changed_and_revoked(db: Db) {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = TestGateway::start(db, &test_config(&provider.base_url(), "")).await;
    let body = json!({
        "name": "search-svc", "budget_usd": 25.5, "budget_period": "month", "rpm": 120,
        "max_in_flight": 8, "models": ["img-default", "dall-e-3"],
        "expires_at": "2031-06-01T00:00:00Z", "metadata": {"team": "search", "ticket": 7}
    });
    let (status, created) = admin(&gw, Method::POST, "/admin/keys", Some(&body.to_string())).await;
    assert_eq!(status, 201, "{created}");
    let key = created["key"].as_str().expect("the key, once").to_owned();
    assert!(imagegate::auth::well_formed(&key), "{key}");
    assert_eq!(created["name"], "search-svc");
    assert_eq!(created["status"], "active");
    assert_eq!(created["budget_usd"], 25.5);
    assert_eq!(created["budget_period"], "month");
    assert_eq!(created["rpm"], 120);
    assert_eq!(created["max_in_flight"], 8);
    assert_eq!(created["models"], json!(["img-default", "dall-e-3"]));
    assert_eq!(created["expires_at"], "2031-06-01T00:00:00Z");
    assert_eq!(created["metadata"], json!({"team": "search", "ticket": 7}));
    assert!(created.get("hash").is_none(), "{created}");
    // The key works at once (a key never seen is looked up in the database).
    assert_eq!(generate(&gw, &key, "dall-e-3").await, 200);

    let (status, listed) = admin(&gw, Method::GET, "/admin/keys", None).await;
    assert_eq!(status, 200, "{listed}");
    let text = listed.to_string();
    assert!(
        !text.contains(&key) && !text.contains(&imagegate::auth::hash_key(&key)),
        "{text}"
    );
    let names: Vec<&str> = listed["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|k| k["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["svc-test", "search-svc"]);
    let listed_key = &listed["data"][1];
    assert_eq!(listed_key["rpm"], 120);
    assert_eq!(listed_key["metadata"]["team"], "search");
    assert_eq!(listed_key["prefix"], &key[..10]);

    // Left out: unchanged; null: cleared.
    let change = json!({"rpm": null, "models": ["gpt-image-1"], "metadata": {"team": "ads"}});
    let (status, changed) = admin(
        &gw,
        Method::PATCH,
        "/admin/keys/search-svc",
        Some(&change.to_string()),
    )
    .await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(changed["rpm"], Value::Null);
    assert_eq!(changed["models"], json!(["gpt-image-1"]));
    assert_eq!(changed["metadata"], json!({"team": "ads"}));
    assert_eq!(changed["max_in_flight"], 8);
    assert_eq!(changed["budget_usd"], 25.5);
    assert!(changed.get("key").is_none(), "{changed}");

    let (status, revoked) = admin(&gw, Method::DELETE, "/admin/keys/search-svc", None).await;
    assert_eq!(
        (status, &revoked["status"]),
        (200, &json!("revoked")),
        "{revoked}"
    );
    let (status, again) = admin(&gw, Method::DELETE, "/admin/keys/search-svc", None).await;
    assert_eq!(status, 404, "{again}");
    assert_eq!(again["error"]["code"], "key_not_found");
    assert_eq!(again["error"]["param"], "name");
    let (status, gone) = admin(&gw, Method::PATCH, "/admin/keys/search-svc", Some("{}")).await;
    assert_eq!(status, 404, "{gone}");
    let (_, listed) = admin(&gw, Method::GET, "/admin/keys", None).await;
    assert_eq!(listed["data"][1]["status"], "revoked");
    // key_cache_ttl is 1 s.
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    assert_eq!(generate(&gw, &key, "dall-e-3").await, 401);
    gw.shutdown().await;
}

async fn bad_input_is_refused_with_its_field_and_writes_nothing(db: Db) {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = TestGateway::start(db, &test_config(&provider.base_url(), "")).await;
    let cases: &[(&str, Option<&str>)] = &[
        (r#"{"name": "a", "rpm": 5"#, None),
        (r#"{"name": "a"} trailing"#, None),
        (r#"{"name": "a", "colour": "red"}"#, Some("colour")),
        (r#"{"rpm": 5}"#, None),
        (r#"{"name": "a", "rpm": "many"}"#, Some("rpm")),
        (r#"{"name": "a", "rpm": -1}"#, Some("rpm")),
        (
            r#"{"name": "a", "max_in_flight": 0}"#,
            Some("max_in_flight"),
        ),
        (r#"{"name": "a", "budget_usd": -0.01}"#, Some("budget_usd")),
        (
            r#"{"name": "a", "budget_usd": 1, "budget_period": "week"}"#,
            Some("budget_period"),
        ),
        (
            r#"{"name": "a", "models": ["gpt-image-1", "midjourney"]}"#,
            Some("models"),
        ),
        (
            r#"{"name": "a", "expires_at": "next week"}"#,
            Some("expires_at"),
        ),
        (r#"{"name": "a", "metadata": "owner=me"}"#, Some("metadata")),
        (r#"{"name": "svc-test"}"#, Some("name")),
        (r#"{"name": ""}"#, Some("name")),
    ];
    for (body, param) in cases {
        let (status, error) = admin(&gw, Method::POST, "/admin/keys", Some(body)).await;
        assert_eq!(status, 400, "{body}: {error}");
        assert_eq!(
            error["error"]["type"], "invalid_request_error",
            "{body}: {error}"
        );
        if let Some(param) = param {
            assert_eq!(error["error"]["param"], *param, "{body}: {error}");
        }
    }
    let (_, duplicate) = admin(
        &gw,
        Method::POST,
        "/admin/keys",
        Some(r#"{"name": "svc-test"}"#),
    )
    .await;
    assert_eq!(
        duplicate["error"]["code"], "duplicate_key_name",
        "{duplicate}"
    );
    let patches: &[(&str, &str)] = &[
        (r#"{"rpm": 0}"#, "rpm"),
        (r#"{"models": ["nope"]}"#, "models"),
        (r#"{"budget_period": "day"}"#, "budget_period"),
        (r#"{"name": "renamed"}"#, "name"),
    ];
    for (body, param) in patches {
        let (status, error) = admin(&gw, Method::PATCH, "/admin/keys/svc-test", Some(body)).await;
        assert_eq!(
            (status, &error["error"]["param"]),
            (400, &json!(param)),
            "{body}: {error}"
        );
    }
    // Nothing was written: one key, unchanged.
    let keys = gw.store.list_keys().await.expect("list");
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(keys[0].limits, Default::default());
    // A good change to an unknown key: 404.
    let (status, _) = admin(
        &gw,
        Method::PATCH,
        "/admin/keys/nobody",
        Some(r#"{"rpm": 3}"#),
    )
    .await;
    assert_eq!(status, 404);
    gw.shutdown().await;
}

#[tokio::test]
async fn the_key_routes_need_the_admin_token() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = TestGateway::start(Db::Sqlite, &test_config(&provider.base_url(), "")).await;
    for token in [
        None,
        Some(gw.key.as_str()),
        Some("admin-token-for-tests-0123456788"),
    ] {
        for (method, path) in [
            (Method::POST, "/admin/keys"),
            (Method::GET, "/admin/keys"),
            (Method::GET, "/admin/keys/svc-test"),
            (Method::GET, "/admin/config"),
            (Method::PATCH, "/admin/keys/svc-test"),
            (Method::DELETE, "/admin/keys/svc-test"),
        ] {
            let mut request = gw
                .client
                .request(method.clone(), gw.url(path))
                .body(r#"{"name":"x"}"#);
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let response = request.send().await.expect("send");
            assert_eq!(response.status(), 401, "{method} {path} with {token:?}");
            let body: Value = response.json().await.expect("json");
            assert_eq!(body["error"]["code"], "invalid_admin_token", "{body}");
        }
    }
    let keys = gw.store.list_keys().await.expect("list");
    assert_eq!(keys.len(), 1);
    assert!(keys[0].revoked_at.is_none());
    gw.shutdown().await;
}

/// Names a new key may not have: white space, markup, a formula, a bidirectional override,
/// a zero-width space, a Cyrillic letter that looks Latin, too long.
pub fn unplain_names() -> Vec<String> {
    let mut names: Vec<String> = [
        "svc 1",
        "<b>carol</b>",
        "=SUM(1+1)",
        "svc\u{202e}1",
        "svc\u{200b}1",
        "sv\u{0441}1",
        "caf\u{e9}",
        "a/b",
    ]
    .map(str::to_owned)
    .into();
    names.push("a".repeat(101));
    names
}

/// New names are ASCII letters, digits and `._-:@`, 1 to 100 characters: anything else is
/// a 400 naming `name`, and no key is made. Keys named before the rule (made here through
/// the store) still authenticate, list, change and revoke by their name.
async fn new_names_are_plain_and_older_names_keep_working(db: Db) {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = TestGateway::start(db, &test_config(&provider.base_url(), "")).await;
    for name in unplain_names() {
        let body = json!({ "name": name }).to_string();
        let (status, error) = admin(&gw, Method::POST, "/admin/keys", Some(&body)).await;
        assert_eq!(status, 400, "{name:?}: {error}");
        assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
        assert_eq!(error["error"]["param"], "name", "{error}");
        let message = error["error"]["message"].as_str().expect("message");
        assert!(message.contains(". _ - : @"), "{message}");
    }
    assert_eq!(gw.store.list_keys().await.expect("list").len(), 1);
    let plain = format!("svc-1.eu_west:team@corp{}", "x".repeat(77));
    assert_eq!(plain.len(), 100);
    let body = json!({ "name": plain }).to_string();
    let (status, created) = admin(&gw, Method::POST, "/admin/keys", Some(&body)).await;
    assert_eq!(
        (status, &created["name"]),
        (201, &json!(plain)),
        "{created}"
    );

    // Older names: used, listed, changed and revoked by name as before.
    for old in ["svc 1", "<b>carol</b>", "=SUM(1+1)"] {
        let issued = imagegate::auth::issue_key(old);
        gw.store
            .create_key(issued.new)
            .await
            .expect("an older name");
        assert_eq!(
            generate(&gw, &issued.key, "gpt-image-1").await,
            200,
            "{old:?}"
        );
        let path = format!("/admin/keys/{}", urlencoding(old));
        let (status, changed) = admin(&gw, Method::PATCH, &path, Some(r#"{"rpm": 5}"#)).await;
        assert_eq!((status, &changed["name"]), (200, &json!(old)), "{changed}");
        let (status, revoked) = admin(&gw, Method::DELETE, &path, None).await;
        assert_eq!(
            (status, &revoked["status"]),
            (200, &json!("revoked")),
            "{old:?}"
        );
    }
    let (_, listed) = admin(&gw, Method::GET, "/admin/keys", None).await;
    let names: Vec<&str> = listed["data"]
        .as_array()
        .expect("list")
        .iter()
        .map(|k| k["name"].as_str().expect("name"))
        .collect();
    assert_eq!(
        names,
        [
            "svc-test",
            plain.as_str(),
            "svc 1",
            "<b>carol</b>",
            "=SUM(1+1)"
        ]
    );
    gw.shutdown().await;
}

/// A name as one URL path segment.
fn urlencoding(name: &str) -> String {
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
