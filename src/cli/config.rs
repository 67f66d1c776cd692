//! `imagegate config check`: the routing table a configuration makes, secrets redacted.

use imagegate::config::{
    self, Config, Endpoint, ImageTable, Price, ProviderKind, Route, TokenRates,
};
use imagegate::usage::price::format_usd;

/// Prints the validated configuration: database (password hidden), admin API, providers,
/// and each model's routes in failover order with their price and parameter policy.
pub fn print_routing_table(config: &Config) {
    println!("configuration {} is valid", config.source.display());
    println!(
        "database: {}",
        config::redact_url(config.database_url.as_str())
    );
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
            let policy = describe_policy(route);
            println!(
                "    {}. {} -> {}  [{}]{}",
                i + 1,
                route.provider.name,
                route.upstream_model,
                describe_price(&route.price),
                if policy.is_empty() {
                    String::new()
                } else {
                    format!("  {}", policy.join("; "))
                }
            );
            println!(
                "       price source: {}",
                route.price_source.as_deref().unwrap_or("(none named)")
            );
        }
    }
    if !config.warnings.is_empty() {
        println!();
    }
    for warning in &config.warnings {
        println!("warning: {warning}");
    }
}

/// A price's kind and figures, as one phrase.
fn describe_price(price: &Price) -> String {
    match price {
        Price::Unpriced => "unpriced: rows record tokens, no cost".into(),
        Price::PerImage(n) => format!("per_image: ${} per image", format_usd(*n)),
        Price::Tokens(rates) => format!("tokens: {}", describe_rates(rates)),
        Price::Table(table) => format!("table: {}", describe_table(table)),
        Price::MinOf(rates, table) => format!(
            "min_of(tokens, table): the cheaper of {} and {}",
            describe_rates(rates),
            describe_table(table)
        ),
    }
}

fn describe_rates(rates: &TokenRates) -> String {
    let per_million = |rate: i64| format_usd(rate.saturating_mul(1_000_000));
    let mut text = format!(
        "per 1M tokens: text in ${} (cached ${}), image in ${} (cached ${}), image out ${}",
        per_million(rates.text_input),
        per_million(rates.cached_text_input),
        per_million(rates.image_input),
        per_million(rates.cached_image_input),
        per_million(rates.image_output)
    );
    if rates.text_output != rates.image_output {
        text.push_str(&format!(", text out ${}", per_million(rates.text_output)));
    }
    text
}

fn describe_table(table: &ImageTable) -> String {
    let rows: Vec<String> = table
        .0
        .iter()
        .map(|(quality, sizes)| {
            let prices: Vec<String> = sizes
                .iter()
                .map(|(size, n)| format!("{size} ${}", format_usd(*n)))
                .collect();
            format!("{quality} {}", prices.join(", "))
        })
        .collect();
    format!("per image {}", rows.join("; "))
}

/// What a route changes in the requests it sends, one phrase per rule.
fn describe_policy(route: &Route) -> Vec<String> {
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
    if route.endpoints.len() < Endpoint::ALL.len() {
        let names: Vec<&str> = route.endpoints.iter().map(|e| e.as_str()).collect();
        policy.push(format!("only {}", names.join(", ")));
    }
    policy
}
