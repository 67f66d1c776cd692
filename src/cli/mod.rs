//! What the command line prints: the demo banner, the routing table, key listings and usage
//! reports. `main.rs` parses the arguments and calls these; the library prints nothing.

pub mod config;
pub mod keys;
pub mod usage;

/// What `imagegate demo` prints once it serves: where it listens, its new key, what to try.
pub fn print_demo_banner(base: &str, name: &str, key: &str) {
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

  As an async job (imagegate's own extension): 202 with an id at once, then collect it:
  curl -s {base}/v1/images/generations -H "Prefer: respond-async" \
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \
    -d '{{"model":"gpt-image-1","prompt":"a red fox"}}'
  curl -s {base}/v1/images/jobs/imgjob_... -H "Authorization: Bearer {key}"

Then see what it cost:  cargo run --release -- --config config/demo.toml usage --key {name}
Revoke the key:         cargo run --release -- --config config/demo.toml keys revoke {name}
"#
    );
}
