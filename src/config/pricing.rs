//! `[pricing.PROVIDER.MODEL]`: what a route's usage costs, in whole nano-dollars.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::providers::Provider;
use super::raw::RawPrice;
use super::{ConfigError, Validator};

/// Prices in billionths of a dollar (nano-USD), so that costs add up exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Price {
    /// Nano-USD per token (a rate of $5 per million tokens is 5000).
    Tokens {
        text_input: i64,
        cached_text_input: i64,
        image_input: i64,
        cached_image_input: i64,
        image_output: i64,
    },
    PerImage(i64),
}

/// (provider, upstream model) -> its price.
pub(super) type Prices = HashMap<(String, String), Price>;

impl Validator<'_> {
    pub(super) fn prices(
        &self,
        raw: &BTreeMap<String, BTreeMap<String, RawPrice>>,
        providers: &BTreeMap<String, Arc<Provider>>,
    ) -> Result<Prices, ConfigError> {
        let mut out = HashMap::new();
        for (provider, models) in raw {
            if !providers.contains_key(provider) {
                return Err(self.err(format!("pricing.{provider}"), "no provider by that name"));
            }
            for (model, p) in models {
                let price = self.price(&format!("pricing.{provider}.{model}"), p)?;
                out.insert((provider.clone(), model.clone()), price);
            }
        }
        Ok(out)
    }

    fn price(&self, key: &str, p: &RawPrice) -> Result<Price, ConfigError> {
        let rates = [
            ("text_input", p.text_input),
            ("cached_text_input", p.cached_text_input),
            ("image_input", p.image_input),
            ("cached_image_input", p.cached_image_input),
            ("image_output", p.image_output),
        ];
        match (p.per_image, rates.iter().any(|(_, r)| r.is_some())) {
            (Some(_), true) => Err(self.err(key, "set either per_image or token rates, not both")),
            (Some(usd), false) => Ok(Price::PerImage(self.nanos(
                &format!("{key}.per_image"),
                usd,
                1e9,
            )?)),
            (None, false) => Err(self.err(
                key,
                "needs per_image or token rates (USD per million tokens)",
            )),
            (None, true) => {
                let mut n = [0i64; 5];
                for (slot, (field, rate)) in n.iter_mut().zip(rates) {
                    let rate = rate.ok_or_else(|| self.err(format!("{key}.{field}"), "missing"))?;
                    // USD per million tokens -> nano-USD per token.
                    *slot = self.nanos(&format!("{key}.{field}"), rate, 1e3)?;
                }
                Ok(Price::Tokens {
                    text_input: n[0],
                    cached_text_input: n[1],
                    image_input: n[2],
                    cached_image_input: n[3],
                    image_output: n[4],
                })
            }
        }
    }

    /// Converts dollars to whole nano-USD units, refusing what would be rounded.
    fn nanos(&self, key: &str, usd: f64, scale: f64) -> Result<i64, ConfigError> {
        if !usd.is_finite() || usd < 0.0 {
            return Err(self.err(key, "must be a non-negative number"));
        }
        let scaled = usd * scale;
        let whole = scaled.round();
        if (scaled - whole).abs() > 1e-6 || whole > 1e15 {
            return Err(self.err(
                key,
                format!("{usd} has more decimals than a nano-dollar can hold"),
            ));
        }
        #[expect(
            clippy::cast_possible_truncation,
            reason = "checked to be a whole number below 1e15"
        )]
        Ok(whole as i64)
    }
}
