//! A throwaway Postgres cluster, started and stopped by the test that needs an outage,
//! never the shared server: `initdb` into a temporary folder, `pg_ctl` on a free port.

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// the `postgres` user (Postgres refuses to run as root).
pub struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
}

impl Cluster {
    /// Panics with the reason when a cluster cannot be made here: the test must not pass
    /// without having stopped a database.
    pub fn start() -> Cluster {
        let bin = postgres_bin();
        let as_postgres = run_plain("id", &["-u"]).trim() == "0";
        let dir = tempfile::Builder::new()
            .prefix("imagegate-pg-")
            .tempdir()
            .expect("tempdir for the cluster");
        if as_postgres {
            let uid = run_plain("id", &["-u", "postgres"]).trim().parse().unwrap_or_else(|_| {
                panic!("running as root, the throwaway Postgres cluster needs a `postgres` user to run as, and there is none")
            });
            let gid = run_plain("id", &["-g", "postgres"])
                .trim()
                .parse()
                .expect("postgres gid");
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .expect("chown the cluster folder to postgres");
        }
        let port = StdListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let cluster = Cluster {
            dir,
            bin,
            port,
            as_postgres,
        };
        let data = cluster.data();
        cluster.pg(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        cluster.resume();
        cluster
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server and waits until it accepts connections.
    pub fn resume(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log").display().to_string();
        self.pg(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &log,
                "-o",
                &options,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    /// Stops the server at once, as a crash would (connections are cut, no checkpoint).
    pub fn stop(&self) {
        self.pg(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
    }

    /// `program` from the server's bin folder, as the `postgres` user when running as root,
    /// in the cluster's folder.
    fn command(&self, program: &Path) -> Command {
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        command.current_dir(self.dir.path());
        command
    }

    fn pg(&self, program: &str, args: &[&str]) -> Output {
        let program = self.bin.join(program);
        let mut command = self.command(&program);
        let output = command
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|err| {
                panic!(
                    "cannot run {}{}: {err}",
                    if self.as_postgres {
                        "runuser -u postgres -- "
                    } else {
                        ""
                    },
                    program.display()
                )
            });
        if !output.status.success() {
            let log =
                std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
            panic!(
                "throwaway Postgres cluster: {} {args:?} failed ({}):\n{}{}\nserver log:\n{log}",
                program.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        output
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let program = self.bin.join("pg_ctl");
        let data = self.data();
        let args = ["-D", data.as_str(), "-m", "immediate", "-w", "stop"];
        // Already stopped is fine.
        let _ = self
            .command(&program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin` holding `initdb` and `pg_ctl`.
fn postgres_bin() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!(
            "no Postgres server programs (initdb, pg_ctl) under /usr/lib/postgresql/*/bin: \
             the outage test starts its own throwaway cluster and needs them \
             (apt-get install postgresql)"
        )
    })
}

fn run_plain(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run {program}: {err}"));
    String::from_utf8_lossy(&output.stdout).into_owned()
}
