//! Test set-up written once: a real imagegate on port 0 ([`gateway`]) or the real binary
//! ([`binary`]), provider stand-ins
//! ([`standin`]), fresh databases ([`db`]), a throwaway Postgres cluster for outages
//! ([`postgres`]), raw connections ([`raw`]), the captured SDK requests ([`captures`]), and the configuration and secrets
//! they share.

pub mod binary;
pub mod captures;
pub mod db;
pub mod forms;
pub mod gateway;
pub mod postgres;
pub mod raw;
pub mod rows;
pub mod s3;
pub mod standin;

use std::collections::HashMap;
use std::sync::Arc;

use imagegate::config::EnvLookup;

pub use captures::{capture, captures_named};
pub use gateway::{TestGateway, all_rows, stored_job};
pub use standin::{PNG_B64, StandIn, USAGE, dead_url, image_response, respond};

/// Runs each listed `async fn name(db: Db)` as two tests: on Postgres and on SQLite.
#[macro_export]
macro_rules! on_both_databases {
    ($($test:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test($crate::support::Db::Postgres).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test($crate::support::Db::Sqlite).await;
                }
            )*
        }
    };
}

/// Which database a test runs on.
#[derive(Clone, Copy, Debug)]
pub enum Db {
    Postgres,
    Sqlite,
}

pub const PROVIDER_KEY: &str = "pk-standin-secret-0123456789";
pub const ADMIN_TOKEN: &str = "admin-token-for-tests-0123456789";

/// PiAPI's gpt-image-1 rates in nano-USD per token, as the test config sets them.
pub fn gpt_image_1_cost(text: i64, image: i64, output: i64) -> i64 {
    text * 5000 + image * 10000 + output * 40000
}

/// A configuration routing the captures' models to `provider` (named "piapi") and the
/// strip-prefix model to the same stand-in as "apiyi".
pub fn test_config(provider: &str, extra: &str) -> String {
    format!(
        r#"
default_model = "gpt-image-1"
[server]
listen = "127.0.0.1:0"
max_json_body_bytes = 65536
upstream_total_timeout = "5s"
shutdown_grace = "5s"
key_cache_ttl = "1s"

[providers.piapi]
base_url = "{provider}"
api_key_env = "TEST_PIAPI_KEY"

[providers.apiyi]
base_url = "{provider}"
api_key_env = "TEST_PIAPI_KEY"
image_field = "image[]"

[models."gpt-image-1"]
aliases = ["img-default"]
routes = [{{ provider = "piapi", model = "gpt-image-1", defaults = {{ quality = "standard" }} }}]

[models."gpt-image-2"]
routes = [{{ provider = "piapi", model = "upstream-gpt-image-2", drop = ["input_fidelity"], force = {{ moderation = "low" }} }}]

[models."dall-e-3"]
routes = [{{ provider = "piapi", model = "dall-e-3" }}]

[models."gpt-image-2-all"]
routes = [{{ provider = "apiyi", model = "gpt-image-2-all", drop = ["quality", "n"], strip_b64_prefix = true }}]

[models."gpt-image-1.5"]
routes = [{{ provider = "apiyi", model = "gpt-image-1.5" }}]

[models."dall-e-2"]
routes = [{{ provider = "piapi", model = "dall-e-2" }}]

[pricing.apiyi."gpt-image-1.5"]
text_input = 5.00
cached_text_input = 5.00
image_input = 5.00
cached_image_input = 5.00
image_output = 10.00

[pricing.piapi."dall-e-2"]
per_image = 0.02

[pricing.piapi."gpt-image-1"]
text_input = 5.00
cached_text_input = 1.25
image_input = 10.00
cached_image_input = 1.25
image_output = 40.00

[pricing.piapi."upstream-gpt-image-2"]
text_input = 5.00
cached_text_input = 1.25
image_input = 8.00
cached_image_input = 1.25
image_output = 30.00

[pricing.piapi."dall-e-3"]
per_image = 0.04

[pricing.apiyi."gpt-image-2-all"]
per_image = 0.03
{extra}
"#
    )
}

/// The ids `GET models_url` (a `/v1/models` URL) lists to `key`, in its order.
pub async fn model_ids(client: &reqwest::Client, models_url: &str, key: &str) -> Vec<String> {
    let list: serde_json::Value = client
        .get(models_url)
        .bearer_auth(key)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    list["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|m| m["id"].as_str().expect("id").to_owned())
        .collect()
}

pub fn test_env() -> EnvLookup {
    let vars: HashMap<&str, &str> = [
        ("TEST_PIAPI_KEY", PROVIDER_KEY),
        ("IMAGEGATE_ADMIN_TOKEN", ADMIN_TOKEN),
    ]
    .into_iter()
    .collect();
    Arc::new(move |name| vars.get(name).map(|v| (*v).to_owned()))
}
