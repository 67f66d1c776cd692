//! The `imagegate` command line: parse arguments, set up logging, load the configuration,
//! call into the library.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand, ValueEnum};
use imagegate::config::{self, Config, DEFAULT_CONFIG_PATH, Price, ProviderKind};
use imagegate::server::Listeners;
use imagegate::store::{self, GroupBy, Store, UsageFilter, UsageTotals};
use imagegate::usage::price::{format_usd, format_usd_sum};
use imagegate::{Gateway, auth};

#[derive(Parser)]
#[command(
    name = "imagegate",
    version,
    about = "OpenAI-compatible gateway for image-generation APIs"
)]
struct Cli {
    /// Configuration file.
    #[arg(long, global = true, env = "IMAGEGATE_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API (SIGHUP reloads the configuration, SIGTERM/Ctrl-C drains and stops).
    Serve,
    /// Serve config/demo.toml (every model on the built-in mock provider) and print a new key.
    Demo,
    /// Validate the configuration and print the routing table (secrets redacted).
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
        /// Only usage newer than this: a duration such as 24h or 7d, or an RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        #[arg(long, value_enum, default_value = "key")]
        group_by: GroupBy,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Apply the database migrations and exit.
    Migrate,
}

#[derive(Subcommand)]
enum ConfigCommand {
    Check,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key; it is printed once and stored only as a hash.
    Create {
        #[arg(long)]
        name: String,
    },
    List,
    /// Revoke a key by name; it stops working within the key cache TTL (5 s by default).
    Revoke {
        name: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
    Csv,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a person at a terminal, never into a file or a log collector.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if std::env::var("IMAGEGATE_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().flatten_event(true).init();
    } else {
        builder.compact().init();
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let env = config::process_env();
    match cli.command {
        Command::Serve => {
            let config = Config::load(&cli.config, &env)?;
            serve(config, env, None).await
        }
        Command::Demo => {
            let path = if cli.config == Path::new(DEFAULT_CONFIG_PATH) {
                PathBuf::from("config/demo.toml")
            } else {
                cli.config
            };
            let config = Config::load(&path, &env)?;
            serve(config, env, Some(())).await
        }
        Command::Config {
            command: ConfigCommand::Check,
        } => {
            let config = Config::load(&cli.config, &env)?;
            print_routing_table(&config);
            Ok(())
        }
        Command::Keys { command } => {
            let store = open_store(&cli.config).await?;
            keys(&*store, command).await
        }
        Command::Usage {
            key,
            since,
            group_by,
            format,
        } => {
            let store = open_store(&cli.config).await?;
            let since = since.as_deref().map(parse_since).transpose()?;
            let rows = store
                .usage_report(&UsageFilter {
                    key_name: key.clone(),
                    since,
                    group_by,
                })
                .await?;
            // No rows for a name that no key ever had is a typo, not "no usage".
            if let (Some(name), true) = (&key, rows.is_empty()) {
                let keys = store.list_keys().await?;
                anyhow::ensure!(
                    keys.iter().any(|k| &k.name == name),
                    "no key named {name:?} (see: imagegate keys list)"
                );
            }
            print_usage(&rows, group_by, format)
        }
        Command::Migrate => {
            open_store(&cli.config).await?;
            println!("migrations applied");
            Ok(())
        }
    }
}

/// The key and usage commands only need the database, not the provider keys.
async fn open_store(config: &Path) -> anyhow::Result<std::sync::Arc<dyn Store>> {
    let url = config::load_database_url(config)?;
    let store = store::connect(url.as_str()).await.with_context(|| {
        format!(
            "cannot open the database named by database.url in {}",
            config.display()
        )
    })?;
    store.migrate().await?;
    Ok(store)
}

async fn serve(config: Config, env: config::EnvLookup, demo: Option<()>) -> anyhow::Result<()> {
    open_files(config.server.max_connections.get());
    let addr = config.server.listen;
    let listeners = Listeners::bind(addr, config.server.workers)
        .with_context(|| format!("cannot listen on {addr} (server.listen)"))?;
    let local = listeners.local_addr();
    let models = config.public_names().len();
    let source = config.source.display().to_string();
    let gateway = Gateway::start(config, env).await?;
    let base = format!("http://{local}");
    if demo.is_some() {
        let issued = auth::issue_key(&format!("demo-{}", Utc::now().format("%Y%m%d-%H%M%S")));
        gateway.state.store.create_key(issued.new.clone()).await?;
        print_demo_banner(&base, &issued.new.name, &issued.key);
    }
    eprintln!(
        "imagegate listening on {base} ({models} models from {source}); create a key with: imagegate keys create --name NAME"
    );
    let shutdown = until_stopped(std::sync::Arc::clone(&gateway.state))?;
    gateway.serve(listeners, shutdown).await
}

/// Raises the open-files limit to the hard limit, and says so when connections up to
/// `max_connections` still would not fit.
fn open_files(max_connections: usize) {
    let show = |limit: Option<u64>| limit.map_or_else(|| "unlimited".to_owned(), |n| n.to_string());
    match imagegate::server::raise_open_files_limit() {
        Ok((before, after)) => {
            tracing::info!(
                before = %show(before),
                after = %show(after),
                "open files limit (RLIMIT_NOFILE)"
            );
            // Besides client connections: provider connections, the database, spool files.
            let needed = (max_connections as u64)
                .saturating_mul(2)
                .saturating_add(256);
            if after.is_some_and(|limit| limit < needed) {
                tracing::warn!(
                    limit = %show(after),
                    max_connections,
                    "the open files limit leaves little room beyond server.max_connections (provider connections, the database and spool files need files too); raise the hard limit (ulimit -Hn, LimitNOFILE=) or lower max_connections"
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
                _ = hup.recv() => match state.reload() {
                    Ok(runtime) => tracing::info!(models = runtime.config.public_names().len(), "SIGHUP: configuration reloaded"),
                    Err(err) => tracing::error!(%err, "SIGHUP: configuration refused; the previous one stays in force"),
                },
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
            }
        }
    })
}

fn print_demo_banner(base: &str, name: &str, key: &str) {
    println!(
        r#"
imagegate demo: every model is served by the built-in mock provider (no account needed).

  Base URL : {base}/v1
  API key  : {key}
  Key name : {name}   (the key is shown this once; usage reports list it by this name)

Try it:

  curl -s {base}/v1/images/generations \
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \
    -d '{{"model":"gpt-image-1","prompt":"a red fox","size":"1024x1024","quality":"low"}}'

  python3 -c '
from openai import OpenAI
client = OpenAI(base_url="{base}/v1", api_key="{key}")
img = client.images.generate(model="gpt-image-1", prompt="a red fox")
print(len(img.data[0].b64_json), img.usage)'

Then see what it cost:  cargo run --release -- --config config/demo.toml usage --key {name}
Revoke the key:         cargo run --release -- --config config/demo.toml keys revoke {name}
"#
    );
}

fn print_routing_table(config: &Config) {
    println!("configuration {} is valid", config.source.display());
    println!("database: {}", redact_url(config.database_url.as_str()));
    println!(
        "admin API: {}",
        if config.admin_token.is_some() {
            format!("on (token from ${})", config.admin_token_env)
        } else {
            format!("off (set ${} to enable)", config.admin_token_env)
        }
    );
    println!(
        "default model: {}",
        config
            .default_model
            .as_deref()
            .unwrap_or("(none: requests must name a model)")
    );
    println!();
    println!("providers:");
    for provider in config.providers.values() {
        match &provider.kind {
            ProviderKind::OpenAi {
                base_url,
                api_key_env,
                ..
            } => println!(
                "  {:<10} {base_url}  key from ${api_key_env} [redacted]  connect {:?}, total {:?}",
                provider.name, provider.connect_timeout, provider.total_timeout
            ),
            ProviderKind::Mock { delay } => {
                println!(
                    "  {:<10} built-in mock, answers after {delay:?}",
                    provider.name
                )
            }
        }
    }
    println!();
    println!("models (routes in failover order):");
    for model in config.models.values() {
        let aliases = if model.aliases.is_empty() {
            String::new()
        } else {
            format!(" (aliases: {})", model.aliases.join(", "))
        };
        println!("  {}{aliases}", model.name);
        for (i, route) in model.routes.iter().enumerate() {
            let price = match route.price {
                Price::PerImage(n) => format!("${} per image", format_usd(n)),
                Price::Tokens {
                    text_input,
                    image_input,
                    image_output,
                    ..
                } => format!(
                    "per 1M tokens: text in ${}, image in ${}, image out ${}",
                    format_usd(text_input * 1_000_000),
                    format_usd(image_input * 1_000_000),
                    format_usd(image_output * 1_000_000)
                ),
            };
            let mut policy = Vec::new();
            if !route.policy.defaults.is_empty() {
                policy.push(format!(
                    "defaults {}",
                    serde_json::Value::Object(route.policy.defaults.clone())
                ));
            }
            if !route.policy.force.is_empty() {
                policy.push(format!(
                    "force {}",
                    serde_json::Value::Object(route.policy.force.clone())
                ));
            }
            if !route.policy.drop.is_empty() {
                policy.push(format!("drop {:?}", route.policy.drop));
            }
            if route.strip_b64_prefix {
                policy.push("strip data: prefix from b64_json".into());
            }
            println!(
                "    {}. {} -> {}  [{price}]{}",
                i + 1,
                route.provider.name,
                route.upstream_model,
                if policy.is_empty() {
                    String::new()
                } else {
                    format!("  {}", policy.join("; "))
                }
            );
        }
    }
}

/// Hides a password in a database URL.
fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("redacted"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}

async fn keys(store: &dyn Store, command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Create { name } => {
            let name = name.trim().to_owned();
            anyhow::ensure!(!name.is_empty(), "--name must not be empty");
            let issued = auth::issue_key(&name);
            store.create_key(issued.new).await?;
            println!("{}", issued.key);
            eprintln!(
                "created key {name:?}: the line above is the key, shown this once (only its hash is stored).\n\
                 Use it as the OpenAI API key with base URL http://<imagegate>/v1; revoke it with: imagegate keys revoke {name}"
            );
        }
        KeysCommand::List => {
            let keys = store.list_keys().await?;
            if keys.is_empty() {
                eprintln!("no keys yet: create one with: imagegate keys create --name NAME");
            }
            println!("{:<24} {:<12} {:<20} status", "name", "prefix", "created");
            for key in keys {
                let status = match key.revoked_at {
                    Some(at) => format!("revoked {}", at.format("%Y-%m-%d %H:%M")),
                    None => "active".into(),
                };
                println!(
                    "{:<24} {:<12} {:<20} {status}",
                    key.name,
                    key.prefix,
                    key.created_at.format("%Y-%m-%d %H:%M")
                );
            }
        }
        KeysCommand::Revoke { name } => {
            anyhow::ensure!(
                store.revoke_key(&name).await?,
                "no active key named {name:?} (see: imagegate keys list)"
            );
            println!("revoked {name:?}; running gateways refuse it within their key cache TTL");
        }
    }
    Ok(())
}

fn parse_since(text: &str) -> anyhow::Result<DateTime<Utc>> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    let ago = humantime::parse_duration(text).with_context(|| {
        format!("--since {text:?}: expected a duration like 24h or 7d, or an RFC 3339 time")
    })?;
    Ok(Utc::now() - chrono::Duration::from_std(ago)?)
}

fn print_usage(rows: &[UsageTotals], group_by: GroupBy, format: Format) -> anyhow::Result<()> {
    let group = match group_by {
        GroupBy::Key => "key",
        GroupBy::Model => "model",
        GroupBy::Provider => "provider",
        GroupBy::Day => "day",
    };
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => {
            let items: Vec<_> = rows
                .iter()
                .map(|r| {
                    serde_json::json!({
                        group: r.group, "requests": r.requests, "images": r.images,
                        "input_tokens": r.input_tokens, "output_tokens": r.output_tokens,
                        "total_tokens": r.total_tokens, "cost_usd": format_usd_sum(r.cost_nanousd),
                    })
                })
                .collect();
            writeln!(out, "{}", serde_json::to_string_pretty(&items)?)?;
        }
        Format::Csv => {
            let mut csv = csv::Writer::from_writer(&mut out);
            csv.write_record([
                group,
                "requests",
                "images",
                "input_tokens",
                "output_tokens",
                "total_tokens",
                "cost_usd",
            ])?;
            for r in rows {
                csv.write_record([
                    r.group.clone(),
                    r.requests.to_string(),
                    r.images.to_string(),
                    r.input_tokens.to_string(),
                    r.output_tokens.to_string(),
                    r.total_tokens.to_string(),
                    format_usd_sum(r.cost_nanousd),
                ])?;
            }
            csv.flush()?;
        }
        Format::Table => {
            writeln!(
                out,
                "{group:<24} {:>9} {:>7} {:>13} {:>13} {:>13} {:>16}",
                "requests", "images", "input_tok", "output_tok", "total_tok", "cost_usd"
            )?;
            let mut total = UsageTotals {
                group: "TOTAL".into(),
                requests: 0,
                images: 0,
                input_tokens: 0,
                output_tokens: 0,
                total_tokens: 0,
                cost_nanousd: 0,
            };
            for r in rows.iter() {
                total.requests = total.requests.saturating_add(r.requests);
                total.images = total.images.saturating_add(r.images);
                total.input_tokens = total.input_tokens.saturating_add(r.input_tokens);
                total.output_tokens = total.output_tokens.saturating_add(r.output_tokens);
                total.total_tokens = total.total_tokens.saturating_add(r.total_tokens);
                total.cost_nanousd = total.cost_nanousd.saturating_add(r.cost_nanousd);
            }
            for r in rows.iter().chain(std::iter::once(&total)) {
                writeln!(
                    out,
                    "{:<24} {:>9} {:>7} {:>13} {:>13} {:>13} {:>16}",
                    r.group,
                    r.requests,
                    r.images,
                    r.input_tokens,
                    r.output_tokens,
                    r.total_tokens,
                    format_usd_sum(r.cost_nanousd)
                )?;
            }
            if rows.is_empty() {
                eprintln!("no usage recorded for this selection");
            }
        }
    }
    Ok(())
}
