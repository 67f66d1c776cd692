//! `imagegate keys`: create, list and revoke client keys.

use clap::Subcommand;
use imagegate::auth;
use imagegate::store::Store;

#[derive(Subcommand)]
pub enum KeysCommand {
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

pub async fn run(store: &dyn Store, command: KeysCommand) -> anyhow::Result<()> {
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
