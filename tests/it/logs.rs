//! What an operator's log collector gets from `imagegate serve` with JSON logs: every line
//! of stdout and stderr is a JSON object with stable field types; each request has its
//! access line (client address behind a trusted proxy, user agent, key name, model,
//! provider, attempts); a valid `x-request-id` is kept and an invalid one replaced; each
//! failed provider attempt says why; a client that left before the answer's head still
//! gets a line (499) and a count; a retry answered from its original names it.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::support::*;

const GEN: &str = "/v1/images/generations";

/// A running binary with both of its output streams collected line by line.
struct Logged {
    child: tokio::process::Child,
    addr: String,
    stderr: tokio::task::JoinHandle<Vec<String>>,
    stdout: tokio::task::JoinHandle<Vec<String>>,
}

fn collect(
    stream: impl tokio::io::AsyncRead + Unpin + Send + 'static,
    first: Vec<String>,
) -> tokio::task::JoinHandle<Vec<String>> {
    let mut lines = BufReader::new(stream).lines();
    #[expect(
        clippy::disallowed_methods,
        reason = "ends with the child's stream; joined by the test"
    )]
    tokio::spawn(async move {
        let mut all = first;
        while let Ok(Some(line)) = lines.next_line().await {
            all.push(line);
        }
        all
    })
}

/// `imagegate serve` on `config_toml` (a fresh Postgres database) with JSON logs at
/// `info`; returns it and a key named "logged".
async fn serve_json(dir: &Path, config_toml: &str) -> (Logged, String) {
    let (store, url) = crate::support::db::fresh_postgres().await;
    let config = crate::support::gateway::write_config(dir, &url, config_toml);
    let mut command = crate::support::binary::command(&config);
    command
        .arg("serve")
        .env("TEST_PIAPI_KEY", PROVIDER_KEY)
        .env("IMAGEGATE_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    let mut child = tokio::process::Command::from(command)
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn imagegate serve");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut first = Vec::new();
    let addr = loop {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("imagegate starts")
            .expect("read")
            .unwrap_or_else(|| panic!("imagegate exited before listening:\n{first:#?}"));
        first.push(line.clone());
        let Ok(json) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if let Some(addr) = json["address"].as_str().filter(|_| {
            json["message"]
                .as_str()
                .is_some_and(|m| m.contains("listening on"))
        }) {
            break addr.to_owned();
        }
    };
    let stderr = collect(lines.into_inner().into_inner(), first);
    let stdout = collect(child.stdout.take().expect("stdout"), Vec::new());
    let issued = imagegate::auth::issue_key("logged");
    store.create_key(issued.new).await.expect("create key");
    (
        Logged {
            child,
            addr,
            stderr,
            stdout,
        },
        issued.key,
    )
}

impl Logged {
    /// Stops the server and returns every line it wrote, each parsed as JSON (a line that
    /// is not JSON fails the test).
    async fn stop(mut self) -> Vec<Value> {
        crate::support::binary::signal(&self.child, "-TERM");
        tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("exits")
            .expect("status");
        let mut lines = self.stderr.await.expect("stderr");
        lines.extend(self.stdout.await.expect("stdout"));
        lines
            .iter()
            .map(|line| {
                serde_json::from_str::<Value>(line)
                    .unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {line}\n{lines:#?}"))
            })
            .collect()
    }
}

/// Fields that name things (ids, keys, models), and exact dollars written as decimal text
/// (as the admin API writes them, beside whole nano-dollars): digits are fine there.
const NAMES: [&str; 12] = [
    "client_request_id",
    "cost_usd",
    "request_id",
    "original_request_id",
    "trace_id",
    "key",
    "model",
    "provider",
    "upstream_model",
    "user_agent",
    "message",
    "config_hash",
];

/// Numbers are numbers: no field but a name holds a number written as a string, and the
/// fields every reader sums or compares have one JSON type throughout.
fn assert_stable_types(lines: &[Value]) {
    let numeric = [
        "status",
        "latency_ms",
        "attempts",
        "attempt",
        "before",
        "after",
        "limit",
        "max_connections",
        "needed",
        "models",
        "images",
        "input_tokens",
        "output_tokens",
        "timeout_ms",
        "cost_nanousd",
    ];
    for line in lines {
        let object = line.as_object().expect("a log line is an object");
        for field in ["timestamp", "level", "target"] {
            assert!(object[field].is_string(), "{field} in {line}");
        }
        for (name, value) in object {
            if numeric.contains(&name.as_str()) {
                assert!(value.is_number(), "{name} is not a number in {line}");
            }
            if let (Value::String(text), false) = (value, NAMES.contains(&name.as_str())) {
                assert!(
                    text.parse::<f64>().is_err(),
                    "{name} holds a number as a string in {line}"
                );
            }
        }
    }
}

/// Whether `line` is of the request the client knows as `request_id` (its own id, kept as
/// the start of ours, or ours).
fn of_request(line: &Value, request_id: &str) -> bool {
    line["client_request_id"] == request_id
        || line["request_id"]
            .as_str()
            .is_some_and(|id| id == request_id || id.starts_with(&format!("{request_id}~")))
}

fn access_line<'a>(lines: &'a [Value], request_id: &str) -> &'a Value {
    let found: Vec<_> = lines
        .iter()
        .filter(|l| l["target"] == "imagegate::access" && of_request(l, request_id))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one access line for {request_id}: {lines:#?}"
    );
    found[0]
}

/// The test config: gpt-image-1 on the stand-in, "fallback" first on a closed port then on
/// the stand-in, the proxy on 127.0.0.1 trusted.
fn config(provider: &StandIn) -> String {
    let dead = dead_url();
    let extra = format!(
        r#"
[providers.dead]
base_url = "{dead}"
api_key_env = "TEST_PIAPI_KEY"
[models.fallback]
routes = [{{ provider = "dead", model = "gpt-image-1" }}, {{ provider = "piapi", model = "gpt-image-1" }}]
[pricing.dead."gpt-image-1"]
per_image = 0.05
"#
    );
    test_config(&provider.base_url(), &extra).replacen(
        "[server]\n",
        "[server]\ntrusted_proxies = [\"127.0.0.1/32\", \"::1\"]\n",
        1,
    )
}

#[tokio::test]
async fn json_logs_are_json_throughout_and_each_request_has_a_full_access_line() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let dir = tempfile::tempdir().expect("dir");
    let (served, key) = serve_json(dir.path(), &config(&provider)).await;
    let client = reqwest::Client::new();
    let url = format!("http://{}{GEN}", served.addr);
    let post = |model: &str, request_id: &str| {
        client
            .post(&url)
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .header("user-agent", "OpenAI/Python 1.99.0")
            // The client, then a proxy the gateway does not trust; 127.0.0.1 (the peer) is
            // trusted, so the last untrusted hop is the client.
            .header("x-forwarded-for", "198.51.100.23, 203.0.113.9")
            .header("x-request-id", request_id)
            .body(format!(r#"{{"model":"{model}","prompt":"fox"}}"#))
    };

    // A valid id is kept: answered back as it came, and the start of the id that names the
    // usage row (unique, whatever the client sends).
    let kept = post("gpt-image-1", "client-7f3a:1")
        .send()
        .await
        .expect("send");
    assert_eq!(kept.status(), 200);
    assert_eq!(kept.headers()["x-request-id"], "client-7f3a:1");
    kept.bytes().await.expect("body");

    // An invalid one (a slash, spaces) is replaced, and the replacement answered.
    let replaced = post("gpt-image-1", "../etc/passwd please")
        .send()
        .await
        .expect("send");
    assert_eq!(replaced.status(), 200);
    let new_id = replaced.headers()["x-request-id"]
        .to_str()
        .expect("id")
        .to_owned();
    assert!(new_id.starts_with("req_"), "{new_id}");
    replaced.bytes().await.expect("body");

    // A failover: the closed port's attempt says `refused`.
    let failed_over = post("fallback", "failover-1").send().await.expect("send");
    assert_eq!(failed_over.status(), 200);
    failed_over.bytes().await.expect("body");

    // An edit as the Python SDK sends it (multipart, its field order): the access line
    // reads the model from the upload.
    let edit = capture("python_edit_one");
    let mut request = client.request(
        edit.method.clone(),
        format!("http://{}{}", served.addr, edit.path),
    );
    for (name, value) in &edit.headers {
        if !matches!(
            name.as_str(),
            "host" | "content-length" | "transfer-encoding" | "authorization" | "connection"
        ) {
            request = request.header(name, value);
        }
    }
    let edited = request
        .header("x-request-id", "edit-1")
        .bearer_auth(&key)
        .body(edit.body.clone())
        .send()
        .await
        .expect("send");
    assert_eq!(edited.status(), 200);
    edited.bytes().await.expect("body");

    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines = served.stop().await;
    assert_stable_types(&lines);

    let line = access_line(&lines, "edit-1");
    assert_eq!(line["path"], "/v1/images/edits", "{line}");
    assert_eq!(line["model"], "gpt-image-1", "{line}");
    assert_eq!(line["provider"], "piapi", "{line}");
    assert_eq!(line["attempts"], 1, "{line}");
    assert!(
        line["user_agent"]
            .as_str()
            .is_some_and(|ua| ua.starts_with("OpenAI/Python")),
        "{line}"
    );

    let line = access_line(&lines, "client-7f3a:1");
    assert_eq!(line["client_request_id"], "client-7f3a:1", "{line}");
    let request_id = line["request_id"].as_str().expect("request_id");
    assert!(request_id.starts_with("client-7f3a:1~req_"), "{line}");
    assert_eq!(line["level"], "INFO", "{line}");
    assert_eq!(line["method"], "POST", "{line}");
    assert_eq!(line["path"], GEN, "{line}");
    assert_eq!(line["status"], 200, "{line}");
    assert!(line["latency_ms"].is_u64(), "{line}");
    assert_eq!(line["client"], "203.0.113.9", "{line}");
    assert_eq!(line["user_agent"], "OpenAI/Python 1.99.0", "{line}");
    assert_eq!(line["key"], "logged", "{line}");
    assert_eq!(line["model"], "gpt-image-1", "{line}");
    assert_eq!(line["provider"], "piapi", "{line}");
    assert_eq!(line["attempts"], 1, "{line}");
    assert!(
        line["trace_id"].as_str().is_some_and(|t| t.len() == 32),
        "{line}"
    );
    // Never the key itself, anywhere.
    let all = lines.iter().map(Value::to_string).collect::<String>();
    assert!(!all.contains(&key), "a client key reached the log");
    assert!(
        !all.contains(PROVIDER_KEY),
        "a provider key reached the log"
    );
    // The provider call's line carries the same id, as its usage row does.
    assert!(
        lines
            .iter()
            .any(|l| l["target"] == "imagegate::usage" && l["request_id"] == request_id),
        "{lines:#?}"
    );

    assert!(access_line(&lines, &new_id)["client_request_id"].is_null());

    let line = access_line(&lines, "failover-1");
    assert_eq!(line["provider"], "piapi", "{line}");
    assert_eq!(line["attempts"], 2, "{line}");
    let failed: Vec<_> = lines
        .iter()
        .filter(|l| of_request(l, "failover-1") && l["cause"].is_string())
        .collect();
    assert_eq!(failed.len(), 1, "{lines:#?}");
    assert_eq!(failed[0]["cause"], "refused", "{}", failed[0]);
    assert_eq!(failed[0]["provider"], "dead", "{}", failed[0]);
    assert_eq!(failed[0]["attempt"], 1, "{}", failed[0]);
    assert_eq!(failed[0]["level"], "WARN", "{}", failed[0]);
}

#[tokio::test]
async fn a_client_gone_before_the_answer_head_gets_a_499_line_and_a_count_and_is_billed() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    provider.set_delay(Duration::from_millis(1500));
    let dir = tempfile::tempdir().expect("dir");
    let (served, key) = serve_json(dir.path(), &config(&provider)).await;

    let body = r#"{"model":"gpt-image-1","prompt":"fox"}"#;
    let mut socket = tokio::net::TcpStream::connect(&served.addr)
        .await
        .expect("connect");
    let head = format!(
        "POST {GEN} HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {key}\r\n\
         content-type: application/json\r\nx-request-id: gone-1\r\ncontent-length: {}\r\n\r\n{body}",
        served.addr,
        body.len()
    );
    socket.write_all(head.as_bytes()).await.expect("write");
    assert!(
        provider.wait_for_requests(1).await,
        "the provider is called"
    );
    // The client gives up while the provider is still working.
    drop(socket);

    // The provider's answer still arrives and is billed; the request was counted as 499.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let metrics = reqwest::get(format!("http://{}/metrics", served.addr))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let counted = metrics
        .lines()
        .find(|l| {
            l.starts_with("imagegate_http_requests_total{")
                && l.contains(&format!("path=\"{GEN}\""))
                && l.contains("status=\"499\"")
        })
        .unwrap_or_else(|| panic!("no 499 series:\n{metrics}"));
    assert!(counted.ends_with(" 1"), "{counted}");

    let lines = served.stop().await;
    assert_stable_types(&lines);
    let line = access_line(&lines, "gone-1");
    assert_eq!(line["status"], 499, "{line}");
    assert_eq!(line["path"], GEN, "{line}");
    assert!(
        line["latency_ms"].as_u64().is_some_and(|ms| ms < 1500),
        "{line}"
    );
    // Billed as always: the provider's call has its line (and row) with the usage.
    let call = lines
        .iter()
        .find(|l| l["target"] == "imagegate::usage" && of_request(l, "gone-1"))
        .unwrap_or_else(|| panic!("no provider call line: {lines:#?}"));
    assert_eq!(call["status"], 200, "{call}");
    assert_eq!(call["output_tokens"], 765, "{call}");
}

#[tokio::test]
async fn a_retry_answered_from_its_original_names_it_in_its_access_line() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    provider.set_delay(Duration::from_millis(800));
    let dir = tempfile::tempdir().expect("dir");
    let (served, key) = serve_json(dir.path(), &config(&provider)).await;
    let client = reqwest::Client::new();
    let url = format!("http://{}{GEN}", served.addr);
    // The SDK's way: its own timeout cuts the first try, its retry says so.
    let post = |request_id: &'static str, count: &'static str| {
        client
            .post(&url)
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .header("x-stainless-retry-count", count)
            .header("x-request-id", request_id)
            .body(r#"{"model":"gpt-image-1","prompt":"fox"}"#)
    };
    let first = post("original-1", "0")
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(
        first.is_err(),
        "the first try timed out on the client's side"
    );
    let retry = post("retry-1", "1").send().await.expect("retry");
    assert_eq!(retry.status(), 200);
    assert_eq!(retry.headers()["x-request-id"], "retry-1");
    assert_eq!(retry.headers()["x-imagegate-duplicate"], "attached");
    let original = retry.headers()["x-imagegate-original-request-id"]
        .to_str()
        .expect("original id")
        .to_owned();
    assert!(original.starts_with("original-1~req_"), "{original}");
    retry.bytes().await.expect("body");
    assert_eq!(provider.requests().len(), 1, "the retry paid nothing");

    let lines = served.stop().await;
    let line = access_line(&lines, "retry-1");
    assert_eq!(line["original_request_id"], original.as_str(), "{line}");
    assert_eq!(line["status"], 200, "{line}");
    assert!(
        lines.iter().any(|l| of_request(l, "retry-1")
            && l["original_request_id"] == original.as_str()
            && l["target"] != "imagegate::access"),
        "the duplicate protection's own event names both: {lines:#?}"
    );
    // The original's client left before the head: its own line says 499.
    let line = access_line(&lines, "original-1");
    assert_eq!(line["status"], 499, "{line}");
    assert!(line["original_request_id"].is_null(), "{line}");
}
