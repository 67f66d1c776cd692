//! What a provider call costs, from the pricing table and the usage the provider reported.

use crate::config::{ImageTable, Price, TokenRates};
use crate::openai::size_dimensions;
use crate::upstream::{Endpoint, RequestSummary};
use crate::usage::extract::TokenUsage;

/// Output tokens of the largest image OpenAI's gpt-image-1 table lists (1536x1024 or
/// 1024x1536 at high quality); also taken as the most one input image can count.
pub const MAX_TOKENS_PER_IMAGE: i64 = 6240;
/// The size [`MAX_TOKENS_PER_IMAGE`] is counted at (1536x1024, in pixels); a larger custom
/// size counts in proportion to its area.
const MAX_TOKENS_AREA: i64 = 1536 * 1024;
/// The output tokens OpenAI counts for each partial image of a stream.
pub const PARTIAL_IMAGE_TOKENS: i64 = 100;

/// What a call is priced on: the usage the provider reported, the images it returned, and
/// the quality and size they were made at (the provider's word when it said, else the
/// request's; see [`crate::config::ImageTable::lookup`] for what is charged when neither
/// is in the table).
#[derive(Debug, Clone, Copy, Default)]
pub struct Billed<'a> {
    pub usage: Option<&'a TokenUsage>,
    pub images: u32,
    pub quality: Option<&'a str>,
    pub size: Option<&'a str>,
}

/// The one price evaluation: nano-USD, or `None` for an unpriced entry (its rows record
/// tokens and no cost). Token prices charge cached input at the cached rates, text output
/// at the text output rate and the rest at the full ones (no reported usage: 0); per-image
/// prices and tables charge per image returned; `min_of` the cheaper of tokens and table
/// for this call (the table alone when no usage was reported). Computed in i128 and
/// saturated into i64, so that no count or rate, however absurd, overflows.
pub fn cost_nanousd(price: &Price, call: &Billed) -> Option<i64> {
    let images = i128::from(call.images);
    let per_image = |table: &ImageTable| i128::from(table.lookup(call.quality, call.size)) * images;
    let tokens = |rates: &TokenRates| call.usage.map(|u| token_cost(rates, u));
    let cost = match price {
        Price::Unpriced => return None,
        Price::PerImage(each) => i128::from(*each) * images,
        Price::Table(table) => per_image(table),
        Price::Tokens(rates) => tokens(rates).unwrap_or(0),
        Price::MinOf(rates, table) => {
            let table = per_image(table);
            tokens(rates).map_or(table, |tokens| tokens.min(table))
        }
    };
    Some(saturate(cost))
}

fn token_cost(rates: &TokenRates, u: &TokenUsage) -> i128 {
    let cached_text = u
        .cached_text_input_tokens
        .clamp(0, u.text_input_tokens.max(0));
    let cached_image = u
        .cached_image_input_tokens
        .clamp(0, u.image_input_tokens.max(0));
    let output = u.output_tokens.max(0);
    let text_output = u.text_output_tokens.clamp(0, output);
    let parts = [
        (u.text_input_tokens.max(0) - cached_text, rates.text_input),
        (cached_text, rates.cached_text_input),
        (
            u.image_input_tokens.max(0) - cached_image,
            rates.image_input,
        ),
        (cached_image, rates.cached_image_input),
        (output - text_output, rates.image_output),
        (text_output, rates.text_output),
    ];
    parts
        .iter()
        .map(|&(tokens, rate)| i128::from(tokens) * i128::from(rate))
        .sum()
}

/// The most a call can cost, from the fields sent so far: the budget's hold, and the price
/// of an `interrupted` row, whose usage nobody saw (`None` for an unpriced entry). An
/// upload's fields stream to the provider as they come; a field that has not been sent
/// cannot be billed, and one that arrives later raises the hold before it goes on (see
/// `routing::CostGuard`), so a field not yet read counts as OpenAI's default. It must not
/// under-count, so it prices, through [`cost_nanousd`]:
/// - `n` images (1 when absent, as OpenAI does); at the request's quality and size (a
///   table's dearest entry when it has none);
/// - `n` × [`MAX_TOKENS_PER_IMAGE`] output tokens (more for a custom size larger than
///   1536x1024, in proportion to its area), plus [`PARTIAL_IMAGE_TOKENS`] for each partial
///   image of each image (`partial_images`); one text token per prompt character (a token
///   is never shorter); and for edits `max_images` input images (`server.max_images`,
///   which imagegate enforces) and a mask (variations: one image) of
///   [`MAX_TOKENS_PER_IMAGE`] each, all at the uncached rates.
pub fn worst_case_nanousd(
    price: &Price,
    endpoint: Endpoint,
    summary: &RequestSummary,
    max_images: usize,
) -> Option<i64> {
    let n = summary.n.map_or(1, |n| i64::from(n.max(1)));
    let prompt = i64::try_from(summary.prompt_chars).unwrap_or(i64::MAX);
    let input_images = match endpoint {
        Endpoint::Generations => 0,
        Endpoint::Edits => i64::try_from(max_images)
            .unwrap_or(i64::MAX)
            .saturating_add(1),
        Endpoint::Variations => 1,
    };
    let partials = summary.partial_images.map_or(0, |p| p.max(0));
    let per_image = tokens_at_size(summary.size.as_deref())
        .saturating_add(partials.saturating_mul(PARTIAL_IMAGE_TOKENS));
    let usage = TokenUsage {
        text_input_tokens: prompt,
        image_input_tokens: input_images.saturating_mul(MAX_TOKENS_PER_IMAGE),
        output_tokens: n.saturating_mul(per_image),
        ..TokenUsage::default()
    };
    let call = Billed {
        usage: Some(&usage),
        images: u32::try_from(n).unwrap_or(u32::MAX),
        quality: summary.quality.as_deref(),
        size: summary.size.as_deref(),
    };
    cost_nanousd(price, &call)
}

/// The most output tokens one image of `size` can count: [`MAX_TOKENS_PER_IMAGE`], or for
/// a `WxH` larger than 1536x1024 that in proportion to its area (rounded up).
fn tokens_at_size(size: Option<&str>) -> i64 {
    let area = size
        .and_then(size_dimensions)
        .and_then(|(w, h)| w.checked_mul(h));
    match area {
        Some(area) if area > MAX_TOKENS_AREA => {
            let (scaled, area_max) = (
                i128::from(MAX_TOKENS_PER_IMAGE) * i128::from(area),
                i128::from(MAX_TOKENS_AREA),
            );
            saturate((scaled + area_max - 1) / area_max)
        }
        _ => MAX_TOKENS_PER_IMAGE,
    }
}

/// An i128 amount clamped into i64.
pub fn saturate(n: i128) -> i64 {
    i64::try_from(n).unwrap_or(if n < 0 { i64::MIN } else { i64::MAX })
}

/// A row's cost as reports show it: exact dollars, or "unpriced" when the route has no
/// published price.
pub fn format_cost(nanos: Option<i64>) -> String {
    nanos.map_or_else(|| "unpriced".to_owned(), format_usd)
}

/// Nano-USD as exact dollars: at least two decimals, at most nine, no trailing zeros.
pub fn format_usd(nanos: i64) -> String {
    format_usd_sum(i128::from(nanos))
}

/// [`format_usd`] for sums, which may be past i64.
pub fn format_usd_sum(nanos: i128) -> String {
    let sign = if nanos < 0 { "-" } else { "" };
    let abs = nanos.unsigned_abs();
    let fraction = format!("{:09}", abs % 1_000_000_000);
    let fraction = fraction.trim_end_matches('0');
    format!("{sign}{}.{fraction:0<2}", abs / 1_000_000_000)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// PiAPI's gpt-image-1 rates (its GPT-image page).
    const GPT_IMAGE_1: Price = Price::Tokens(rates(5000, 1250, 10000, 1250, 40000));

    const fn rates(
        text: i64,
        cached_text: i64,
        image: i64,
        cached_image: i64,
        out: i64,
    ) -> TokenRates {
        TokenRates {
            text_input: text,
            cached_text_input: cached_text,
            image_input: image,
            cached_image_input: cached_image,
            image_output: out,
            text_output: out,
        }
    }

    fn table(rows: &[(&str, &[(&str, i64)])]) -> Arc<ImageTable> {
        Arc::new(ImageTable(
            rows.iter()
                .map(|(q, sizes)| {
                    let sizes = sizes.iter().map(|(s, n)| ((*s).to_owned(), *n)).collect();
                    ((*q).to_owned(), sizes)
                })
                .collect(),
        ))
    }

    fn usage(text: i64, image: i64, output: i64) -> TokenUsage {
        TokenUsage {
            input_tokens: text + image,
            output_tokens: output,
            total_tokens: text + image + output,
            text_input_tokens: text,
            image_input_tokens: image,
            ..TokenUsage::default()
        }
    }

    /// What, the price, the usage reported, images, quality, size, the cost.
    type Case<'a> = (
        &'a str,
        &'a Price,
        Option<TokenUsage>,
        u32,
        &'a str,
        &'a str,
        Option<i64>,
    );

    #[test]
    fn each_kind_of_price_as_a_table() {
        // APIYI's legacy page: one input rate, one output rate, no cached discount, and
        // per-image prices by quality and size; it bills whichever is cheaper.
        let apiyi_1 = Price::MinOf(
            rates(2500, 2500, 2500, 2500, 8000),
            table(&[
                ("low", &[("1024x1024", 5_000_000), ("1536x1024", 6_000_000)]),
                (
                    "high",
                    &[("1024x1024", 36_000_000), ("1536x1024", 52_000_000)],
                ),
            ]),
        );
        let apiyi_1_5 = Price::MinOf(
            rates(5000, 5000, 5000, 5000, 10000),
            table(&[
                (
                    "low",
                    &[("1024x1024", 9_000_000), ("1536x1024", 13_000_000)],
                ),
                (
                    "medium",
                    &[("1024x1024", 34_000_000), ("1536x1024", 50_000_000)],
                ),
            ]),
        );
        let only_table = Price::Table(table(&[("low", &[("1024x1024", 9_000_000)])]));
        let cases: [Case; 10] = [
            (
                "PiAPI's sample response, by kind of token",
                &GPT_IMAGE_1,
                Some(usage(19, 1105, 765)),
                1,
                "auto",
                "1024x1024",
                Some(19 * 5000 + 1105 * 10000 + 765 * 40000),
            ),
            (
                "tokens, no usage reported",
                &GPT_IMAGE_1,
                None,
                2,
                "low",
                "1024x1024",
                Some(0),
            ),
            (
                "flat",
                &Price::PerImage(30_000_000),
                None,
                3,
                "low",
                "auto",
                Some(90_000_000),
            ),
            (
                "flat, no image",
                &Price::PerImage(30_000_000),
                None,
                0,
                "low",
                "auto",
                Some(0),
            ),
            (
                "APIYI gpt-image-1, high 1024x1024: tokens are cheaper",
                &apiyi_1,
                Some(usage(20, 0, 4160)),
                1,
                "high",
                "1024x1024",
                Some(20 * 2500 + 4160 * 8000),
            ),
            (
                "APIYI gpt-image-1 edit, low 1024x1024: the per-image price is cheaper",
                &apiyi_1,
                Some(usage(30, 3000, 272)),
                1,
                "low",
                "1024x1024",
                Some(5_000_000),
            ),
            (
                "APIYI gpt-image-1.5, two medium 1536x1024: tokens are cheaper",
                &apiyi_1_5,
                Some(usage(15, 0, 3168)),
                2,
                "medium",
                "1536x1024",
                Some(15 * 5000 + 3168 * 10000),
            ),
            (
                "APIYI gpt-image-1.5, no usage reported: the table",
                &apiyi_1_5,
                None,
                1,
                "low",
                "1536x1024",
                Some(13_000_000),
            ),
            (
                "a table alone",
                &only_table,
                None,
                2,
                "low",
                "1024x1024",
                Some(18_000_000),
            ),
            (
                "unpriced",
                &Price::Unpriced,
                Some(usage(19, 0, 765)),
                1,
                "low",
                "1024x1024",
                None,
            ),
        ];
        for (what, price, usage, images, quality, size, expected) in cases {
            let call = Billed {
                usage: usage.as_ref(),
                images,
                quality: Some(quality),
                size: Some(size),
            };
            assert_eq!(cost_nanousd(price, &call), expected, "{what}");
        }
    }

    #[test]
    fn cached_input_and_text_output_have_their_rates() {
        let usage = TokenUsage {
            text_input_tokens: 100,
            cached_text_input_tokens: 40,
            image_input_tokens: 10,
            cached_image_input_tokens: 50,
            output_tokens: 4160,
            text_output_tokens: 160,
            ..TokenUsage::default()
        };
        let call = Billed {
            usage: Some(&usage),
            ..Billed::default()
        };
        // Cached image tokens beyond the image tokens reported are capped. Without a rate
        // of its own, text output is image output.
        let input = 60 * 5000 + 40 * 1250 + 10 * 1250;
        assert_eq!(
            cost_nanousd(&GPT_IMAGE_1, &call),
            Some(input + 4160 * 40000)
        );
        let text_rate = Price::Tokens(TokenRates {
            text_output: 10000,
            ..rates(5000, 1250, 10000, 1250, 40000)
        });
        assert_eq!(
            cost_nanousd(&text_rate, &call),
            Some(input + 4000 * 40000 + 160 * 10000)
        );
    }

    #[test]
    fn dollars_print_exactly() {
        assert_eq!(format_usd(41_745_000), "0.041745");
        assert_eq!(format_usd(30_000_000), "0.03");
        assert_eq!(format_usd(2_500_000_000), "2.50");
        assert_eq!(format_usd(1), "0.000000001");
        assert_eq!(format_usd(0), "0.00");
        assert_eq!(format_cost(None), "unpriced");
        assert_eq!(format_cost(Some(30_000_000)), "0.03");
    }

    fn worst(price: &Price, endpoint: Endpoint, summary: &RequestSummary) -> Option<i64> {
        worst_case_nanousd(price, endpoint, summary, 16)
    }

    #[test]
    fn the_worst_case_covers_the_largest_answer() {
        let summary = |n: Option<i32>, prompt_chars: usize| RequestSummary {
            n,
            prompt_chars,
            ..RequestSummary::default()
        };
        // A generation of 2 images, 40-character prompt: 2 of the largest images.
        assert_eq!(
            worst(&GPT_IMAGE_1, Endpoint::Generations, &summary(Some(2), 40)),
            Some(40 * 5000 + 2 * 6240 * 40000)
        );
        // The largest answer mock or real providers give costs no more than that.
        let largest = usage(10, 0, 6240);
        let call = Billed {
            usage: Some(&largest),
            images: 1,
            ..Billed::default()
        };
        assert!(
            cost_nanousd(&GPT_IMAGE_1, &call)
                <= worst(&GPT_IMAGE_1, Endpoint::Generations, &summary(None, 40))
        );
        // An edit whose fields have not arrived: what was sent (their defaults), since a
        // field that arrives later raises the hold before it is sent on.
        assert_eq!(
            worst(&GPT_IMAGE_1, Endpoint::Edits, &summary(None, 0)),
            Some(17 * 6240 * 10000 + 6240 * 40000)
        );
        // As many input images as `server.max_images` lets through, and the mask.
        assert_eq!(
            worst_case_nanousd(&GPT_IMAGE_1, Endpoint::Edits, &summary(Some(10), 8), 40),
            Some(8 * 5000 + 41 * 6240 * 10000 + 10 * 6240 * 40000)
        );
        // A custom size larger than 1536x1024 counts in proportion to its area, and each
        // partial image of a stream 100 output tokens more.
        let big = RequestSummary {
            size: Some("2880x1616".into()),
            partial_images: Some(2),
            stream: true,
            ..summary(Some(1), 40)
        };
        // 6240 x (2880 x 1616) / (1536 x 1024) = 18,464.06: 18,465, and 2 x 100 for the
        // partials.
        let tokens = 18_465 + 200;
        assert_eq!(
            worst(&GPT_IMAGE_1, Endpoint::Generations, &big),
            Some(40 * 5000 + tokens * 40000)
        );
        // Up to 1536x1024, or a size that is not WxH: the largest image of the table.
        for size in [
            "1024x1024",
            "auto",
            "1536 x 1024",
            "huge",
            "99999999999x99999999999",
        ] {
            let call = RequestSummary {
                size: Some(size.into()),
                ..summary(Some(1), 40)
            };
            assert_eq!(
                worst(&GPT_IMAGE_1, Endpoint::Generations, &call),
                Some(40 * 5000 + 6240 * 40000),
                "{size}"
            );
        }
        assert_eq!(
            worst(
                &Price::PerImage(40_000_000),
                Endpoint::Variations,
                &summary(Some(3), 0)
            ),
            Some(120_000_000)
        );
        // A table: n images at the request's quality and size, the dearest when unknown.
        let apiyi = Price::MinOf(
            rates(2500, 2500, 2500, 2500, 8000),
            table(&[
                ("low", &[("1024x1024", 5_000_000)]),
                ("high", &[("1024x1024", 36_000_000)]),
            ]),
        );
        let low = RequestSummary {
            quality: Some("low".into()),
            ..summary(Some(2), 40)
        };
        assert_eq!(worst(&apiyi, Endpoint::Generations, &low), Some(10_000_000));
        assert_eq!(
            worst(&apiyi, Endpoint::Generations, &summary(Some(2), 40)),
            Some(72_000_000)
        );
        assert_eq!(
            worst(&Price::Unpriced, Endpoint::Edits, &summary(None, 0)),
            None
        );
    }
}
