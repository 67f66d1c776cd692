//! What a provider call costs, from the pricing table and the usage the provider reported.

use crate::config::Price;
use crate::usage::extract::TokenUsage;

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
    fn flat_prices_count_images_returned() {
        assert_eq!(
            cost_nanousd(&Price::PerImage(30_000_000), None, 3),
            90_000_000
        );
        assert_eq!(cost_nanousd(&Price::PerImage(30_000_000), None, 0), 0);
        assert_eq!(cost_nanousd(&GPT_IMAGE_1, None, 2), 0);
    }
}
