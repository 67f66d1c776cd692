//! The `imagegate` binary as a test runs it: one way to build its command line, one way to
//! start `serve` with its log piped back, signals, and a config on the mock provider.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

pub const BIN: &str = env!("CARGO_BIN_EXE_imagegate");
/// The provider key the [`write_config`] config names (never sent: that provider is not called).
pub const SECRET: &str = "pk-live-very-secret-provider-key";

/// `imagegate --config <config>`, blind to an `IMAGEGATE_CONFIG` in the test's environment.
pub fn command(config: &Path) -> Command {
    let mut command = Command::new(BIN);
    command
        .arg("--config")
        .arg(config)
        .env_remove("IMAGEGATE_CONFIG");
    command
}

/// A running `imagegate serve`: its address, the log up to the line that named it, and a task
/// that collects the whole log (those lines too) until the process exits.
pub struct Serving {
    pub child: tokio::process::Child,
    pub addr: String,
    pub startup_log: String,
    pub log: tokio::task::JoinHandle<String>,
}

/// A [`Serving`] as the tests take it apart: the child, its address and its log.
pub type Served = (
    tokio::process::Child,
    String,
    tokio::task::JoinHandle<String>,
);

impl Serving {
    pub fn into_parts(self) -> Served {
        (self.child, self.addr, self.log)
    }
}

/// Starts `command` (an `imagegate serve` command line) with its log on a pipe and waits until
/// it says where it listens.
pub async fn serve(command: Command) -> Serving {
    let mut child = tokio::process::Command::from(command)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn imagegate serve");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut log = String::new();
    let addr = loop {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("imagegate starts")
            .expect("read")
            .unwrap_or_else(|| panic!("imagegate exited before listening:\n{log}"));
        log.push_str(&line);
        log.push('\n');
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.split_whitespace().next().expect("address").to_owned();
        }
    };
    let startup_log = log.clone();
    // Keep reading, so the child never blocks on a full pipe.
    #[expect(
        clippy::disallowed_methods,
        reason = "ends with the child's stderr; joined by tests that want the log"
    )]
    let log = tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            log.push_str(&line);
            log.push('\n');
        }
        log
    });
    Serving {
        child,
        addr,
        startup_log,
        log,
    }
}

/// Sends the signal `name` (`-TERM`, `-HUP`, `-9`) to `child`.
pub fn signal(child: &tokio::process::Child, name: &str) {
    let pid = child.id().expect("running").to_string();
    assert!(
        Command::new("kill")
            .args([name, &pid])
            .status()
            .expect("kill")
            .success()
    );
}

/// Sends SIGTERM to `child` and waits up to `within` for it to exit; how it exited.
pub async fn terminate(
    child: &mut tokio::process::Child,
    within: Duration,
) -> std::process::ExitStatus {
    signal(child, "-TERM");
    tokio::time::timeout(within, child.wait())
        .await
        .expect("exits")
        .expect("status")
}

/// `imagegate keys create --name <name>`, which must succeed: the new key it prints.
pub fn create_key(config: &Path, name: &str) -> String {
    let out = command(config)
        .args(["keys", "create", "--name", name])
        .env("CLI_TEST_PROVIDER_KEY", SECRET)
        .output()
        .expect("keys create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The token prices (PiAPI's gpt-image-1 rates, per 1M tokens) of a model in a config here.
pub const TOKEN_PRICES: &str = "text_input = 5.0\ncached_text_input = 1.25\nimage_input = 10.0\n\
                                cached_image_input = 1.25\nimage_output = 40.0\n";

/// A config for `serve` in `dir` (journal, spool and results folders there) on `database_url`, with
/// gpt-image-1 routed to and priced on the one provider `[providers.<provider>]`, whose
/// table holds `provider_lines`; `extra` is appended as it is.
pub fn write_one_model_config(
    dir: &Path,
    database_url: &str,
    shutdown_grace: &str,
    (provider, provider_lines): (&str, &str),
    extra: &str,
) -> PathBuf {
    let toml = format!(
        r#"
default_model = "gpt-image-1"
[server]
listen = "127.0.0.1:0"
shutdown_grace = "{shutdown_grace}"
journal_dir = "{journal}"
spool_dir = "{spool}"
[database]
url = "{database_url}"
[results]
url = "file://{results}"
[providers.{provider}]
{provider_lines}
[models."gpt-image-1"]
routes = [{{ provider = "{provider}", model = "gpt-image-1" }}]
[pricing.{provider}."gpt-image-1"]
{TOKEN_PRICES}{extra}"#,
        journal = dir.join("journal").display(),
        spool = dir.join("spool").display(),
        results = dir.join("results").display(),
    );
    let path = dir.join("imagegate.toml");
    std::fs::write(&path, toml).expect("write config");
    path
}

/// A config on a SQLite file in `dir`: the mock provider serves `models` (with a price that
/// names its source); a real-looking provider (never called, unpriced) holds a secret key.
pub fn write_config(dir: &Path, models: &[&str]) -> PathBuf {
    let mut toml = format!(
        r#"
default_model = "gpt-image-1"
[server]
listen = "127.0.0.1:0"
shutdown_grace = "5s"
journal_dir = "{}"
[database]
url = "sqlite:{}"
[results]
url = "file://{}"
[providers.mock]
kind = "mock"
delay = "10ms"
[providers.real]
base_url = "http://127.0.0.1:9/v1"
api_key_env = "CLI_TEST_PROVIDER_KEY"
[models."real-model"]
routes = [{{ provider = "real", model = "x" }}]
[pricing.real.x]
unpriced = true
source = "no page"
"#,
        dir.join("journal").display(),
        dir.join("imagegate.db").display(),
        dir.join("results").display()
    );
    for model in models {
        toml.push_str(&format!(
            "[models.\"{model}\"]\nroutes = [{{ provider = \"mock\", model = \"{model}\" }}]\n\
             [pricing.mock.\"{model}\"]\nsource = \"PiAPI page\"\n{TOKEN_PRICES}"
        ));
    }
    let path = dir.join("imagegate.toml");
    std::fs::write(&path, toml).expect("write config");
    path
}
