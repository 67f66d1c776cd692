//! A real S3-protocol server for the result store's tests: moto's server (`moto[server]`
//! from PyPI, pinned and installed into target/tmp by `scripts/ensure-s3-server`), one per
//! test on a free port, ended with the test. moto speaks the S3 API that `object_store`
//! uses (PUT, GET, HEAD, DELETE, multipart uploads, ListObjectsV2) and keeps objects in
//! memory.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};

use imagegate::config::EnvLookup;

/// The credentials moto accepts (it checks none); a region, since S3 requests are signed
/// for one.
const CREDENTIALS: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", "imagegate-test"),
    ("AWS_SECRET_ACCESS_KEY", "imagegate-test-secret"),
    ("AWS_REGION", "us-east-1"),
];

/// moto's server, installed once per test run.
fn moto_server() -> &'static Path {
    static SERVER: OnceLock<PathBuf> = OnceLock::new();
    SERVER.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ensure-s3-server");
        let out = Command::new(&script)
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/ensure-s3-server");
        assert!(
            out.status.success(),
            "scripts/ensure-s3-server failed: the result store's S3 tests need moto's server \
             (python3 with venv and pip; scripts/test installs it)"
        );
        PathBuf::from(String::from_utf8(out.stdout).expect("utf-8").trim())
    })
}

/// A running moto server, stopped when dropped.
pub struct S3Server {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl S3Server {
    /// Starts a server on a free port and waits until it says where it listens.
    pub async fn start() -> S3Server {
        tokio::task::spawn_blocking(Self::start_blocking)
            .await
            .expect("start moto")
    }

    fn start_blocking() -> S3Server {
        let mut child = Command::new(moto_server())
            .args(["-H", "127.0.0.1", "-p", "0"])
            .env("PYTHONUNBUFFERED", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn moto_server");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let mut seen = String::new();
        let endpoint = loop {
            let Some(Ok(line)) = lines.next() else {
                let _ = child.kill();
                panic!("moto_server exited before listening:\n{seen}");
            };
            seen.push_str(&line);
            seen.push('\n');
            if let Some(rest) = line.split("Running on ").nth(1) {
                break rest.split_whitespace().next().expect("address").to_owned();
            }
        };
        // moto logs every request on stderr: keep reading so that it never blocks on a
        // full pipe. The thread ends with the process.
        std::thread::spawn(move || for _ in lines.by_ref() {});
        S3Server { child, endpoint }
    }

    /// Creates the bucket `name` (moto takes the request unsigned).
    pub async fn create_bucket(&self, name: &str) {
        let response = reqwest::Client::new()
            .put(format!("{}/{name}", self.endpoint))
            .send()
            .await
            .expect("create bucket");
        assert!(
            response.status().is_success(),
            "create bucket: {response:?}"
        );
    }

    /// The variables that point `object_store` at this server.
    pub fn vars(&self) -> Vec<(&'static str, String)> {
        let mut vars: Vec<(&'static str, String)> = CREDENTIALS
            .iter()
            .map(|(name, value)| (*name, (*value).to_owned()))
            .collect();
        vars.push(("AWS_ENDPOINT_URL", self.endpoint.clone()));
        vars.push(("AWS_ALLOW_HTTP", "true".to_owned()));
        vars
    }

    /// The tests' environment ([`super::test_env`]) with [`S3Server::vars`] added.
    pub fn env(&self) -> EnvLookup {
        let base = super::test_env();
        let vars: HashMap<&'static str, String> = self.vars().into_iter().collect();
        Arc::new(move |name| vars.get(name).cloned().or_else(|| base(name)))
    }
}
