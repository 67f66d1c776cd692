//! The `imagegate` binary as people use it: config check, keys, usage reports, and `serve`
//! with SIGHUP reloads and a SIGTERM drain; its logs never carry a secret.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use imagegate::store::Store;
use imagegate::usage::UsageRow;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::binary::{self, SECRET, signal, write_config};
use crate::support::rows::usage_row;

fn imagegate(config: &Path, args: &[&str]) -> Output {
    binary::command(config)
        .args(args)
        .env("CLI_TEST_PROVIDER_KEY", SECRET)
        .output()
        .expect("run imagegate")
}

/// A temporary folder holding a [`write_config`] config that serves `models`, and its path.
fn configured(models: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), models);
    (dir, config)
}

/// The SQLite database the config in `dir` names, opened to write and read rows.
async fn open_store(dir: &tempfile::TempDir) -> Arc<dyn Store> {
    crate::support::db::open_sqlite(&dir.path().join("imagegate.db")).await
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn config_check_prints_the_table_without_secrets_and_fails_on_errors() {
    let (dir, config) = configured(&["gpt-image-1"]);
    let out = imagegate(&config, &["config", "check"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("gpt-image-1") && stdout.contains("mock -> gpt-image-1"),
        "{stdout}"
    );
    assert!(
        stdout.contains("$CLI_TEST_PROVIDER_KEY [redacted]"),
        "{stdout}"
    );
    assert!(!stdout.contains(SECRET));
    // Each price's kind and source, and a warning for the unpriced one.
    assert!(
        stdout.contains("[tokens: per 1M tokens: text in $5.00")
            && stdout.contains("[unpriced: rows record tokens, no cost]")
            && stdout.contains("price source: PiAPI page")
            && stdout.contains("price source: no page")
            && stdout.contains("text in $5.00 (cached $1.25), image in $10.00 (cached $1.25)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("warning: pricing.real.x is unpriced"),
        "{stdout}"
    );

    std::fs::write(&config, "[server]\nlisten = \"nowhere\"\n").expect("write");
    let out = imagegate(&config, &["config", "check"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("imagegate.toml") && stderr.contains("server.listen"),
        "{stderr}"
    );

    let out = imagegate(&dir.path().join("missing.toml"), &["config", "check"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("missing.toml"));
}

#[tokio::test]
async fn keys_are_shown_once_stored_hashed_and_revocable() {
    let (dir, config) = configured(&["gpt-image-1"]);
    let out = imagegate(&config, &["keys", "create", "--name", "billing-svc"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let key = text(&out.stdout).trim().to_owned();
    assert!(key.starts_with("ig-") && key.len() > 30, "{key}");
    assert!(
        text(&out.stderr).contains("revoke"),
        "tells what to do next"
    );

    let again = imagegate(&config, &["keys", "create", "--name", "billing-svc"]);
    assert!(!again.status.success());
    assert!(text(&again.stderr).contains("already exists"));

    let list = text(&imagegate(&config, &["keys", "list"]).stdout);
    assert!(
        list.contains("billing-svc") && list.contains(&key[..10]) && list.contains("active"),
        "{list}"
    );
    assert!(!list.contains(&key), "the key itself is never shown again");
    let db = std::fs::read(dir.path().join("imagegate.db")).expect("db file");
    assert!(
        !db.windows(key.len()).any(|w| w == key.as_bytes()),
        "the key is stored hashed"
    );

    assert!(
        imagegate(&config, &["keys", "revoke", "billing-svc"])
            .status
            .success()
    );
    let list = text(&imagegate(&config, &["keys", "list"]).stdout);
    assert!(list.contains("revoked"), "{list}");
    let twice = imagegate(&config, &["keys", "revoke", "billing-svc"]);
    assert!(!twice.status.success());

    // Rotation: the revoked key's name is taken by its successor.
    let rotated = imagegate(&config, &["keys", "create", "--name", "billing-svc"]);
    assert!(rotated.status.success(), "{}", text(&rotated.stderr));
    let list = text(&imagegate(&config, &["keys", "list"]).stdout);
    assert_eq!(
        list.lines()
            .filter(|line| line.starts_with("billing-svc"))
            .map(|line| line.split_whitespace().nth(4).expect("status"))
            .collect::<Vec<_>>(),
        ["revoked", "active"],
        "{list}"
    );
}

#[tokio::test]
async fn keys_take_their_limits_on_create_and_update_with_the_apis_checks() {
    let (_dir, config) = configured(&["gpt-image-1", "dall-e-3"]);
    // The model list is checked against the config without its secrets.
    let out = binary::command(&config)
        .args([
            "keys",
            "create",
            "--name",
            "search",
            "--rpm",
            "60",
            "--max-in-flight",
            "4",
        ])
        .args(["--models", "gpt-image-1, dall-e-3", "--budget-usd", "12.5"])
        .args([
            "--budget-period",
            "day",
            "--expires-at",
            "2031-01-01T00:00:00Z",
        ])
        .args(["--metadata", r#"{"team":"search"}"#])
        .env_remove("CLI_TEST_PROVIDER_KEY")
        .output()
        .expect("run imagegate");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    for shown in [
        "60 requests/min",
        "4 in flight",
        "models gpt-image-1,dall-e-3",
        "budget $12.5 per day",
        "expires 2031-01-01 00:00:00 UTC",
        r#"metadata {"team":"search"}"#,
        "keys update search",
    ] {
        assert!(stderr.contains(shown), "{shown:?} in:\n{stderr}");
    }
    let list = text(&imagegate(&config, &["keys", "list"]).stdout);
    assert!(list.contains("60 requests/min"), "{list}");

    let refusals: &[(&[&str], &str)] = &[
        (&["--models", "midjourney"], "--models"),
        (&["--rpm", "-1"], "--rpm"),
        (&["--rpm", "lots"], "--rpm"),
        (
            &["--budget-usd", "5", "--budget-period", "week"],
            "--budget-period",
        ),
        (&["--expires-at", "soon"], "--expires-at"),
        (&["--metadata", "[1]"], "--metadata"),
    ];
    for (args, flag) in refusals {
        let mut all = vec!["keys", "create", "--name", "refused"];
        all.extend_from_slice(args);
        let out = imagegate(&config, &all);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            text(&out.stderr).contains(flag),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    // A new name is plain (the admin API's rule), said on the command line's terms.
    for name in crate::admin_keys::unplain_names() {
        let out = imagegate(&config, &["keys", "create", "--name", &name]);
        assert!(!out.status.success(), "{name:?}");
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains("--name: name must be 1 to 100 characters, each an ASCII letter"),
            "{name:?}: {stderr}"
        );
    }
    let list = text(&imagegate(&config, &["keys", "list"]).stdout);
    assert!(
        !list.contains("refused") && list.lines().count() == 2,
        "a refused create leaves no key:\n{list}"
    );

    let out = imagegate(
        &config,
        &[
            "keys", "update", "search", "--rpm", "none", "--models", "none",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        !stdout.contains("requests/min") && !stdout.contains("models"),
        "{stdout}"
    );
    assert!(stdout.contains("4 in flight"), "{stdout}");
    let out = imagegate(&config, &["keys", "update", "nobody", "--rpm", "3"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no active key"),
        "{}",
        text(&out.stderr)
    );
    let out = imagegate(&config, &["keys", "update", "search"]);
    assert!(!out.status.success(), "nothing to change is an error");
}

#[tokio::test]
async fn admin_key_calls_are_logged_by_name_without_the_key_or_the_token() {
    const TOKEN: &str = "admin-token-from-the-environment-42";
    let (_dir, config) = configured(&["gpt-image-1"]);
    let mut command = binary::command(&config);
    command
        .arg("serve")
        .env("CLI_TEST_PROVIDER_KEY", SECRET)
        .env("IMAGEGATE_ADMIN_TOKEN", TOKEN);
    let (mut child, addr, log) = binary::serve(command).await.into_parts();
    let client = reqwest::Client::new();
    let created: Value = client
        .post(format!("http://{addr}/admin/keys"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"name": "audited-svc", "rpm": 10}))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let key = created["key"].as_str().expect("key").to_owned();
    let listed = client
        .get(format!("http://{addr}/admin/keys"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("send");
    assert_eq!(listed.status(), 200);
    for (method, body) in [
        (reqwest::Method::PATCH, Some(r#"{"rpm": 20}"#)),
        (reqwest::Method::DELETE, None),
    ] {
        let mut request = client
            .request(method, format!("http://{addr}/admin/keys/audited-svc"))
            .bearer_auth(TOKEN);
        if let Some(body) = body {
            request = request.body(body);
        }
        assert_eq!(request.send().await.expect("send").status(), 200);
    }
    binary::terminate(&mut child, Duration::from_secs(15)).await;
    let log = log.await.expect("log");
    let audit: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("admin call") && l.contains("audited-svc"))
        .collect();
    assert_eq!(audit.len(), 3, "{log}");
    for (line, what) in audit.iter().zip([
        "POST /admin/keys",
        "PATCH /admin/keys/{name}",
        "DELETE /admin/keys/{name}",
    ]) {
        assert!(
            line.contains("admin") && line.contains(what) && line.contains("audited-svc"),
            "{line}"
        );
    }
    assert!(
        log.lines()
            .any(|l| l.contains("admin call") && l.contains("GET /admin/keys")),
        "{log}"
    );
    assert!(
        !log.contains(&key) && !log.contains(TOKEN),
        "a key or the token in the log:\n{log}"
    );
}

fn row(id: &str, key: &str, model: &str, cost: i64, tokens: i64) -> UsageRow {
    UsageRow {
        key_name: key.into(),
        model: model.into(),
        provider: "mock".into(),
        upstream_model: model.into(),
        size: None,
        quality: None,
        text_input_tokens: tokens,
        input_tokens: tokens,
        output_tokens: tokens * 2,
        total_tokens: tokens * 3,
        cost_nanousd: Some(cost),
        latency_ms: 5,
        created_at: Utc::now(),
        ..usage_row(id)
    }
}

#[tokio::test]
async fn usage_reports_group_filter_and_format() {
    let (dir, config) = configured(&["gpt-image-1"]);
    let store = open_store(&dir).await;
    let mut old = row("r0", "a", "m1", 1, 1);
    old.created_at = Utc::now() - chrono::Duration::days(3);
    store
        .insert_usage(&[
            old,
            row("r1", "a", "m1", 30_000_000, 10),
            row("r2", "a", "m2", 41_745_000, 20),
            row("r3", "b", "m1", 5, 1),
        ])
        .await
        .expect("insert");

    let out = imagegate(
        &config,
        &["usage", "--group-by", "model", "--format", "json"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json[0]["model"], "m1");
    assert_eq!(json[0]["requests"], 3);
    assert_eq!(json[0]["cost_usd"], "0.030000006");
    assert_eq!(json[1]["total_tokens"], 60);

    let out = imagegate(
        &config,
        &["usage", "--key", "a", "--since", "24h", "--format", "csv"],
    );
    assert_eq!(
        text(&out.stdout),
        "key,requests,billed,failed,unpriced,images,text_input_tokens,image_input_tokens,\
         cached_text_input_tokens,cached_image_input_tokens,input_tokens,output_tokens,\
         total_tokens,cost_usd,cost_nanousd\na,2,2,0,0,2,30,0,0,0,30,60,90,0.071745,71745000\n"
    );
    // The model, provider and until filters, as GET /admin/usage has them.
    let out = imagegate(
        &config,
        &[
            "usage",
            "--model",
            "m1",
            "--until",
            "2d",
            "--group-by",
            "provider",
            "--format",
            "json",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json.as_array().map(Vec::len), Some(1), "{json}");
    assert_eq!(json[0]["requests"], 1, "only the row of three days ago");
    let out = imagegate(&config, &["usage", "--model", "m2", "--provider", "nope"]);
    assert!(text(&out.stdout).contains("TOTAL"), "{}", text(&out.stdout));
    assert!(
        !text(&out.stdout).contains("0.041745"),
        "{}",
        text(&out.stdout)
    );
    let out = imagegate(&config, &["usage", "--group-by", "provider"]);
    let table = text(&out.stdout);
    assert!(
        table.contains("mock") && table.contains("TOTAL") && table.contains("0.071745006"),
        "{table}"
    );
    let out = imagegate(&config, &["usage", "--key", "nobody"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "an unknown key name is an error"
    );
    assert!(
        text(&out.stderr).contains("no key named \"nobody\""),
        "{}",
        text(&out.stderr)
    );
    let out = imagegate(&config, &["usage", "--since", "yesterday-ish"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--since"));
}

#[tokio::test]
async fn usage_reports_show_unpriced_rows_as_unpriced_never_as_zero() {
    let (dir, config) = configured(&["gpt-image-1"]);
    let store = open_store(&dir).await;
    let unpriced = |id: &str| UsageRow {
        cost_nanousd: None,
        ..row(id, "a", "mini", 0, 10)
    };
    store
        .insert_usage(&[
            row("p1", "a", "m1", 30_000_000, 10),
            unpriced("u1"),
            unpriced("u2"),
        ])
        .await
        .expect("insert");

    let out = imagegate(&config, &["usage", "--group-by", "model"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let line = |group: &str| {
        table
            .lines()
            .find(|l| l.starts_with(group))
            .unwrap_or_else(|| panic!("no {group} line in\n{table}"))
            .to_owned()
    };
    assert!(line("mini").trim_end().ends_with(" unpriced"), "{table}");
    assert!(!line("mini").contains("0.00"), "{table}");
    assert!(line("m1").trim_end().ends_with(" 0.03"), "{table}");
    assert!(
        line("TOTAL").trim_end().ends_with(" 0.03 + 2 unpriced"),
        "{table}"
    );

    let out = imagegate(
        &config,
        &["usage", "--group-by", "model", "--format", "json"],
    );
    let json: Value = serde_json::from_slice(&out.stdout).expect("json");
    // The report's columns (those of GET /admin/usage): the count is `unpriced`, and an
    // all-unpriced group has neither cost.
    assert_eq!(
        (
            &json[1]["model"],
            &json[1]["cost_usd"],
            &json[1]["cost_nanousd"],
            &json[1]["unpriced"]
        ),
        (
            &Value::from("mini"),
            &Value::Null,
            &Value::Null,
            &Value::from(2)
        )
    );
    assert_eq!(json[0]["unpriced"], 0);
    let out = imagegate(
        &config,
        &["usage", "--group-by", "model", "--format", "csv"],
    );
    assert_eq!(
        text(&out.stdout).lines().nth(2),
        Some("mini,2,2,0,2,2,20,0,0,0,20,40,60,,")
    );
    let out = imagegate(&config, &["usage", "--group-by", "key", "--format", "csv"]);
    assert_eq!(
        text(&out.stdout).lines().nth(1),
        Some("a,3,3,0,2,3,30,0,0,0,30,60,90,0.03,30000000")
    );
}

#[tokio::test]
async fn usage_totals_past_i64_are_printed_exactly() {
    let (dir, config) = configured(&["gpt-image-1"]);
    let store = open_store(&dir).await;
    // Three rows at i64's largest cost and tokens, in two groups.
    let max = i64::MAX;
    store
        .insert_usage(&[
            row("h1", "a", "m1", max, max / 3),
            row("h2", "a", "m1", max, max / 3),
            row("h3", "b", "m2", max, max / 3),
        ])
        .await
        .expect("insert");
    let max = i128::from(max);
    let cost = |rows: i128| imagegate::usage::price::format_usd_sum(rows * max);

    let out = imagegate(&config, &["usage", "--format", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json[0]["cost_usd"], cost(2));
    assert_eq!(
        json[0]["total_tokens"].to_string(),
        (2 * 3 * (max / 3)).to_string()
    );

    let out = imagegate(&config, &["usage"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let total = table
        .lines()
        .find(|l| l.starts_with("TOTAL"))
        .expect("a TOTAL line");
    assert!(total.ends_with(&cost(3)), "{table}");
    assert!(total.contains(&(3 * 3 * (max / 3)).to_string()), "{table}");

    let out = imagegate(&config, &["usage", "--format", "csv"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&cost(2)),
        "{}",
        text(&out.stdout)
    );
}

/// Starts `imagegate serve` and returns it with the address it printed.
async fn serve(config: &Path) -> binary::Served {
    let mut command = binary::command(config);
    command
        .arg("serve")
        .env("CLI_TEST_PROVIDER_KEY", SECRET)
        .env("RUST_LOG", "debug");
    binary::serve(command).await.into_parts()
}

#[tokio::test]
async fn serve_reloads_on_sighup_and_drains_on_sigterm() {
    let (dir, config) = configured(&["gpt-image-1"]);
    let key = binary::create_key(&config, "svc");
    let (mut child, addr, log) = serve(&config).await;
    let client = reqwest::Client::new();
    let models_url = format!("http://{addr}/v1/models");
    let models = || crate::support::model_ids(&client, &models_url, &key);
    assert_eq!(models().await, ["gpt-image-1", "real-model"]);

    let response = client
        .post(format!("http://{addr}/v1/images/generations"))
        .bearer_auth(&key)
        .json(&serde_json::json!({"prompt": "a fox", "quality": "low"}))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-imagegate-provider"], "mock");
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["usage"]["output_tokens"], 272);

    write_config(dir.path(), &["gpt-image-1", "gpt-image-1.5"]);
    signal(&child, "-HUP");
    let mut reloaded = false;
    for _ in 0..50 {
        if models().await.contains(&"gpt-image-1.5".to_owned()) {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reloaded, "SIGHUP reloaded the routing table");
    std::fs::write(&config, "not = [valid").expect("write");
    signal(&child, "-HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        models().await,
        ["gpt-image-1", "gpt-image-1.5", "real-model"],
        "a bad file changes nothing"
    );

    let status = binary::terminate(&mut child, Duration::from_secs(15)).await;
    assert!(status.success(), "SIGTERM exits 0");
    let log = log.await.expect("log");
    assert!(log.contains("configuration refused"), "{log}");
    assert!(
        log.contains("pricing.real.x is unpriced"),
        "the start warns of unpriced routes:\n{log}"
    );
    assert!(
        log.contains("request_id") && log.contains("cost_usd"),
        "one line per request:\n{log}"
    );
    for secret in [SECRET, key.as_str(), &helpers_png()] {
        assert!(
            !log.contains(secret),
            "a secret or image bytes reached the log:\n{log}"
        );
    }
    let store = open_store(&dir).await;
    let rows = store.recent_usage(10).await.expect("rows");
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].output_tokens, rows[0].key_name.as_str()),
        (272, "svc")
    );
    // Mock price: 5 $/M text, 40 $/M output.
    assert_eq!(
        rows[0].cost_nanousd,
        Some(rows[0].text_input_tokens * 5000 + 272 * 40_000)
    );
}

#[tokio::test]
async fn logs_escape_client_text_and_have_no_colours_when_piped() {
    let (_dir, config) = configured(&["gpt-image-1"]);
    let key = binary::create_key(&config, "svc");
    let (mut child, addr, log) = serve(&config).await;
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/v1/images/generations"))
        .bearer_auth(&key)
        .json(&serde_json::json!({
            "model": "nope\n2026-01-01T00:00:00Z  INFO FORGED admin logged in\r\u{1b}[2K",
            "prompt": "a fox",
        }))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 404);
    binary::terminate(&mut child, Duration::from_secs(15)).await;
    let log = log.await.expect("log");
    assert!(
        log.contains(r"nope\n2026-01-01T00:00:00Z  INFO FORGED"),
        "the model name is logged, escaped:\n{log}"
    );
    assert!(
        !log.lines()
            .any(|line| line.contains("FORGED") && !line.contains("nope")),
        "a client's model name started a line of its own:\n{log}"
    );
    assert!(
        !log.contains('\u{1b}') && !log.contains('\r'),
        "colour codes or a raw escape in a log that is not a terminal:\n{log:?}"
    );
}

/// What a demo banner says: its base URL, key, key name and admin token.
struct DemoBanner {
    base: String,
    key: String,
    name: String,
    token: String,
    text: String,
}

/// Starts `imagegate demo` on `config` and reads its banner.
async fn start_demo(config: &Path) -> (tokio::process::Child, DemoBanner) {
    let mut child = tokio::process::Command::from(binary::command(config))
        .arg("demo")
        .env("CLI_TEST_PROVIDER_KEY", SECRET)
        .env_remove("IMAGEGATE_ADMIN_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn demo");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut fields = std::collections::HashMap::new();
    let mut text = String::new();
    while !fields.contains_key("Admin token") {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("the banner is printed")
            .expect("read")
            .expect("a banner line before exit");
        text.push_str(&line);
        text.push('\n');
        if let Some((label, value)) = line.trim().split_once(" : ") {
            let first = value.split_whitespace().next().unwrap_or("").to_owned();
            fields.insert(label.trim().to_owned(), first);
        }
    }
    // The rest of the banner, with its examples.
    while let Ok(Ok(Some(line))) =
        tokio::time::timeout(Duration::from_millis(500), lines.next_line()).await
    {
        text.push_str(&line);
        text.push('\n');
    }
    let field = |label: &str| fields.get(label).cloned().unwrap_or_default();
    let banner = DemoBanner {
        base: field("Base URL"),
        key: field("API key"),
        name: field("Key name"),
        token: field("Admin token"),
        text,
    };
    (child, banner)
}

#[tokio::test]
async fn the_demo_serves_its_key_and_admin_token_and_replaces_its_key_on_restart() {
    let (_dir, config) = configured(&["gpt-image-1"]);
    let (child, banner) = start_demo(&config).await;
    assert!(banner.key.starts_with("ig-"), "{}", banner.text);
    assert_eq!(banner.name, "demo");
    assert!(
        banner.text.contains("-H \"Prefer: respond-async\"")
            && banner.text.contains("/v1/images/jobs/"),
        "{}",
        banner.text
    );
    demo_job(&banner.base, &banner.key).await;

    // The admin API and the dashboard take the token it printed, as the README uses them.
    assert_eq!(banner.token.len(), 64, "{}", banner.text);
    assert!(
        banner
            .text
            .contains(&format!("export IMAGEGATE_ADMIN_TOKEN={}", banner.token))
            && banner.text.contains("/dashboard"),
        "{}",
        banner.text
    );
    let origin = banner.base.trim_end_matches("/v1").to_owned();
    let client = reqwest::Client::new();
    let keys: Value = client
        .get(format!("{origin}/admin/keys"))
        .bearer_auth(&banner.token)
        .send()
        .await
        .expect("admin keys")
        .json()
        .await
        .expect("json");
    assert!(keys.to_string().contains("\"demo\""), "{keys}");
    let login = client
        .post(format!("{origin}/dashboard/login"))
        .form(&[("token", banner.token.as_str())])
        .send()
        .await
        .expect("login");
    assert!(
        login.status().is_success() || login.status().is_redirection(),
        "{}",
        login.status()
    );
    signal(&child, "-TERM");
    let mut child = child;
    child.wait().await.expect("exits");

    // A second start replaces the first key: one active demo key, whatever the restarts.
    let (mut again, second) = start_demo(&config).await;
    assert_ne!(second.key, banner.key);
    assert_ne!(second.token, banner.token, "a token for each run");
    signal(&again, "-TERM");
    again.wait().await.expect("exits");
    let list = text(&imagegate(&config, &["keys", "list"]).stdout);
    let demo: Vec<&str> = list
        .lines()
        .filter(|line| line.starts_with("demo "))
        .collect();
    assert_eq!(demo.len(), 2, "{list}");
    assert!(
        demo.iter()
            .any(|line| line.contains(&second.key[..10]) && line.contains("active")),
        "{list}"
    );
    assert!(
        demo.iter()
            .any(|line| line.contains(&banner.key[..10]) && line.contains("revoked")),
        "{list}"
    );
}

/// Creates an async job on the demo's mock provider and collects it, as the banner shows.
async fn demo_job(base: &str, key: &str) {
    let client = reqwest::Client::new();
    let created: serde_json::Value = client
        .post(format!("{base}/images/generations"))
        .bearer_auth(key)
        .header("prefer", "respond-async")
        .json(&serde_json::json!({"model": "gpt-image-1", "prompt": "a red fox"}))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("json");
    let id = created["id"].as_str().expect("a job id");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let job: serde_json::Value = client
            .get(format!("{base}/images/jobs/{id}"))
            .bearer_auth(key)
            .send()
            .await
            .expect("get")
            .json()
            .await
            .expect("json");
        if job["status"] == "succeeded" {
            assert!(job["result"]["data"][0]["b64_json"].is_string(), "{job}");
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{job}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn helpers_png() -> String {
    crate::support::PNG_B64[..40].to_owned()
}

#[test]
fn database_commands_refuse_a_missing_config_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    for args in [&["keys", "list"][..], &["usage"], &["migrate"]] {
        let out = imagegate(&dir.path().join("nope.toml"), args);
        assert!(
            !out.status.success(),
            "{args:?} must not fall back to the default database"
        );
        assert!(text(&out.stderr).contains("nope.toml"), "{args:?}");
    }
}

/// `imagegate` with `args` and the environment `vars` (values `None` are removed).
fn imagegate_with(config: &Path, args: &[&str], vars: &[(&str, Option<&str>)]) -> Output {
    let mut command = binary::command(config);
    command.args(args).env("CLI_TEST_PROVIDER_KEY", SECRET);
    for (name, value) in vars {
        match value {
            Some(value) => command.env(name, value),
            None => command.env_remove(name),
        };
    }
    command.output().expect("run imagegate")
}

#[test]
fn a_misspelt_key_is_one_line_naming_the_file_the_key_and_the_likely_name() {
    let (_dir, config) = configured(&["gpt-image-1"]);
    let toml = std::fs::read_to_string(&config).expect("read");
    std::fs::write(&config, toml.replacen("{ provider = ", "{ provder = ", 1)).expect("write");
    let out = imagegate(&config, &["config", "check"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert_eq!(
        stderr,
        format!(
            "error: {}: models.real-model.routes[0].provder: unknown key `provder`; did you \
             mean `provider`?\n",
            config.display()
        )
    );
}

#[test]
fn a_setting_from_the_environment_is_blamed_on_its_variable() {
    let (_dir, config) = configured(&["gpt-image-1"]);
    let out = imagegate_with(
        &config,
        &["config", "check"],
        &[("IMAGEGATE_SERVER__LISTEN", Some("nowhere"))],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "error: environment variable IMAGEGATE_SERVER__LISTEN (server.listen): \"nowhere\" is \
         not an address like 127.0.0.1:8080\n"
    );
}

#[test]
fn every_missing_provider_key_variable_is_named_in_one_run() {
    let (_dir, config) = configured(&["gpt-image-1"]);
    let mut toml = std::fs::read_to_string(&config).expect("read");
    toml.push_str(
        "[providers.other]\nbase_url = \"http://127.0.0.1:9/v1\"\napi_key_env = \"CLI_TEST_OTHER_KEY\"\n",
    );
    std::fs::write(&config, toml).expect("write");
    let out = imagegate_with(
        &config,
        &["config", "check"],
        &[
            ("CLI_TEST_PROVIDER_KEY", None),
            ("CLI_TEST_OTHER_KEY", None),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(
        lines[0].contains(
            "providers.other.api_key_env: environment variable CLI_TEST_OTHER_KEY is not set"
        ),
        "{stderr}"
    );
    assert!(
        lines[1].contains(
            "providers.real.api_key_env: environment variable CLI_TEST_PROVIDER_KEY is not set"
        ),
        "{stderr}"
    );
}

#[test]
fn a_database_error_names_host_and_database_once_and_never_the_password() {
    let (_dir, config) = configured(&["gpt-image-1"]);
    let password = "hunter2-database-password";
    let url = format!("postgres://imagegate:{password}@127.0.0.1:1/billing_db");
    for args in [&["keys", "list"][..], &["migrate"], &["usage"]] {
        let out = imagegate_with(&config, args, &[("IMAGEGATE_DATABASE__URL", Some(&url))]);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = text(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with(
                "error: cannot open the Postgres database \"billing_db\" on 127.0.0.1:1 (set by \
                 environment variable IMAGEGATE_DATABASE__URL (database.url)): "
            ),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains(password), "{stderr}");
        assert!(
            !stderr.contains("imagegate.toml"),
            "the URL came from the environment, not the file: {stderr}"
        );
        // The refusal is said once, not by each layer.
        let refused = "Connection refused";
        assert_eq!(stderr.matches(refused).count(), 1, "{stderr}");
    }
    // From the file, the file is named.
    let toml = std::fs::read_to_string(&config).expect("read");
    let in_file = toml.replacen(
        "url = \"sqlite:",
        &format!("url = \"{url}\"\n# was: url = \"sqlite:"),
        1,
    );
    std::fs::write(&config, in_file).expect("write");
    let out = imagegate(&config, &["keys", "list"]);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("(set by {}: database.url)", config.display())),
        "{stderr}"
    );
    assert!(!stderr.contains(password), "{stderr}");
}

#[test]
fn migrate_says_when_nothing_was_new() {
    let (_dir, config) = configured(&["gpt-image-1"]);
    let total = std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite"))
        .expect("migrations")
        .count();
    let first = imagegate(&config, &["migrate"]);
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert_eq!(
        text(&first.stdout),
        format!("database migrated: {total} new of {total} migrations applied\n")
    );
    let again = imagegate(&config, &["migrate"]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_eq!(
        text(&again.stdout),
        format!("database up to date: {total} migrations, none new\n")
    );
}

#[tokio::test]
async fn usage_takes_plain_dates_as_whole_utc_days() {
    let (dir, config) = configured(&["gpt-image-1"]);
    let store = open_store(&dir).await;
    let at = |text: &str| {
        chrono::DateTime::parse_from_rfc3339(text)
            .expect("time")
            .with_timezone(&Utc)
    };
    let mut rows = Vec::new();
    for (id, time) in [
        ("d6", "2026-12-06T23:59:59Z"),
        ("d7a", "2026-12-07T00:00:00Z"),
        ("d7b", "2026-12-07T23:59:59Z"),
        ("d8", "2026-12-08T00:00:00Z"),
    ] {
        let mut r = row(id, "a", "m1", 1, 1);
        r.created_at = at(time);
        rows.push(r);
    }
    store.insert_usage(&rows).await.expect("insert");
    let requests = |args: &[&str]| {
        let mut all = vec!["usage", "--format", "json"];
        all.extend_from_slice(args);
        let out = imagegate(&config, &all);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        let json: Value = serde_json::from_slice(&out.stdout).expect("json");
        json[0]["requests"].as_i64().unwrap_or(0)
    };
    assert_eq!(
        requests(&["--since", "2026-12-07", "--until", "2026-12-07"]),
        2
    );
    assert_eq!(requests(&["--since", "2026-12-07"]), 3);
    assert_eq!(requests(&["--until", "2026-12-06"]), 1);
    assert_eq!(requests(&["--since", "2026-12-07T12:00:00Z"]), 2);
    let out = imagegate(&config, &["usage", "--since", "2026-13-07"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("a date like 2026-12-07"),
        "{}",
        text(&out.stderr)
    );
}

/// The subcommands `imagegate <path> --help` lists, and its options and arguments without a
/// description.
fn undescribed(help: &str) -> (Vec<String>, Vec<String>) {
    let (mut commands, mut bare) = (Vec::new(), Vec::new());
    let mut section = "";
    for line in help.lines() {
        if !line.starts_with(' ') {
            section = line.trim_end_matches(':');
            continue;
        }
        let entry = line.trim_start();
        // "NAME  description": a run of two spaces parts the name from its description.
        let (name, description) = match entry.split_once("  ") {
            Some((name, rest)) => (name.trim(), rest.trim()),
            None => (entry.trim(), ""),
        };
        if line.starts_with("          ") && !entry.starts_with('-') {
            continue; // a wrapped description
        }
        if section == "Commands" && name != "help" {
            commands.push(name.to_owned());
        }
        if matches!(section, "Commands" | "Options" | "Arguments")
            && (description.is_empty() || description.starts_with('['))
        {
            bare.push(format!("{section}: {name}"));
        }
    }
    (commands, bare)
}

#[test]
fn every_subcommand_and_option_has_a_help_description() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("unused.toml");
    let mut todo = vec![Vec::<String>::new()];
    let mut seen = 0;
    let mut missing = Vec::new();
    while let Some(path) = todo.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("-h");
        let out = imagegate(&config, &args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        let help = text(&out.stdout);
        let (commands, bare) = undescribed(&help);
        missing.extend(
            bare.into_iter()
                .map(|b| format!("imagegate {}: {b}", path.join(" "))),
        );
        for command in commands {
            let mut next = path.clone();
            next.push(command);
            todo.push(next);
        }
        seen += 1;
    }
    assert!(seen >= 12, "only {seen} help pages walked");
    assert!(
        missing.is_empty(),
        "no description:\n{}",
        missing.join("\n")
    );
    // The demo's help names the configuration the demo reads.
    let out = imagegate(&config, &["demo", "--help"]);
    assert!(
        text(&out.stdout).contains("config/demo.toml"),
        "{}",
        text(&out.stdout)
    );
}

#[tokio::test]
async fn healthcheck_exits_0_on_a_ready_gateway_and_1_with_one_line_when_it_is_gone() {
    let (_dir, config) = configured(&["gpt-image-1"]);
    let (mut child, addr, _log) = serve(&config).await;
    // By --url, and by the configuration's server.listen (as in the container).
    let by_url = imagegate(
        &config,
        &["healthcheck", "--url", &format!("http://{addr}")],
    );
    assert_eq!(by_url.status.code(), Some(0), "{}", text(&by_url.stderr));
    assert_eq!(
        text(&by_url.stdout),
        format!("ready: http://{addr}/readyz answered 200 OK\n")
    );
    let port = addr.rsplit(':').next().expect("port");
    let by_config = imagegate_with(
        &config,
        &["healthcheck"],
        &[("IMAGEGATE_SERVER__LISTEN", Some(&format!("0.0.0.0:{port}")))],
    );
    assert_eq!(
        by_config.status.code(),
        Some(0),
        "{}",
        text(&by_config.stderr)
    );
    binary::terminate(&mut child, Duration::from_secs(20)).await;

    let gone = imagegate(
        &config,
        &["healthcheck", "--url", &format!("http://{addr}")],
    );
    assert_eq!(gone.status.code(), Some(1));
    let stderr = text(&gone.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!("error: not ready: http://{addr}/readyz: ")),
        "{stderr}"
    );
}

#[tokio::test]
async fn secrets_are_read_from_the_files_their_file_variables_name() {
    let (dir, config) = configured(&["gpt-image-1"]);
    let secret_file = |name: &str, value: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("{value}\n")).expect("write secret");
        path.display().to_string()
    };
    const TOKEN: &str = "admin-token-from-a-secret-file-0042";
    let token_file = secret_file("admin_token", TOKEN);
    let key_file = secret_file("provider_key", SECRET);
    let other_db = dir.path().join("elsewhere.db");
    let url_file = secret_file("database_url", &format!("sqlite:{}", other_db.display()));

    // The database URL: the key commands use the file's database.
    let out = imagegate_with(
        &config,
        &["keys", "create", "--name", "from-file"],
        &[("IMAGEGATE_DATABASE__URL_FILE", Some(&url_file))],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(other_db.exists(), "the URL in the file was used");

    // The provider key and the admin token: serve with neither variable set, only the files.
    let mut command = binary::command(&config);
    command
        .arg("serve")
        .env_remove("CLI_TEST_PROVIDER_KEY")
        .env_remove("IMAGEGATE_ADMIN_TOKEN")
        .env("CLI_TEST_PROVIDER_KEY_FILE", &key_file)
        .env("IMAGEGATE_ADMIN_TOKEN_FILE", &token_file)
        .env("IMAGEGATE_DATABASE__URL_FILE", &url_file);
    let (mut child, addr, log) = binary::serve(command).await.into_parts();
    let keys = reqwest::Client::new()
        .get(format!("http://{addr}/admin/keys"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("admin keys");
    assert_eq!(keys.status(), 200);
    let body = keys.text().await.expect("body");
    assert!(body.contains("from-file"), "the file's database: {body}");
    binary::terminate(&mut child, Duration::from_secs(20)).await;
    let log = log.await.expect("log");
    assert!(!log.contains(TOKEN) && !log.contains(SECRET), "{log}");

    // Both a variable and its file variable: refused, naming both.
    let out = imagegate_with(
        &config,
        &["config", "check"],
        &[("CLI_TEST_PROVIDER_KEY_FILE", Some(&key_file))],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr)
            .contains("set CLI_TEST_PROVIDER_KEY or CLI_TEST_PROVIDER_KEY_FILE, not both"),
        "{}",
        text(&out.stderr)
    );
}
