//! The shipped price list, end to end: each seed's prices (copied from
//! config/imagegate.toml, not retyped) give each usage row the hand-computed cost to the
//! nano-dollar, on both databases; unpriced routes store no cost.

use imagegate::store::UsageFilter;

use crate::support::*;

/// The `[pricing]` part of the shipped configuration.
fn shipped_prices() -> &'static str {
    let shipped = include_str!("../../config/imagegate.toml");
    let start = shipped.find("# --- Pricing").expect("the pricing section");
    &shipped[start..]
}

/// Every shipped (provider, model) price behind a public name of its own, both providers
/// answered by `standin`.
fn config(standin: &str) -> String {
    let routes = [
        ("apiyi-1", "apiyi", "gpt-image-1"),
        ("apiyi-1.5", "apiyi", "gpt-image-1.5"),
        ("apiyi-mini", "apiyi", "gpt-image-1-mini"),
        ("apiyi-2", "apiyi", "gpt-image-2"),
        ("apiyi-2-all", "apiyi", "gpt-image-2-all"),
        ("piapi-1", "piapi", "gpt-image-1"),
        ("piapi-1.5", "piapi", "gpt-image-1.5"),
        ("piapi-2", "piapi", "gpt-image-2"),
        ("piapi-2-preview", "piapi", "gpt-image-2-preview"),
        ("text-rated", "piapi", "text-rated"),
    ]
    .map(|(name, provider, model)| {
        format!(
            "[models.\"{name}\"]\nroutes = [{{ provider = \"{provider}\", model = \"{model}\" }}]\n"
        )
    })
    .concat();
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
[providers.apiyi]
base_url = "{standin}"
api_key_env = "TEST_PIAPI_KEY"
[providers.piapi]
base_url = "{standin}"
api_key_env = "TEST_PIAPI_KEY"
{routes}
# Not shipped: PiAPI's gpt-image-1 rates with a text output rate of its own.
[pricing.piapi."text-rated"]
text_input = 5.00
cached_text_input = 1.25
image_input = 10.00
cached_image_input = 1.25
image_output = 40.00
text_output = 10.00
{prices}
"#,
        prices = shipped_prices()
    )
}

/// A stand-in that answers `n` images with the usage the request's prompt holds, and
/// reports the `reported_size` and `reported_quality` the request names (none otherwise).
async fn echoing_standin() -> StandIn {
    StandIn::start(|received| {
        let body = received.json();
        let n = body["n"].as_u64().unwrap_or(1) as usize;
        let usage = body["prompt"].as_str().expect("prompt").to_owned();
        let mut answer: serde_json::Value =
            serde_json::from_str(&image_response(n, &usage)).expect("JSON");
        for field in ["size", "quality"] {
            let answer = answer.as_object_mut().expect("object");
            match &body[format!("reported_{field}")] {
                serde_json::Value::Null => answer.remove(field),
                reported => answer.insert(field.to_owned(), reported.clone()),
            };
        }
        respond(200, "application/json", answer.to_string())
    })
    .await
}

/// input = text + image tokens; output tokens.
fn usage(text: i64, image: i64, output: i64) -> String {
    format!(
        r#"{{"input_tokens":{},"input_tokens_details":{{"text_tokens":{text},"image_tokens":{image}}},"output_tokens":{output},"total_tokens":{}}}"#,
        text + image,
        text + image + output
    )
}

/// Text input and output tokens, `text_output` of the output reported as text.
fn usage_with_text_output(text: i64, output: i64, text_output: i64) -> String {
    format!(
        r#"{{"input_tokens":{text},"input_tokens_details":{{"text_tokens":{text},"image_tokens":0}},"output_tokens":{output},"output_tokens_details":{{"text_tokens":{text_output},"image_tokens":{}}},"total_tokens":{}}}"#,
        output - text_output,
        text + output
    )
}

struct Case {
    what: &'static str,
    model: &'static str,
    quality: &'static str,
    size: &'static str,
    n: u32,
    usage: String,
    cost: Option<i64>,
    /// The quality and size the provider says it made, if it says.
    reported: Option<(&'static str, &'static str)>,
}

fn cases() -> Vec<Case> {
    let case = |what, model, quality, size, n, usage, cost| Case {
        what,
        model,
        quality,
        size,
        n,
        usage,
        cost,
        reported: None,
    };
    vec![
        // APIYI gpt-image-1: $2.50/M in, $8.00/M out, or the table, whichever is cheaper.
        case(
            "APIYI 1, high 1024x1024: tokens cheaper than $0.036",
            "apiyi-1",
            "high",
            "1024x1024",
            1,
            usage(20, 0, 4160),
            Some(20 * 2_500 + 4160 * 8_000),
        ),
        case(
            "APIYI 1, low 1024x1024 with image input: $0.005 per image cheaper than tokens",
            "apiyi-1",
            "low",
            "1024x1024",
            1,
            usage(30, 3000, 272),
            Some(5_000_000),
        ),
        case(
            "APIYI 1, two medium 1536x1024: tokens cheaper than 2 x $0.015",
            "apiyi-1",
            "medium",
            "1536x1024",
            2,
            usage(10, 0, 3136),
            Some(10 * 2_500 + 3136 * 8_000),
        ),
        case(
            "APIYI 1, two high 1024x1536 with many input images: 2 x $0.052",
            "apiyi-1",
            "high",
            "1024x1536",
            2,
            usage(50, 40_000, 12_480),
            Some(104_000_000),
        ),
        // APIYI gpt-image-1.5: $5.00/M in, $10.00/M out, or its table.
        case(
            "APIYI 1.5, low 1024x1536 with image input: $0.013 cheaper than tokens",
            "apiyi-1.5",
            "low",
            "1024x1536",
            1,
            usage(40, 5000, 400),
            Some(13_000_000),
        ),
        case(
            "APIYI 1.5, high 1024x1024: tokens cheaper than $0.133",
            "apiyi-1.5",
            "high",
            "1024x1024",
            1,
            usage(25, 0, 4160),
            Some(25 * 5_000 + 4160 * 10_000),
        ),
        case(
            "APIYI 1.5, medium 1024x1024: $0.034 cheaper than tokens",
            "apiyi-1.5",
            "medium",
            "1024x1024",
            1,
            usage(10, 6000, 1056),
            Some(34_000_000),
        ),
        case(
            "APIYI 1.5, quality and size auto: the dearest entry, $0.20, cheaper than tokens",
            "apiyi-1.5",
            "auto",
            "auto",
            1,
            usage(100, 30_000, 6240),
            Some(200_000_000),
        ),
        Case {
            reported: Some(("low", "1024x1024")),
            ..case(
                "APIYI 1.5, asked auto, the answer says low 1024x1024: $0.009",
                "apiyi-1.5",
                "auto",
                "auto",
                1,
                usage(100, 30_000, 6240),
                Some(9_000_000),
            )
        },
        // PiAPI: token rates per model; PiAPI's own sample usage (19 + 1105 in, 765 out).
        case(
            "PiAPI 1",
            "piapi-1",
            "low",
            "1024x1024",
            1,
            usage(19, 1105, 765),
            Some(19 * 5_000 + 1105 * 10_000 + 765 * 40_000),
        ),
        case(
            "PiAPI 1, output_tokens_details but no text output rate: all output as image",
            "piapi-1",
            "high",
            "1024x1024",
            1,
            usage_with_text_output(19, 4160, 160),
            Some(19 * 5_000 + 4160 * 40_000),
        ),
        case(
            "a text output rate: the text part of the output at $10/M",
            "text-rated",
            "high",
            "1024x1024",
            1,
            usage_with_text_output(19, 4160, 160),
            Some(19 * 5_000 + 4000 * 40_000 + 160 * 10_000),
        ),
        case(
            "PiAPI 1.5",
            "piapi-1.5",
            "low",
            "1024x1024",
            1,
            usage(19, 1105, 765),
            Some(19 * 5_000 + 1105 * 8_000 + 765 * 32_000),
        ),
        case(
            "PiAPI 2",
            "piapi-2",
            "low",
            "1024x1024",
            1,
            usage(19, 1105, 765),
            Some(19 * 5_000 + 1105 * 8_000 + 765 * 30_000),
        ),
        case(
            "PiAPI 2-preview: $0.10 per image",
            "piapi-2-preview",
            "high",
            "1536x1024",
            2,
            usage(19, 0, 765),
            Some(200_000_000),
        ),
        case(
            "APIYI 2-all: $0.03 per image",
            "apiyi-2-all",
            "high",
            "1024x1024",
            1,
            usage(19, 0, 765),
            Some(30_000_000),
        ),
        // No published price: tokens recorded, no cost.
        case(
            "APIYI mini: unpriced",
            "apiyi-mini",
            "low",
            "1024x1024",
            1,
            usage(19, 0, 272),
            None,
        ),
        case(
            "APIYI 2: unpriced",
            "apiyi-2",
            "low",
            "1024x1024",
            1,
            usage(19, 0, 272),
            None,
        ),
    ]
}

async fn shipped_prices_cost_what_the_seeds_say(db: Db) {
    let standin = echoing_standin().await;
    let gw = TestGateway::start(db, &config(&standin.base_url())).await;
    let cases = cases();
    for case in &cases {
        let mut body = serde_json::json!({
            "model": case.model, "prompt": case.usage, "n": case.n,
            "quality": case.quality, "size": case.size,
        });
        if let Some((quality, size)) = case.reported {
            body["reported_quality"] = quality.into();
            body["reported_size"] = size.into();
        }
        let response = gw
            .post_json("/v1/images/generations", &body.to_string())
            .await;
        assert_eq!(response.status(), 200, "{}", case.what);
        response.bytes().await.expect("body");
    }
    let rows = gw.usage_rows(cases.len()).await;
    for (case, row) in cases.iter().zip(&rows) {
        assert_eq!(row.model, case.model, "rows in request order");
        assert_eq!(row.cost_nanousd, case.cost, "{}", case.what);
        assert_eq!(row.images, case.n as i32, "{}", case.what);
        assert!(row.output_tokens > 0, "tokens recorded: {}", case.what);
    }
    // The report keeps the unpriced rows out of the sum, and counts them.
    let report = gw
        .store
        .usage_report(&UsageFilter {
            group_by: imagegate::store::GroupBy::Key,
            ..UsageFilter::default()
        })
        .await
        .expect("report");
    let priced: i64 = cases.iter().filter_map(|c| c.cost).sum();
    assert_eq!(
        (report[0].cost_nanousd, report[0].unpriced),
        (i128::from(priced), 2)
    );
    gw.shutdown().await;
}

crate::on_both_databases!(shipped_prices_cost_what_the_seeds_say);
