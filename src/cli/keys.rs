//! `imagegate keys`: create, list, change and revoke client keys, with the same settings
//! and the same checks as the admin API (`POST` and `PATCH /admin/keys`).

use std::path::Path;

use clap::{Args, Subcommand};
use imagegate::auth::settings::{ChangeKey, CreateKey, SettingError};
use imagegate::auth::{self, IssuedKey};
use imagegate::config;
use imagegate::store::{KeyRecord, Store};
use serde_json::{Map, Value};

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create a key; it is printed once and stored only as a hash.
    Create {
        /// The key's name: what usage reports and the dashboard show (1 to 100 letters,
        /// digits or . _ - : @).
        #[arg(long)]
        name: String,
        #[command(flatten)]
        settings: Settings,
    },
    /// List every key (revoked ones too): name, prefix, creation time, status, limits.
    List,
    /// Change an active key's limits (`none` clears one); running gateways apply the
    /// change within the key cache TTL (5 s by default).
    Update {
        /// The name of the active key to change.
        name: String,
        #[command(flatten)]
        settings: Settings,
    },
    /// Revoke a key by name; it stops working within the key cache TTL (5 s by default).
    Revoke {
        /// The name of the active key to revoke.
        name: String,
    },
}

/// A key's limits, each optional. With `update`, the value `none` clears one.
#[derive(Args)]
pub struct Settings {
    /// Spending cap in US dollars per --budget-period, held across every gateway on the
    /// database (a call that could exceed it gets 429).
    #[arg(long, value_name = "USD", allow_negative_numbers = true)]
    budget_usd: Option<String>,
    /// day, month or total (the default with a budget).
    #[arg(long, value_name = "PERIOD")]
    budget_period: Option<String>,
    /// Requests per minute, across every gateway on the database.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    rpm: Option<String>,
    /// Requests in flight at once (per gateway), instead of limits.max_in_flight_per_key.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    max_in_flight: Option<String>,
    /// Comma-separated model names or aliases the key may use (default: every model).
    #[arg(long, value_name = "A,B")]
    models: Option<String>,
    /// When the key stops working: an RFC 3339 time such as 2030-01-31T00:00:00Z, or a date
    /// (2030-01-31: from its first instant, UTC).
    #[arg(long, value_name = "TIME")]
    expires_at: Option<String>,
    /// A JSON object kept with the key, e.g. '{"team":"search"}'.
    #[arg(long, value_name = "JSON")]
    metadata: Option<String>,
}

impl Settings {
    /// The settings as the admin API's JSON body: what was given, `none` as null.
    fn to_json(&self) -> anyhow::Result<Map<String, Value>> {
        let mut body = Map::new();
        let fields = [
            ("budget_usd", &self.budget_usd),
            ("budget_period", &self.budget_period),
            ("rpm", &self.rpm),
            ("max_in_flight", &self.max_in_flight),
            ("models", &self.models),
            ("expires_at", &self.expires_at),
            ("metadata", &self.metadata),
        ];
        for (field, given) in fields {
            let Some(text) = given.as_deref() else {
                continue;
            };
            let value = match (field, text.trim()) {
                (_, "none") => Value::Null,
                ("budget_usd" | "rpm" | "max_in_flight", number) => {
                    serde_json::from_str::<serde_json::Number>(number)
                        .map(Value::Number)
                        .map_err(|_| anyhow::anyhow!("{}: {text:?} is not a number", flag(field)))?
                }
                ("models", list) => list.split(',').map(|m| Value::from(m.trim())).collect(),
                ("metadata", json) => serde_json::from_str(json)
                    .map_err(|err| anyhow::anyhow!("{}: not JSON: {err}", flag(field)))?,
                (_, text) => text.into(),
            };
            body.insert(field.to_owned(), value);
        }
        Ok(body)
    }

    fn known_models(&self, config: &Path) -> anyhow::Result<Vec<String>> {
        if self.models.as_deref().is_none_or(|m| m.trim() == "none") {
            return Ok(Vec::new());
        }
        Ok(config::load_public_names(config)?)
    }
}

fn flag(field: &str) -> String {
    format!("--{}", field.replace('_', "-"))
}

/// A refused setting, named as the command line knows it.
fn refused(err: SettingError) -> anyhow::Error {
    let flag = match err.param {
        "name" => "--name".to_owned(),
        param => flag(param),
    };
    anyhow::anyhow!("{flag}: {}", err.message)
}

/// `serde_json`'s error for a value of the wrong type, with the flag it came from.
fn typed<T: serde::de::DeserializeOwned>(body: Map<String, Value>) -> anyhow::Result<T> {
    let value = Value::Object(body);
    serde_path_to_error::deserialize(value)
        .map_err(|err| anyhow::anyhow!("{}: {}", flag(&err.path().to_string()), err.inner()))
}

pub async fn run(store: &dyn Store, config: &Path, command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Create { name, settings } => {
            let mut body = settings.to_json()?;
            body.insert("name".into(), name.trim().into());
            let known = settings.known_models(config)?;
            let known: Vec<&str> = known.iter().map(String::as_str).collect();
            let request: CreateKey = typed(body)?;
            let (name, limits) = request.check(&known).map_err(refused)?;
            let IssuedKey { key, mut new } = auth::issue_key(&name);
            new.limits = limits;
            let record = store.create_key(new).await?;
            println!("{key}");
            eprintln!(
                "created key {name:?} ({}): the line above is the key, shown this once (only its hash is stored).\n\
                 Use it as the OpenAI API key with base URL http://<imagegate>/v1; change its limits with: imagegate keys update {name} --rpm N ...; revoke it with: imagegate keys revoke {name}",
                describe(&record)
            );
        }
        KeysCommand::List => {
            let keys = store.list_keys().await?;
            if keys.is_empty() {
                eprintln!("no keys yet: create one with: imagegate keys create --name NAME");
            }
            println!(
                "{:<24} {:<12} {:<20} {:<24} limits",
                "name", "prefix", "created", "status"
            );
            for key in keys {
                let status = match key.revoked_at {
                    Some(at) => format!("revoked {}", at.format("%Y-%m-%d %H:%M")),
                    None => "active".into(),
                };
                println!(
                    "{:<24} {:<12} {:<20} {status:<24} {}",
                    key.name,
                    key.prefix,
                    key.created_at.format("%Y-%m-%d %H:%M"),
                    describe(&key)
                );
            }
        }
        KeysCommand::Update { name, settings } => {
            let body = settings.to_json()?;
            anyhow::ensure!(
                !body.is_empty(),
                "nothing to change: give at least one of --budget-usd, --budget-period, --rpm, --max-in-flight, --models, --expires-at, --metadata"
            );
            let known = settings.known_models(config)?;
            let known: Vec<&str> = known.iter().map(String::as_str).collect();
            let request: ChangeKey = typed(body)?;
            let changes = request.check(&known).map_err(refused)?;
            let record = store.update_key(&name, &changes).await?.ok_or_else(|| {
                anyhow::anyhow!("no active key named {name:?} (see: imagegate keys list)")
            })?;
            println!("updated {name:?}: {}", describe(&record));
            eprintln!("running gateways apply the change within their key cache TTL");
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

/// A key's limits on one line: `no limits`, or each one set.
fn describe(key: &KeyRecord) -> String {
    let limits = &key.limits;
    let mut parts = Vec::new();
    if let (Some(nanousd), Some(period)) = (limits.budget_nanousd, &limits.budget_period) {
        parts.push(format!("budget ${} per {period}", nanousd as f64 / 1e9));
    }
    if let Some(rpm) = limits.rpm {
        parts.push(format!("{rpm} requests/min"));
    }
    if let Some(n) = limits.max_in_flight {
        parts.push(format!("{n} in flight"));
    }
    if let Some(models) = &limits.models {
        parts.push(format!("models {}", models.join(",")));
    }
    if let Some(at) = limits.expires_at {
        parts.push(format!("expires {}", at.format("%Y-%m-%d %H:%M:%S UTC")));
    }
    if let Some(metadata) = &limits.metadata {
        parts.push(format!("metadata {}", Value::Object(metadata.clone())));
    }
    if parts.is_empty() {
        "no limits".to_owned()
    } else {
        parts.join(", ")
    }
}
