//! What a provider call costs, from the pricing table and the usage the provider reported.

use crate::config::Price;
use crate::upstream::{Endpoint, RequestSummary};
use crate::usage::extract::TokenUsage;

/// Output tokens of the largest image OpenAI's gpt-image-1 table lists (1536x1024 or
/// 1024x1536 at high quality); also taken as the most one input image can count.
pub const MAX_TOKENS_PER_IMAGE: i64 = 6240;
/// The most images one request can ask for (`n`, OpenAI's limit).
pub const MAX_N: i64 = 10;
/// The most input images an edit can carry (gpt-image-1's limit).
pub const MAX_INPUT_IMAGES: i64 = 16;
/// The longest prompt, in characters (gpt-image-1's limit).
pub const MAX_PROMPT_CHARS: i64 = 32_000;

/// The most a call can cost, from what is known of it when it is sent: the price of an
/// `interrupted` row, whose usage nobody saw. It must not under-count, so:
/// - `n` is the request's, or [`MAX_N`] for an upload whose `n` has not arrived yet (its
///   fields stream to the provider as they come); generations default to 1 as OpenAI does;
/// - per-image prices: `n` images;
/// - token prices: `n` × [`MAX_TOKENS_PER_IMAGE`] output tokens, one text token per prompt
///   character (a token is never shorter; [`MAX_PROMPT_CHARS`] when the prompt has not
///   arrived), and for edits [`MAX_INPUT_IMAGES`] (variations: one) input images of
///   [`MAX_TOKENS_PER_IMAGE`] each, all at the uncached rates.
pub fn worst_case_nanousd(price: &Price, endpoint: Endpoint, summary: &RequestSummary) -> i64 {
    let upload = endpoint != Endpoint::Generations;
    let n = match summary.n {
        Some(n) => i64::from(n.max(1)),
        None if upload => MAX_N,
        None => 1,
    };
    let cost: i128 = match price {
        Price::PerImage(each) => i128::from(*each) * i128::from(n),
        Price::Tokens {
            text_input,
            image_input,
            image_output,
            ..
        } => {
            let prompt = match i64::try_from(summary.prompt_chars).unwrap_or(i64::MAX) {
                0 if upload => MAX_PROMPT_CHARS,
                chars => chars,
            };
            let input_images = match endpoint {
                Endpoint::Generations => 0,
                Endpoint::Edits => MAX_INPUT_IMAGES,
                Endpoint::Variations => 1,
            };
            i128::from(prompt) * i128::from(*text_input)
                + i128::from(input_images * MAX_TOKENS_PER_IMAGE) * i128::from(*image_input)
                + i128::from(n * MAX_TOKENS_PER_IMAGE) * i128::from(*image_output)
        }
    };
    saturate(cost)
}

/// Cost in nano-USD. Token-priced routes charge cached tokens at the cached rates and the
/// rest at the full ones; flat routes charge per image returned. Computed in i128 and
/// saturated into i64, so that no count or rate, however absurd, overflows.
pub fn cost_nanousd(price: &Price, usage: Option<&TokenUsage>, images: u32) -> i64 {
    let cost: i128 = match price {
        Price::PerImage(each) => i128::from(*each) * i128::from(images),
        Price::Tokens {
            text_input,
            cached_text_input,
            image_input,
            cached_image_input,
            image_output,
        } => {
            let Some(u) = usage else { return 0 };
            let cached_text = u
                .cached_text_input_tokens
                .clamp(0, u.text_input_tokens.max(0));
            let cached_image = u
                .cached_image_input_tokens
                .clamp(0, u.image_input_tokens.max(0));
            let parts = [
                (u.text_input_tokens.max(0) - cached_text, *text_input),
                (cached_text, *cached_text_input),
                (u.image_input_tokens.max(0) - cached_image, *image_input),
                (cached_image, *cached_image_input),
                (u.output_tokens.max(0), *image_output),
            ];
            parts
                .iter()
                .map(|&(tokens, rate)| i128::from(tokens) * i128::from(rate))
                .sum()
        }
    };
    saturate(cost)
}

/// An i128 amount clamped into i64.
pub fn saturate(n: i128) -> i64 {
    i64::try_from(n).unwrap_or(if n < 0 { i64::MIN } else { i64::MAX })
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
    use super::*;

    const GPT_IMAGE_1: Price = Price::Tokens {
        text_input: 5000,
        cached_text_input: 1250,
        image_input: 10000,
        cached_image_input: 1250,
        image_output: 40000,
    };

    #[test]
    fn tokens_are_priced_by_kind() {
        // PiAPI's sample response: 19 text + 1105 image input tokens, 765 output tokens.
        let usage = TokenUsage {
            input_tokens: 1124,
            output_tokens: 765,
            total_tokens: 1889,
            text_input_tokens: 19,
            image_input_tokens: 1105,
            ..TokenUsage::default()
        };
        let expected = 19 * 5000 + 1105 * 10000 + 765 * 40000;
        assert_eq!(cost_nanousd(&GPT_IMAGE_1, Some(&usage), 1), expected);
        assert_eq!(format_usd(expected), "0.041745");
        assert_eq!(format_usd(30_000_000), "0.03");
        assert_eq!(format_usd(2_500_000_000), "2.50");
        assert_eq!(format_usd(1), "0.000000001");
        assert_eq!(format_usd(0), "0.00");
    }

    #[test]
    fn cached_tokens_use_cached_rates() {
        let usage = TokenUsage {
            text_input_tokens: 100,
            cached_text_input_tokens: 40,
            image_input_tokens: 10,
            cached_image_input_tokens: 50,
            ..TokenUsage::default()
        };
        // Cached image tokens beyond the image tokens reported are capped.
        assert_eq!(
            cost_nanousd(&GPT_IMAGE_1, Some(&usage), 0),
            60 * 5000 + 40 * 1250 + 10 * 1250
        );
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
            worst_case_nanousd(&GPT_IMAGE_1, Endpoint::Generations, &summary(Some(2), 40)),
            40 * 5000 + 2 * 6240 * 40000
        );
        // The largest answer mock or real providers give costs no more than that.
        assert!(
            cost_nanousd(
                &GPT_IMAGE_1,
                Some(&TokenUsage {
                    text_input_tokens: 10,
                    output_tokens: 6240,
                    ..TokenUsage::default()
                }),
                1
            ) <= worst_case_nanousd(&GPT_IMAGE_1, Endpoint::Generations, &summary(None, 40))
        );
        // An edit whose fields have not arrived: the limits.
        assert_eq!(
            worst_case_nanousd(&GPT_IMAGE_1, Endpoint::Edits, &summary(None, 0)),
            32_000 * 5000 + 16 * 6240 * 10000 + 10 * 6240 * 40000
        );
        assert_eq!(
            worst_case_nanousd(
                &Price::PerImage(40_000_000),
                Endpoint::Variations,
                &summary(Some(3), 0)
            ),
            120_000_000
        );
    }

    #[test]
    fn flat_prices_count_images_returned() {
        assert_eq!(
            cost_nanousd(&Price::PerImage(30_000_000), None, 3),
            90_000_000
        );
        assert_eq!(cost_nanousd(&Price::PerImage(30_000_000), None, 0), 0);
        assert_eq!(cost_nanousd(&GPT_IMAGE_1, None, 2), 0);
    }
}
