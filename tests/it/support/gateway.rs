//! A real imagegate on port 0 in front of stand-in providers, on a fresh database, with one
//! valid key; and the captured SDK requests replayed through it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use imagegate::Gateway;
use imagegate::config::{Config, EnvLookup};
use imagegate::server::Listeners;
use imagegate::store::{JobRow, Store};
use imagegate::usage::UsageRow;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::captures::Capture;
use super::forms::Form;
use super::{Db, test_env};

/// Writes `config_toml` into `dir` as imagegate.toml, with its spool, journal and results
/// in `dir` and its database at `database_url`; returns the file's path.
pub fn write_config(dir: &Path, database_url: &str, config_toml: &str) -> PathBuf {
    let config_toml = config_toml.replacen(
        "[server]\n",
        &format!(
            "[server]\nspool_dir = \"{}\"\njournal_dir = \"{}\"\n",
            dir.join("spool").display(),
            dir.join("journal").display()
        ),
        1,
    );
    // Results in `dir` too, unless the test names its own result store (replicas share one).
    let config_toml = if config_toml.contains("[results]\n") {
        config_toml
    } else {
        format!(
            "{config_toml}\n[results]\nurl = \"file://{}\"\n",
            dir.join("results").display()
        )
    };
    let config_toml = format!("{config_toml}\n[database]\nurl = \"{database_url}\"\n");
    let config_path = dir.join("imagegate.toml");
    std::fs::write(&config_path, config_toml).expect("write config");
    config_path
}

/// A gateway started on `config` (its database migrated) and a key named `name` it accepts.
pub async fn start_with_key(config: Config, name: &str) -> (Gateway, String) {
    start_with_key_in(config, name, test_env()).await
}

/// [`start_with_key`] with the environment `env` (an S3 server's variables, say).
pub async fn start_with_key_in(config: Config, name: &str, env: EnvLookup) -> (Gateway, String) {
    let gateway = Gateway::start(config, env).await.expect("gateway starts");
    let issued = imagegate::auth::issue_key(name);
    gateway
        .state
        .store
        .create_key(issued.new.clone())
        .await
        .expect("create key");
    (gateway, issued.key)
}

/// A running imagegate with one valid key, on a fresh database.
pub struct TestGateway {
    pub addr: SocketAddr,
    /// The metrics listener's address, when the config sets `server.metrics_listen`.
    pub metrics_addr: Option<SocketAddr>,
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
            Db::Postgres => super::db::fresh_postgres().await.1,
            Db::Sqlite => format!("sqlite:{}", dir.path().join("imagegate.db").display()),
        };
        Self::start_in(dir, &database_url, config_toml, "svc-test", test_env()).await
    }

    /// A gateway on the database `database_url` names (migrated at start).
    pub async fn start_on(database_url: &str, config_toml: &str) -> TestGateway {
        Self::start_on_as(database_url, config_toml, "svc-test").await
    }

    /// A gateway on the database `database_url` names whose key is called `key_name`: one
    /// replica among several on one database (key names are unique among active keys).
    pub async fn start_on_as(database_url: &str, config_toml: &str, key_name: &str) -> TestGateway {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, database_url, config_toml, key_name, test_env()).await
    }

    /// [`TestGateway::start_on_as`] with the environment `env` (an S3 server's variables).
    pub async fn start_on_with_env(
        database_url: &str,
        config_toml: &str,
        key_name: &str,
        env: EnvLookup,
    ) -> TestGateway {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, database_url, config_toml, key_name, env).await
    }

    async fn start_in(
        dir: tempfile::TempDir,
        database_url: &str,
        config_toml: &str,
        key_name: &str,
        env: EnvLookup,
    ) -> TestGateway {
        let config_path = write_config(dir.path(), database_url, config_toml);
        let config = Config::load(&config_path, &env).expect("valid test config");
        let listeners = Listeners::bind(
            "127.0.0.1:0".parse().expect("address"),
            config.server.workers,
        )
        .expect("bind imagegate")
        .with_metrics(config.server.metrics_listen)
        .expect("bind the metrics listener");
        let addr = listeners.local_addr();
        let metrics_addr = listeners.metrics_addr();
        let (gateway, key) = start_with_key_in(config, key_name, env).await;
        let store = Arc::clone(&gateway.state.store);
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        #[expect(clippy::disallowed_methods, reason = "the test joins it in shutdown()")]
        let join = tokio::spawn(gateway.serve(listeners, async move { stopped.cancelled().await }));
        TestGateway {
            addr,
            metrics_addr,
            key,
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

    /// Where this gateway keeps its async jobs' results (unless the test named its own
    /// result store).
    pub fn job_results_dir(&self) -> PathBuf {
        self._dir.path().join("results").join("jobs")
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

    /// `/metrics`'s text, from the metrics listener when there is one.
    pub async fn metrics(&self) -> String {
        let url = match self.metrics_addr {
            Some(addr) => format!("http://{addr}/metrics"),
            None => self.url("/metrics"),
        };
        self.client
            .get(url)
            .send()
            .await
            .expect("send")
            .text()
            .await
            .expect("text")
    }

    /// The value of one series on `/metrics` (`name{labels}` as written there), 0 when it is
    /// not there. The recorder is the process's, so counters add up over the tests run.
    pub async fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map_or(0.0, |v| v.trim().parse().expect("metric value"))
    }

    /// `/readyz`'s JSON body, whatever its status.
    pub async fn readyz(&self) -> serde_json::Value {
        self.client
            .get(self.url("/readyz"))
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json")
    }

    /// POSTs JSON with the test key.
    pub async fn post_json(&self, path: &str, body: &str) -> reqwest::Response {
        self.post_json_as(&self.key, path, body).await
    }

    /// POSTs a JSON `body` to `path` with `key`.
    pub async fn post_json_as(&self, key: &str, path: &str, body: &str) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .expect("request reaches imagegate")
    }

    /// GETs `path` with `key`.
    pub async fn get_as(&self, key: &str, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .bearer_auth(key)
            .send()
            .await
            .expect("request reaches imagegate")
    }

    /// POSTs a multipart `form` with the test key.
    pub async fn post_form(&self, path: &str, form: &Form) -> reqwest::Response {
        self.post_form_as(&self.key, path, form).await
    }

    /// POSTs a multipart `form` with `key`.
    pub async fn post_form_as(&self, key: &str, path: &str, form: &Form) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .bearer_auth(key)
            .header("content-type", form.content_type())
            .body(form.body())
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

/// The stored job `id`, whichever key's and however old.
pub async fn stored_job(store: &dyn Store, id: &str) -> Option<JobRow> {
    let long_ago = chrono::DateTime::<chrono::Utc>::UNIX_EPOCH;
    for key in store.list_keys().await.expect("list keys") {
        if let Some(job) = store.job(id, key.id, long_ago).await.expect("read job") {
            return Some(job);
        }
    }
    None
}

/// Every usage row in the store, oldest first.
pub async fn all_rows(store: &dyn Store) -> Vec<UsageRow> {
    let mut rows = store.recent_usage(10_000).await.expect("list usage");
    rows.reverse();
    rows
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
