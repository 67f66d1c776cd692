//! What the command line prints: the demo banner, the routing table, key listings and usage
//! reports. `main.rs` parses the arguments and calls these; the library prints nothing.

pub mod config;
pub mod healthcheck;
pub mod keys;
pub mod usage;

/// The name of the key `imagegate demo` makes; each run replaces the last run's.
pub const DEMO_KEY_NAME: &str = "demo";

/// The admin token the demo runs with.
pub enum DemoToken<'a> {
    /// The operator's own, from the variable `var` (not printed).
    Set { var: &'a str },
    /// Made for this run; the README's admin examples read it from `var`.
    Made { var: &'a str, token: &'a str },
}

/// What `imagegate demo` prints once it serves: where it listens, its key and admin token,
/// what to try.
pub fn print_demo_banner(base: &str, name: &str, key: &str, admin: &DemoToken<'_>) {
    let (var, token_line) = match admin {
        DemoToken::Set { var } => (*var, format!("from ${var} (yours)")),
        DemoToken::Made { var, token } => (
            *var,
            format!("{token}   (made for this run; set ${var} to choose your own)"),
        ),
    };
    let export = match admin {
        DemoToken::Set { .. } => String::new(),
        DemoToken::Made { var, token } => format!("  export {var}={token}\n"),
    };
    println!(
        r#"
imagegate demo: every model is served by the built-in mock provider (no account needed).

  Base URL    : {base}/v1
  API key     : {key}
  Key name    : {name}   (shown this once; each demo run replaces the last run's key)
  Dashboard   : {base}/dashboard   (log in with the admin token)
  Admin token : {token_line}

Try it:

  curl -s {base}/v1/images/generations \
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \
    -d '{{"model":"gpt-image-1","prompt":"a red fox","size":"1024x1024","quality":"low"}}'

  python3 -c '
from openai import OpenAI
client = OpenAI(base_url="{base}/v1", api_key="{key}")
img = client.images.generate(model="gpt-image-1", prompt="a red fox")
print(len(img.data[0].b64_json), img.usage)'

  As an async job (imagegate's own extension): 202 with an id at once, then collect it:
  curl -s {base}/v1/images/generations -H "Prefer: respond-async" \
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \
    -d '{{"model":"gpt-image-1","prompt":"a red fox"}}'
  curl -s {base}/v1/images/jobs/imgjob_... -H "Authorization: Bearer {key}"

The admin API (keys, usage, reload), as in the README:

{export}  curl -s {base}/admin/keys -H "Authorization: Bearer ${var}"
  curl -s "{base}/admin/usage?group_by=model" -H "Authorization: Bearer ${var}"

Then see what it cost:  cargo run --release -- --config config/demo.toml usage --key {name}
Revoke the key:         cargo run --release -- --config config/demo.toml keys revoke {name}
"#
    );
}
