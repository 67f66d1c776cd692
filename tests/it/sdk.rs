//! The official OpenAI Python SDK, pointed at imagegate, generates images through a stand-in
//! provider; the usage rows hold exactly what the stand-in reported, priced by the table.

use std::path::{Path, PathBuf};
use std::process::Command;

use axum::response::Response;
use serde_json::Value;

use crate::support::*;

/// A virtualenv with the pinned SDK, made once under the target directory. Fails the test,
/// with what to do, when python3 or PyPI is missing: the suite never skips silently.
pub(crate) fn sdk_python() -> PathBuf {
    // The SDK tests run in parallel: one makes the virtualenv while the others wait for it.
    static MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("openai-sdk-venv");
    let python = venv.join("bin/python");
    let requirements = manifest.join("tests/sdk/requirements.txt");
    let marker = venv.join("installed.txt");
    let wanted = std::fs::read_to_string(&requirements).expect("requirements");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(wanted.as_str()) {
        return python;
    }
    let run = |cmd: &mut Command, what: &str| {
        let out = cmd.output().unwrap_or_else(|e| {
            panic!("{what}: cannot run it ({e}); install python3 with venv and pip")
        });
        assert!(
            out.status.success(),
            "{what} failed; the SDK test needs python3 (with venv) and access to PyPI:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(
        Command::new("python3").args(["-m", "venv"]).arg(&venv),
        "python3 -m venv",
    );
    run(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
            .arg(&requirements),
        "pip install -r tests/sdk/requirements.txt",
    );
    std::fs::write(&marker, wanted).expect("marker");
    python
}

/// Runs one of `tests/sdk/*.py` against the gateway; its JSON lines.
async fn run_sdk_script(gw: &TestGateway, script: &str) -> Vec<Value> {
    let python = tokio::task::spawn_blocking(sdk_python).await.expect("venv");
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sdk")
        .join(script);
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(gw.url("/v1"))
        .arg(&gw.key)
        .output()
        .await
        .expect("run the SDK script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "SDK script failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

#[tokio::test]
async fn the_python_sdk_with_default_retries_recovers_from_a_passing_500_and_429() {
    let failed = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let provider = StandIn::start(move |got| {
        let prompt = got.json()["prompt"].as_str().unwrap_or_default().to_owned();
        // Each prompt's first call fails, as a provider with a passing fault does.
        if failed.lock().expect("lock").insert(prompt.clone()) {
            let busy =
                r#"{"error":{"message":"busy","type":"server_error","param":null,"code":null}}"#;
            return match prompt.as_str() {
                "fails once with 429" => Response::builder()
                    .status(429)
                    .header("content-type", "application/json")
                    .header("retry-after", "1")
                    .body(busy.into())
                    .expect("response"),
                _ => respond(500, "application/json", busy),
            };
        }
        respond(200, "application/json", image_response(1, USAGE))
    })
    .await;
    // The SDKs' own wait: a retry that hangs shows as a failure, not as a pass by timeout.
    let config = test_config(&provider.base_url(), "").replacen(
        "upstream_total_timeout = \"5s\"",
        "upstream_total_timeout = \"600s\"",
        1,
    );
    let gw = TestGateway::start(Db::Postgres, &config).await;
    let calls = run_sdk_script(&gw, "retries.py").await;
    assert_eq!(calls.len(), 2, "{calls:?}");
    for call in &calls {
        assert_eq!(call["ok"], true, "{call}");
        assert_eq!(call["images"], 1);
        assert_eq!(call["usage"]["output_tokens"], 765);
    }
    assert_eq!(
        provider.requests().len(),
        4,
        "each prompt: a failure, then its retry"
    );
    let rows = gw.usage_rows(4).await;
    let mut statuses: Vec<i32> = rows.iter().map(|r| r.status).collect();
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 200, 429, 502], "exactly the provider calls");
    let billed: i64 = rows.iter().filter_map(|r| r.cost_nanousd).sum();
    assert_eq!(billed, 2 * gpt_image_1_cost(19, 1105, 765));
    gw.shutdown().await;
}

#[tokio::test]
async fn the_python_sdk_generates_through_imagegate_and_usage_matches() {
    let sse = "event: image_generation.completed\ndata: {\"type\":\"image_generation.completed\",\"b64_json\":\"B64\",\"usage\":{\"total_tokens\":300,\"input_tokens\":20,\"output_tokens\":280,\"input_tokens_details\":{\"text_tokens\":12,\"image_tokens\":8}}}\n\n".replace("B64", PNG_B64);
    let provider = StandIn::start(move |got| {
        let body = got.json();
        if body["stream"] == true {
            return respond(200, "text/event-stream", sse.clone());
        }
        let answer = image_response(1, USAGE);
        if body["model"] == "gpt-image-2-all" {
            // This provider's usage lacks input_tokens_details, and its images carry a prefix.
            let usage = r#"{"total_tokens":50,"input_tokens":10,"output_tokens":40}"#;
            let answer = image_response(1, usage)
                .replace(PNG_B64, &format!("data:image/png;base64,{PNG_B64}"));
            return respond(200, "application/json", answer);
        }
        respond(200, "application/json", answer)
    })
    .await;
    let gw = TestGateway::start(Db::Postgres, &test_config(&provider.base_url(), "")).await;
    let calls = run_sdk_script(&gw, "generate.py").await;
    assert_eq!(calls[0]["call"], "generate");
    assert_eq!(calls[0]["png"], true);
    assert_eq!(calls[0]["usage"]["input_tokens"], 1124);
    assert_eq!(calls[1]["call"], "generate_prefixed");
    assert_eq!(calls[1]["png"], true, "the data URL prefix was stripped");
    assert_eq!(
        calls[2]["types"],
        serde_json::json!(["image_generation.completed"])
    );
    assert_eq!(calls[2]["usage"][0]["output_tokens"], 280);
    assert_eq!(
        calls[3]["ids"],
        serde_json::json!([
            "dall-e-2",
            "dall-e-3",
            "gpt-image-1",
            "gpt-image-1.5",
            "gpt-image-2",
            "gpt-image-2-all",
            "img-default"
        ])
    );
    assert_eq!(calls[4]["error"], "NotFoundError");
    assert_eq!(calls[4]["status"], 404);

    let rows = gw.usage_rows(3).await;
    assert!(
        rows.iter()
            .all(|r| r.key_name == "svc-test" && r.status == 200)
    );
    let (plain, prefixed, streamed) = (&rows[0], &rows[1], &rows[2]);
    assert_eq!(
        (
            plain.text_input_tokens,
            plain.image_input_tokens,
            plain.output_tokens
        ),
        (19, 1105, 765)
    );
    assert_eq!(plain.total_tokens, 1889);
    assert_eq!(plain.cost_nanousd, Some(gpt_image_1_cost(19, 1105, 765)));
    assert_eq!(plain.quality.as_deref(), Some("low"));
    assert_eq!(plain.size.as_deref(), Some("1024x1024"));
    // Flat price: $0.03 per image returned; tokens still recorded, all input counted as text.
    assert_eq!(
        (prefixed.provider.as_str(), prefixed.cost_nanousd),
        ("apiyi", Some(30_000_000))
    );
    assert_eq!(
        (
            prefixed.text_input_tokens,
            prefixed.image_input_tokens,
            prefixed.output_tokens
        ),
        (10, 0, 40)
    );
    assert!(streamed.streamed);
    assert_eq!(
        (
            streamed.text_input_tokens,
            streamed.image_input_tokens,
            streamed.output_tokens
        ),
        (12, 8, 280)
    );
    assert_eq!(streamed.cost_nanousd, Some(gpt_image_1_cost(12, 8, 280)));
    gw.shutdown().await;
}

#[tokio::test]
async fn the_python_sdk_creates_and_collects_a_job_and_its_retry_is_billed_once() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    provider.set_delay(std::time::Duration::from_millis(200));
    let gw = TestGateway::start(Db::Sqlite, &test_config(&provider.base_url(), "")).await;
    let steps = run_sdk_script(&gw, "jobs.py").await;
    assert_eq!(steps.len(), 4, "{steps:?}");
    let (create, retry, collect, sync) = (&steps[0], &steps[1], &steps[2], &steps[3]);
    assert_eq!(create["status"], 202, "{create}");
    assert_eq!(create["job"]["status"], "queued");
    assert_eq!(retry["status"], 202, "{retry}");
    assert_eq!(
        retry["job"]["id"], create["job"]["id"],
        "the retry gets the same job"
    );
    assert_eq!(collect["job"]["status"], "succeeded", "{collect}");
    assert_eq!(
        collect["job"]["result"], sync["body"],
        "the job's result is the sync answer"
    );
    // One call for the job (its retry attached to it), one for the synchronous request.
    assert_eq!(provider.requests().len(), 2);
    let rows = gw.usage_rows(2).await;
    assert!(
        rows.iter()
            .all(|r| r.cost_nanousd == Some(gpt_image_1_cost(19, 1105, 765)))
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn the_python_sdks_field_order_cannot_take_an_edit_past_its_keys_budget() {
    // What a provider sent the whole request would bill: ten 4096x4096 images.
    let big = r#"{"total_tokens":650010,"input_tokens":10,"output_tokens":650000,"input_tokens_details":{"text_tokens":10,"image_tokens":0}}"#;
    let provider = StandIn::start(move |got| {
        let ten = String::from_utf8_lossy(&got.body).contains("4096x4096");
        let answer = if ten {
            image_response(10, big)
        } else {
            image_response(1, USAGE)
        };
        respond(200, "application/json", answer)
    })
    .await;
    let config = test_config(&provider.base_url(), "").replacen(
        "upstream_total_timeout = \"5s\"",
        "upstream_total_timeout = \"600s\"",
        1,
    );
    let gw = TestGateway::start(Db::Postgres, &config).await;
    let budget = 3_000_000_000;
    let changes = imagegate::store::KeyChanges {
        budget: Some(Some((budget, Some("total".to_owned())))),
        ..Default::default()
    };
    gw.store
        .update_key("svc-test", &changes)
        .await
        .expect("update")
        .expect("the test key");
    let calls = run_sdk_script(&gw, "budget_edit.py").await;
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0]["status"], 429, "{calls:?}");
    assert_eq!(calls[0]["code"], "insufficient_quota", "{calls:?}");
    assert_eq!(calls[1]["status"], 200, "{calls:?}");
    let whole = provider.complete_requests();
    assert_eq!(
        whole.len(),
        1,
        "only the edit the budget covers was sent whole"
    );
    let rows = gw.usage_rows(1).await;
    let spent: i64 = rows.iter().filter_map(|r| r.cost_nanousd).sum();
    assert!(spent <= budget, "spent {spent} of {budget}");
    gw.shutdown().await;
}
