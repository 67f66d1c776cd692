//! A real imagegate on port 0 in front of stand-in providers (real HTTP servers on port 0),
//! on a fresh database, and the captured SDK requests to replay through it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::response::Response;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::BodyExt;
use imagegate::Gateway;
use imagegate::config::{Config, EnvLookup};
use imagegate::server::Listeners;
use imagegate::store::Store;
use imagegate::usage::UsageRow;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Runs each listed `async fn name(db: Db)` as two tests: on Postgres and on SQLite.
#[macro_export]
macro_rules! on_both_databases {
    ($($test:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test($crate::helpers::Db::Postgres).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test($crate::helpers::Db::Sqlite).await;
                }
            )*
        }
    };
}

/// Which database a test runs on.
#[derive(Clone, Copy, Debug)]
pub enum Db {
    Postgres,
    Sqlite,
}

/// A request as a stand-in provider received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// False when the body broke off (the sender aborted it).
    pub complete: bool,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("stand-in received JSON")
    }
}

type Handler = Arc<dyn Fn(&Received) -> Response + Send + Sync>;

/// A provider stand-in: records every request and answers with `handler`.
pub struct StandIn {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Received>>>,
    handler: Arc<Mutex<Handler>>,
    /// How long the stand-in waits before answering (before its status line).
    delay: Arc<Mutex<Duration>>,
}

impl StandIn {
    pub async fn start(handler: impl Fn(&Received) -> Response + Send + Sync + 'static) -> StandIn {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind stand-in");
        let addr = listener.local_addr().expect("stand-in address");
        let received = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Mutex<Handler>> = Arc::new(Mutex::new(Arc::new(handler)));
        let delay = Arc::new(Mutex::new(Duration::ZERO));
        let (rec, h, d) = (
            Arc::clone(&received),
            Arc::clone(&handler),
            Arc::clone(&delay),
        );
        let app = axum::Router::new().fallback(move |request: Request| {
            let (rec, h, d) = (Arc::clone(&rec), Arc::clone(&h), Arc::clone(&d));
            async move {
                let (parts, body) = request.into_parts();
                let body = body.collect().await.map(|c| c.to_bytes());
                let complete = body.is_ok();
                let body = body.unwrap_or_default();
                let got = Received {
                    complete,
                    path: parts.uri.path().to_owned(),
                    headers: parts.headers,
                    body,
                };
                let handler = Arc::clone(&*h.lock().expect("handler lock"));
                let response = handler(&got);
                rec.lock().expect("received lock").push(got);
                let delay = *d.lock().expect("delay lock");
                tokio::time::sleep(delay).await;
                response
            }
        });
        #[expect(
            clippy::disallowed_methods,
            reason = "test stand-ins live until the process ends"
        )]
        tokio::spawn(async move { axum::serve(listener, app).await.expect("stand-in serve") });
        StandIn {
            addr,
            received,
            handler,
            delay,
        }
    }

    /// A stand-in answering every request with this JSON body.
    pub async fn json(status: u16, body: &str) -> StandIn {
        let body = body.to_owned();
        StandIn::start(move |_| respond(status, "application/json", body.clone())).await
    }

    pub fn set_handler(&self, handler: impl Fn(&Received) -> Response + Send + Sync + 'static) {
        *self.handler.lock().expect("handler lock") = Arc::new(handler);
    }

    pub fn set_delay(&self, delay: Duration) {
        *self.delay.lock().expect("delay lock") = delay;
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Requests whose body arrived whole.
    pub fn complete_requests(&self) -> Vec<Received> {
        self.requests().into_iter().filter(|r| r.complete).collect()
    }

    pub fn requests(&self) -> Vec<Received> {
        self.received.lock().expect("received lock").clone()
    }
}

pub fn respond(status: u16, content_type: &str, body: impl Into<Body>) -> Response {
    Response::builder()
        .status(StatusCode::from_u16(status).expect("status"))
        .header("content-type", content_type)
        .body(body.into())
        .expect("response")
}

/// A realistic JSON answer: one image per `n`, then `usage`.
pub fn image_response(n: usize, usage: &str) -> String {
    let data: Vec<String> = (0..n)
        .map(|_| format!(r#"{{"b64_json":"{PNG_B64}"}}"#))
        .collect();
    format!(
        r#"{{"created":1795251252,"background":"opaque","data":[{}],"output_format":"png","quality":"low","size":"1024x1024","usage":{usage}}}"#,
        data.join(",")
    )
}

pub const PNG_B64: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";
pub const USAGE: &str = r#"{"total_tokens":1889,"input_tokens":1124,"output_tokens":765,"input_tokens_details":{"text_tokens":19,"image_tokens":1105}}"#;

pub const PROVIDER_KEY: &str = "pk-standin-secret-0123456789";
pub const ADMIN_TOKEN: &str = "admin-token-for-tests-0123456789";

/// PiAPI's gpt-image-1 rates in nano-USD per token, as the test config sets them.
pub fn gpt_image_1_cost(text: i64, image: i64, output: i64) -> i64 {
    text * 5000 + image * 10000 + output * 40000
}

/// A configuration routing the captures' models to `provider` (named "piapi") and the
/// strip-prefix model to the same stand-in as "apiyi".
pub fn test_config(provider: &str, extra: &str) -> String {
    format!(
        r#"
default_model = "gpt-image-1"
[server]
listen = "127.0.0.1:0"
max_json_body_bytes = 65536
upstream_total_timeout = "5s"
shutdown_grace = "5s"
key_cache_ttl = "1s"

[providers.piapi]
base_url = "{provider}"
api_key_env = "TEST_PIAPI_KEY"

[providers.apiyi]
base_url = "{provider}"
api_key_env = "TEST_PIAPI_KEY"
image_field = "image[]"

[models."gpt-image-1"]
aliases = ["img-default"]
routes = [{{ provider = "piapi", model = "gpt-image-1", defaults = {{ quality = "standard" }} }}]

[models."gpt-image-2"]
routes = [{{ provider = "piapi", model = "upstream-gpt-image-2", drop = ["input_fidelity"], force = {{ moderation = "low" }} }}]

[models."dall-e-3"]
routes = [{{ provider = "piapi", model = "dall-e-3" }}]

[models."gpt-image-2-all"]
routes = [{{ provider = "apiyi", model = "gpt-image-2-all", drop = ["quality", "n"], strip_b64_prefix = true }}]

[models."gpt-image-1.5"]
routes = [{{ provider = "apiyi", model = "gpt-image-1.5" }}]

[models."dall-e-2"]
routes = [{{ provider = "piapi", model = "dall-e-2" }}]

[pricing.apiyi."gpt-image-1.5"]
text_input = 5.00
cached_text_input = 5.00
image_input = 5.00
cached_image_input = 5.00
image_output = 10.00

[pricing.piapi."dall-e-2"]
per_image = 0.02

[pricing.piapi."gpt-image-1"]
text_input = 5.00
cached_text_input = 1.25
image_input = 10.00
cached_image_input = 1.25
image_output = 40.00

[pricing.piapi."upstream-gpt-image-2"]
text_input = 5.00
cached_text_input = 1.25
image_input = 8.00
cached_image_input = 1.25
image_output = 30.00

[pricing.piapi."dall-e-3"]
per_image = 0.04

[pricing.apiyi."gpt-image-2-all"]
per_image = 0.03
{extra}
"#
    )
}

pub fn test_env() -> EnvLookup {
    let vars: HashMap<&str, &str> = [
        ("TEST_PIAPI_KEY", PROVIDER_KEY),
        ("IMAGEGATE_ADMIN_TOKEN", ADMIN_TOKEN),
    ]
    .into_iter()
    .collect();
    Arc::new(move |name| vars.get(name).map(|v| (*v).to_owned()))
}

/// A running imagegate with one valid key, on a fresh database.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub key: String,
    pub store: Arc<dyn Store>,
    pub config_path: PathBuf,
    pub client: reqwest::Client,
    stop: CancellationToken,
    join: Option<JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl TestGateway {
    pub async fn start(db: Db, config_toml: &str) -> TestGateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let database_url = match db {
            Db::Postgres => crate::db::fresh_postgres().await.1,
            Db::Sqlite => format!("sqlite:{}", dir.path().join("imagegate.db").display()),
        };
        Self::start_in(dir, &database_url, config_toml).await
    }

    /// A gateway on the database `database_url` names (migrated at start).
    pub async fn start_on(database_url: &str, config_toml: &str) -> TestGateway {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, database_url, config_toml).await
    }

    async fn start_in(
        dir: tempfile::TempDir,
        database_url: &str,
        config_toml: &str,
    ) -> TestGateway {
        let config_toml = config_toml.replacen(
            "[server]\n",
            &format!(
                "[server]\nspool_dir = \"{}\"\njournal_dir = \"{}\"\n",
                dir.path().join("spool").display(),
                dir.path().join("journal").display()
            ),
            1,
        );
        let config_toml = format!("{config_toml}\n[database]\nurl = \"{database_url}\"\n");
        let config_path = dir.path().join("imagegate.toml");
        std::fs::write(&config_path, config_toml).expect("write config");
        let config = Config::load(&config_path, &test_env()).expect("valid test config");
        let listeners = Listeners::bind(
            "127.0.0.1:0".parse().expect("address"),
            config.server.workers,
        )
        .expect("bind imagegate");
        let addr = listeners.local_addr();
        let gateway = Gateway::start(config, test_env())
            .await
            .expect("gateway starts");
        let issued = imagegate::auth::issue_key("svc-test");
        gateway
            .state
            .store
            .create_key(issued.new.clone())
            .await
            .expect("create key");
        let store = Arc::clone(&gateway.state.store);
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        #[expect(clippy::disallowed_methods, reason = "the test joins it in shutdown()")]
        let join = tokio::spawn(gateway.serve(listeners, async move { stopped.cancelled().await }));
        TestGateway {
            addr,
            key: issued.key,
            store,
            config_path,
            client: reqwest::Client::new(),
            stop,
            join: Some(join),
            _dir: dir,
        }
    }

    /// Where this gateway spools upload parts.
    pub fn spool_dir(&self) -> PathBuf {
        self._dir.path().join("spool")
    }

    /// Where this gateway journals usage rows.
    pub fn journal_dir(&self) -> PathBuf {
        self._dir.path().join("journal")
    }

    /// Request ids of the journal's intents that neither a row nor a cancel has resolved:
    /// calls the next start would record as interrupted.
    pub fn unresolved_intents(&self) -> Vec<String> {
        let mut intents = Vec::new();
        let mut resolved = std::collections::HashSet::new();
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.journal_dir())
            .expect("journal dir")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
            .collect();
        files.sort();
        for file in files {
            for line in std::fs::read_to_string(file).expect("segment").lines() {
                let value: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
                if let Some(id) = value["intent"]["request_id"].as_str() {
                    intents.push(id.to_owned());
                } else if let Some(id) = value["cancel"].as_str() {
                    resolved.insert(id.to_owned());
                } else if let Some(id) = value["request_id"].as_str() {
                    resolved.insert(id.to_owned());
                }
            }
        }
        intents.retain(|id| !resolved.contains(id));
        intents
    }

    /// How many upload spool files exist right now.
    pub fn spool_files(&self) -> usize {
        std::fs::read_dir(self.spool_dir()).map_or(0, |entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
                .count()
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// POSTs JSON with the test key.
    pub async fn post_json(&self, path: &str, body: &str) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .bearer_auth(&self.key)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .expect("request reaches imagegate")
    }

    /// Waits until imagegate has written `expected` usage rows, then returns every row.
    pub async fn usage_rows(&self, expected: usize) -> Vec<UsageRow> {
        let mut rows = Vec::new();
        for _ in 0..100 {
            rows = all_rows(&*self.store).await;
            if rows.len() >= expected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(rows.len(), expected, "usage rows: {rows:#?}");
        rows
    }

    /// Stops the gateway the way SIGTERM does and waits for it to flush.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(join) = self.join.take() {
            join.await
                .expect("gateway task")
                .expect("gateway stops cleanly");
        }
    }
}

/// Every usage row in the store, oldest first.
pub async fn all_rows(store: &dyn Store) -> Vec<UsageRow> {
    let mut rows = store.recent_usage(10_000).await.expect("list usage");
    rows.reverse();
    rows
}

/// A captured SDK request: method, path, headers and body (de-chunked).
pub struct Capture {
    pub chunked: bool,
    pub method: Method,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

pub fn captures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/captures")
}

pub fn capture(name: &str) -> Capture {
    let raw = std::fs::read(captures_dir().join(format!("{name}.http"))).expect("capture file");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| raw.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)))
        .expect("capture has a blank line after its headers");
    let head = String::from_utf8_lossy(&raw[..split.0]).into_owned();
    let mut body = raw[split.0 + split.1..].to_vec();
    let mut lines = head.lines();
    let request_line = lines.next().expect("request line");
    let mut parts = request_line.split_whitespace();
    let method = Method::from_bytes(parts.next().expect("method").as_bytes()).expect("method");
    let path = parts.next().expect("path").to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Capture {
        chunked,
        method,
        path,
        headers,
        body,
    }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size_text = String::from_utf8_lossy(&raw[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("0").trim(), 16)
            .expect("chunk size");
        raw = &raw[eol + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

/// Names of the captures whose file name contains `part`.
pub fn captures_named(part: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(captures_dir())
        .expect("captures dir")
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter_map(|n| n.strip_suffix(".http").map(str::to_owned))
        .filter(|n| n.contains(part))
        .collect();
    names.sort();
    names
}

impl TestGateway {
    /// Sends a capture as the SDK sent it, with this gateway's key instead of the SDK's.
    pub async fn replay(&self, capture: &Capture) -> reqwest::Response {
        let mut request = self
            .client
            .request(capture.method.clone(), self.url(&capture.path));
        for (name, value) in &capture.headers {
            if matches!(
                name.as_str(),
                "host" | "content-length" | "transfer-encoding" | "authorization" | "connection"
            ) {
                continue;
            }
            request = request.header(name, value);
        }
        let body = if capture.chunked {
            // Sent as the SDK sent it: chunked, with no Content-Length.
            let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
                capture.body.chunks(100).map(|c| Ok(c.to_vec())).collect();
            reqwest::Body::wrap_stream(futures_util::stream::iter(chunks))
        } else {
            reqwest::Body::from(capture.body.clone())
        };
        request
            .bearer_auth(&self.key)
            .body(body)
            .send()
            .await
            .expect("replay reaches imagegate")
    }
}
