//! The `imagegate` command line: parse arguments, set up logging, load the configuration,
//! call into the library.

mod cli;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use chrono::Utc;
use clap::{Parser, Subcommand};
use imagegate::config::{self, Config, DEFAULT_CONFIG_PATH};
use imagegate::server::Listeners;
use imagegate::store::{self, GroupBy, Migrated, Store, UsageFilter};
use imagegate::telemetry::{LogFormat, Telemetry};
use imagegate::{Gateway, auth};

use cli::keys::KeysCommand;
use cli::usage::{Format, Group, parse_time, print_usage};

#[derive(Parser)]
#[command(
    name = "imagegate",
    version,
    about = "OpenAI-compatible gateway for image-generation APIs"
)]
struct Cli {
    /// Configuration file [default: config/imagegate.toml; for `demo`: config/demo.toml].
    #[arg(long, global = true, env = "IMAGEGATE_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// The configuration `demo` serves unless `--config` or `IMAGEGATE_CONFIG` names another.
const DEMO_CONFIG_PATH: &str = "config/demo.toml";

#[derive(Subcommand)]
enum Command {
    /// Serve the API (SIGHUP reloads the configuration, SIGTERM/Ctrl-C drains and stops).
    Serve,
    /// Serve config/demo.toml (every model on the built-in mock provider) with a key and an
    /// admin token for the dashboard, and print them.
    Demo,
    /// Check the configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Manage client keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Report usage totals, tokens and cost.
    Usage {
        /// Only this key's usage.
        #[arg(long)]
        key: Option<String>,
        /// Only this model's usage (the name clients ask for).
        #[arg(long)]
        model: Option<String>,
        /// Only this provider's usage.
        #[arg(long)]
        provider: Option<String>,
        /// Only usage from this time on: a duration back from now (24h, 7d), a date
        /// (2026-12-07, from its first instant, UTC) or an RFC 3339 time.
        #[arg(long, value_name = "WHEN")]
        since: Option<String>,
        /// Only usage before this time: the same forms as --since (a date includes its
        /// whole day).
        #[arg(long, value_name = "WHEN")]
        until: Option<String>,
        /// One row per key, model, provider, day or hour (UTC).
        #[arg(long, value_enum, default_value = "key")]
        group_by: Group,
        /// A table for people, or the JSON or CSV of GET /admin/usage.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Apply the database migrations and exit.
    Migrate,
    /// Ask a running gateway's GET /readyz whether it is ready: exit 0 if so, 1 with one line
    /// saying why not (for a container's HEALTHCHECK).
    Healthcheck {
        /// The gateway's base URL [default: http://<server.listen>, an unspecified address
        /// such as 0.0.0.0 reached on 127.0.0.1].
        #[arg(long, value_name = "URL")]
        url: Option<String>,
        /// How long to wait for the answer.
        #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate the configuration (the file, then IMAGEGATE_* variables) and print the
    /// routing table: providers, each model's routes, prices and their sources, secrets
    /// redacted.
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = LogFormat::from_env();
    // Spans are exported by the server alone, not by a one-off command.
    let serves = matches!(cli.command, Command::Serve | Command::Demo);
    let telemetry = match Telemetry::init(format, serves) {
        Ok(telemetry) => telemetry,
        Err(err) => {
            eprintln!("error: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(endpoint) = &telemetry.exporting_to {
        // Scheme, host, port and path only: a URL's user, password or query can hold a token.
        let endpoint = reqwest::Url::parse(endpoint).map_or_else(
            |_| "(not a URL)".to_owned(),
            |url| format!("{}{}", url.origin().ascii_serialization(), url.path()),
        );
        tracing::info!(endpoint, "sending traces over OTLP/HTTP");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            report_error(format, &format!("cannot start the async runtime: {err}"));
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli, format));
    // Spans still held are sent once the runtime has stopped (the exporter blocks).
    drop(runtime);
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line per problem (a configuration can have several), each cause said once.
            for line in imagegate::error::causes(err.as_ref()).lines() {
                report_error(format, line);
            }
            ExitCode::FAILURE
        }
    }
}

/// The error a command ends with: `error: ...` for a person, a log line in JSON logs.
fn report_error(format: LogFormat, error: &str) {
    match format {
        LogFormat::Json => tracing::error!(error, "imagegate stopped on an error"),
        LogFormat::Text => eprintln!("error: {error}"),
    }
}

/// A line the server always writes, whatever `RUST_LOG` filters out: text as it is, or a
/// JSON line with its fields in JSON logs.
fn announce(format: LogFormat, message: &str, fields: serde_json::Value) {
    match format {
        LogFormat::Text => eprintln!("{message}"),
        LogFormat::Json => {
            let mut line = serde_json::json!({
                "timestamp": Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                "level": "INFO",
                "message": message,
                "target": "imagegate",
            });
            if let (Some(line), serde_json::Value::Object(fields)) = (line.as_object_mut(), fields)
            {
                line.extend(fields);
            }
            eprintln!("{line}");
        }
    }
}

async fn run(cli: Cli, format: LogFormat) -> anyhow::Result<()> {
    let env = config::process_env();
    let config_path = cli
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
    match cli.command {
        Command::Serve => {
            let config = Config::load(&config_path, &env)?;
            serve(config, env, None, format).await
        }
        Command::Demo => {
            let path = cli
                .config
                .unwrap_or_else(|| PathBuf::from(DEMO_CONFIG_PATH));
            let config = Config::load(&path, &env)?;
            // The dashboard and the admin API need a token: one made for this run, unless
            // the operator set one.
            if config.admin_token.is_some() {
                let var = config.admin_token_env.clone();
                serve(config, env, Some(DemoAdmin::Set(var)), format).await
            } else {
                let token = hex::encode(rand::random::<[u8; 32]>());
                let var = config.admin_token_env.clone();
                let inner = std::sync::Arc::clone(&env);
                let (name, value) = (var.clone(), token.clone());
                let env: config::EnvLookup = std::sync::Arc::new(move |wanted| {
                    if wanted == name {
                        Some(value.clone())
                    } else {
                        inner(wanted)
                    }
                });
                let config = Config::load(&path, &env)?;
                serve(config, env, Some(DemoAdmin::Made { var, token }), format).await
            }
        }
        Command::Config {
            command: ConfigCommand::Check,
        } => {
            let config = Config::load(&config_path, &env)?;
            cli::config::print_routing_table(&config);
            Ok(())
        }
        Command::Keys { command } => {
            let (store, _) = open_store(&config_path).await?;
            cli::keys::run(&*store, &config_path, command).await
        }
        Command::Usage {
            key,
            model,
            provider,
            since,
            until,
            group_by,
            format,
        } => {
            let filter = UsageFilter {
                key_name: key.clone(),
                model,
                provider,
                since: since.map(|t| parse_time("--since", &t)).transpose()?,
                until: until.map(|t| parse_time("--until", &t)).transpose()?,
                group_by: GroupBy::from(group_by),
            };
            let (store, _) = open_store(&config_path).await?;
            let rows = store.usage_report(&filter).await?;
            // No rows for a name that no key ever had is a typo, not "no usage".
            if let (Some(name), true) = (&key, rows.is_empty()) {
                let keys = store.list_keys().await?;
                anyhow::ensure!(
                    keys.iter().any(|k| &k.name == name),
                    "no key named {name:?} (see: imagegate keys list)"
                );
            }
            print_usage(&rows, filter.group_by, format)
        }
        Command::Migrate => {
            let (_, migrated) = open_store(&config_path).await?;
            if migrated.new == 0 {
                println!(
                    "database up to date: {} migrations, none new",
                    migrated.total
                );
            } else {
                println!(
                    "database migrated: {} new of {} migrations applied",
                    migrated.new, migrated.total
                );
            }
            Ok(())
        }
        Command::Healthcheck { url, timeout } => {
            let url = match url {
                Some(url) => cli::healthcheck::given_url(&url),
                None => cli::healthcheck::readyz_url(config::load_listen_address(&config_path)?),
            };
            match cli::healthcheck::check(&url, timeout).await {
                Ok(line) => {
                    println!("{line}");
                    Ok(())
                }
                Err(line) => anyhow::bail!(line),
            }
        }
    }
}

/// The key and usage commands only need the database, not the provider keys.
async fn open_store(config: &Path) -> anyhow::Result<(std::sync::Arc<dyn Store>, Migrated)> {
    let (url, place) = config::load_database_url(config)?;
    let what = format!("{} (set by {place})", url.describe());
    store::open(url.as_str(), &what).await
}

/// The demo's admin token: the operator's own, or one made for this run.
enum DemoAdmin {
    /// Set by the operator in this variable; not shown.
    Set(String),
    /// Made for this run (the variable is the one the configuration names).
    Made { var: String, token: String },
}

async fn serve(
    config: Config,
    env: config::EnvLookup,
    demo: Option<DemoAdmin>,
    format: LogFormat,
) -> anyhow::Result<()> {
    open_files(config.server.max_connections.get());
    let addr = config.server.listen;
    let listeners = Listeners::bind(addr, config.server.workers)
        .with_context(|| format!("cannot listen on {addr} (server.listen)"))?;
    let metrics = config.server.metrics_listen;
    let listeners = listeners.with_metrics(metrics).with_context(|| {
        format!(
            "cannot listen on {} (server.metrics_listen)",
            metrics.map_or_else(String::new, |addr| addr.to_string())
        )
    })?;
    let local = listeners.local_addr();
    if let Some(scrape) = listeners.metrics_addr() {
        announce(
            format,
            &format!(
                "imagegate serves /metrics on http://{scrape}/metrics (server.metrics_listen)"
            ),
            serde_json::json!({ "metrics_address": scrape.to_string() }),
        );
    }
    let models = config.public_names().len();
    let source = config.source.display().to_string();
    let gateway = Gateway::start(config, env).await?;
    let base = format!("http://{local}");
    if let Some(admin) = demo {
        // One demo key at a time: this run's replaces the last run's, under the same name
        // (so that usage reports keep one name for it).
        let store = &gateway.state.store;
        if store.revoke_key(cli::DEMO_KEY_NAME).await? {
            eprintln!(
                "revoked the previous demo key (named {:?}); its usage stays on record",
                cli::DEMO_KEY_NAME
            );
        }
        let issued = auth::issue_key(cli::DEMO_KEY_NAME);
        store.create_key(issued.new.clone()).await?;
        let admin = match &admin {
            DemoAdmin::Set(var) => cli::DemoToken::Set { var },
            DemoAdmin::Made { var, token } => cli::DemoToken::Made { var, token },
        };
        cli::print_demo_banner(&base, &issued.new.name, &issued.key, &admin);
    }
    announce(
        format,
        &format!(
            "imagegate listening on {base} ({models} models from {source}); create a key with: imagegate keys create --name NAME"
        ),
        serde_json::json!({ "address": local.to_string(), "models": models, "config": source }),
    );
    let shutdown = until_stopped(std::sync::Arc::clone(&gateway.state))?;
    gateway.serve(listeners, shutdown).await
}

/// Raises the open-files limit to the hard limit, and says so when connections up to
/// `max_connections` still would not fit.
fn open_files(max_connections: usize) {
    match imagegate::server::raise_open_files_limit() {
        Ok((before, after)) => {
            // Numbers as numbers; no field at all for "unlimited".
            tracing::info!(
                before,
                after,
                unlimited = after.is_none(),
                "open files limit (RLIMIT_NOFILE)"
            );
            // Besides client connections: provider connections, the database, spool files.
            let needed = (max_connections as u64)
                .saturating_mul(2)
                .saturating_add(256);
            if after.is_some_and(|limit| limit < needed) {
                tracing::warn!(
                    limit = after,
                    max_connections,
                    needed,
                    "the open files limit is below what server.max_connections may need (a client connection and its provider connection each, plus the database and spool files); raise the hard limit (ulimit -Hn, LimitNOFILE=) or lower max_connections"
                );
            }
        }
        Err(err) => tracing::warn!(%err, "could not raise the open files limit (RLIMIT_NOFILE)"),
    }
}

/// Resolves on SIGTERM or Ctrl-C; reloads the configuration on each SIGHUP meanwhile.
fn until_stopped(
    state: std::sync::Arc<imagegate::app::AppState>,
) -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    // A write past the file-size limit (RLIMIT_FSIZE) then fails with EFBIG, which the
    // usage journal reports and recovers from, instead of the signal's default action
    // killing the process with every request in flight. The handler stays installed.
    drop(signal(SignalKind::from_raw(libc::SIGXFSZ))?);
    Ok(async move {
        loop {
            tokio::select! {
                _ = hup.recv() => match state.reload(imagegate::app::ReloadTrigger::Sighup) {
                    Ok(runtime) => tracing::info!(models = runtime.config.public_names().len(), "SIGHUP: configuration reloaded"),
                    Err(err) => tracing::error!(%err, "SIGHUP: configuration refused; the previous one stays in force"),
                },
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
            }
        }
    })
}
