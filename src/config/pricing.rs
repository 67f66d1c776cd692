//! `[pricing.PROVIDER.MODEL]`: what a route's usage costs, in whole nano-dollars, and which
//! page says so.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::providers::Provider;
use super::raw::RawPrice;
use super::{ConfigError, Validator};

/// How a provider bills a model. Amounts are in billionths of a dollar (nano-USD), so that
/// costs add up exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Price {
    /// By the tokens the provider reports.
    Tokens(TokenRates),
    /// A flat price per image returned.
    PerImage(i64),
    /// A price per image returned, by quality and size.
    Table(Arc<ImageTable>),
    /// Whichever of the two is cheaper, call by call.
    MinOf(TokenRates, Arc<ImageTable>),
    /// No published price: usage is recorded with no cost.
    Unpriced,
}

impl Price {
    /// The kind's name, as `config check` shows it.
    pub fn kind(&self) -> &'static str {
        match self {
            Price::Tokens(_) => "tokens",
            Price::PerImage(_) => "per_image",
            Price::Table(_) => "table",
            Price::MinOf(..) => "min_of(tokens, table)",
            Price::Unpriced => "unpriced",
        }
    }
}

/// Nano-USD per token (a rate of $5 per million tokens is 5000).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenRates {
    pub text_input: i64,
    pub cached_text_input: i64,
    pub image_input: i64,
    pub cached_image_input: i64,
    pub image_output: i64,
    /// Output tokens the provider reports as text (`output_tokens_details.text_tokens`);
    /// the image output rate when the entry sets none.
    pub text_output: i64,
}

/// Per-image prices: quality -> size -> nano-USD. Looked up with the quality and size the
/// provider's answer reports, else the request's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageTable(pub BTreeMap<String, BTreeMap<String, i64>>);

impl ImageTable {
    /// The price of one image. A quality or size the table does not list (absent, "auto",
    /// a custom `WxH`) is not guessed low: the highest price among the entries that match
    /// what is known is charged, and the highest of the table when nothing matches.
    pub fn lookup(&self, quality: Option<&str>, size: Option<&str>) -> i64 {
        let quality = quality.filter(|q| self.0.contains_key(*q));
        let size = size.filter(|s| self.0.values().any(|sizes| sizes.contains_key(*s)));
        let prices = |exact: bool| {
            self.0
                .iter()
                .filter(move |(q, _)| !exact || quality.is_none_or(|want| want == q.as_str()))
                .flat_map(|(_, sizes)| sizes.iter())
                .filter(move |(s, _)| !exact || size.is_none_or(|want| want == s.as_str()))
                .map(|(_, nanos)| *nanos)
                .max()
        };
        prices(true).or_else(|| prices(false)).unwrap_or(0)
    }
}

/// A price and the page it was taken from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceEntry {
    pub price: Price,
    /// `source`: the page (and its date) the price comes from.
    pub source: Option<String>,
}

/// (provider, upstream model) -> its price.
pub(super) type Prices = HashMap<(String, String), PriceEntry>;

/// A warning for each unpriced entry and each entry that names no source, in key order.
pub(super) fn warnings(prices: &Prices) -> Vec<String> {
    let mut keys: Vec<&(String, String)> = prices.keys().collect();
    keys.sort_unstable();
    let mut warnings = Vec::new();
    for key @ (provider, model) in keys {
        let entry = &prices[key];
        if entry.price == Price::Unpriced {
            warnings.push(format!(
                "pricing.{provider}.{model} is unpriced: its calls are recorded with their tokens and no cost"
            ));
        }
        if entry.source.is_none() {
            warnings.push(format!(
                "pricing.{provider}.{model} names no source (the page and date its price comes from)"
            ));
        }
    }
    warnings
}

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
                let entry = PriceEntry {
                    price,
                    source: p.source.clone(),
                };
                out.insert((provider.clone(), model.clone()), entry);
            }
        }
        Ok(out)
    }

    /// One entry: exactly one of token rates, `per_image`, `table`, `unpriced = true`, or
    /// token rates and a table with `min_of = ["tokens", "table"]`.
    fn price(&self, key: &str, p: &RawPrice) -> Result<Price, ConfigError> {
        let tokens = self.token_rates(key, p)?;
        let table = p
            .table
            .as_ref()
            .map(|t| self.table(&format!("{key}.table"), t))
            .transpose()?;
        let per_image = p
            .per_image
            .map(|usd| self.nanos(&format!("{key}.per_image"), usd, 1e9))
            .transpose()?;
        if let Some(parts) = &p.min_of {
            let mut names: Vec<&str> = parts.iter().map(String::as_str).collect();
            names.sort_unstable();
            if names != ["table", "tokens"] {
                return Err(self.err(
                    format!("{key}.min_of"),
                    "takes [\"tokens\", \"table\"] (the cheaper of the two per call)",
                ));
            }
        }
        let unpriced = p.unpriced == Some(true);
        match (tokens, per_image, table, p.min_of.is_some(), unpriced) {
            (None, None, None, false, true) => Ok(Price::Unpriced),
            (Some(t), None, None, false, false) => Ok(Price::Tokens(t)),
            (None, Some(each), None, false, false) => Ok(Price::PerImage(each)),
            (None, None, Some(table), false, false) => Ok(Price::Table(Arc::new(table))),
            (Some(t), None, Some(table), true, false) => Ok(Price::MinOf(t, Arc::new(table))),
            (Some(_), None, Some(_), false, false) => Err(self.err(
                key,
                "token rates and a table: set min_of = [\"tokens\", \"table\"] to charge the cheaper",
            )),
            (_, _, _, true, false) => Err(self.err(
                format!("{key}.min_of"),
                "needs token rates and a table, and no per_image",
            )),
            (None, None, None, false, false) => Err(self.err(
                key,
                "needs token rates (USD per million tokens), per_image, a table, or unpriced = true",
            )),
            (_, _, _, _, true) => Err(self.err(
                format!("{key}.unpriced"),
                "an unpriced entry takes no rates, per_image or table",
            )),
            _ => Err(self.err(
                key,
                "set one of token rates, per_image or a table (or min_of of tokens and a table)",
            )),
        }
    }

    /// The five token rates, all or none, and the optional text output rate.
    fn token_rates(&self, key: &str, p: &RawPrice) -> Result<Option<TokenRates>, ConfigError> {
        let rates = [
            ("text_input", p.text_input),
            ("cached_text_input", p.cached_text_input),
            ("image_input", p.image_input),
            ("cached_image_input", p.cached_image_input),
            ("image_output", p.image_output),
        ];
        if rates.iter().all(|(_, r)| r.is_none()) {
            if p.text_output.is_some() {
                return Err(self.err(
                    format!("{key}.text_output"),
                    "only with the other token rates",
                ));
            }
            return Ok(None);
        }
        let mut n = [0i64; 5];
        for (slot, (field, rate)) in n.iter_mut().zip(rates) {
            let rate = rate.ok_or_else(|| self.err(format!("{key}.{field}"), "missing"))?;
            // USD per million tokens -> nano-USD per token.
            *slot = self.nanos(&format!("{key}.{field}"), rate, 1e3)?;
        }
        let text_output = match p.text_output {
            Some(rate) => self.nanos(&format!("{key}.text_output"), rate, 1e3)?,
            None => n[4],
        };
        Ok(Some(TokenRates {
            text_input: n[0],
            cached_text_input: n[1],
            image_input: n[2],
            cached_image_input: n[3],
            image_output: n[4],
            text_output,
        }))
    }

    /// `table`: quality -> size -> USD per image, at least one price.
    fn table(
        &self,
        key: &str,
        raw: &BTreeMap<String, BTreeMap<String, f64>>,
    ) -> Result<ImageTable, ConfigError> {
        let mut table = BTreeMap::new();
        for (quality, sizes) in raw {
            let mut row = BTreeMap::new();
            for (size, usd) in sizes {
                row.insert(
                    size.clone(),
                    self.nanos(&format!("{key}.{quality}.{size}"), *usd, 1e9)?,
                );
            }
            if !row.is_empty() {
                table.insert(quality.clone(), row);
            }
        }
        if table.is_empty() {
            return Err(self.err(key, "needs at least one quality = { SIZE = USD }"));
        }
        Ok(ImageTable(table))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_never_guesses_a_price_low() {
        let table = ImageTable(
            [
                ("low", [("1024x1024", 9), ("1536x1024", 13)]),
                ("high", [("1024x1024", 133), ("1536x1024", 200)]),
            ]
            .into_iter()
            .map(|(q, sizes)| {
                let sizes = sizes.into_iter().map(|(s, n)| (s.to_owned(), n)).collect();
                (q.to_owned(), sizes)
            })
            .collect(),
        );
        let cases = [
            (Some("low"), Some("1536x1024"), 13),
            (Some("high"), Some("1024x1024"), 133),
            // Unknown quality ("auto", absent, "standard"): the dearest for that size.
            (Some("auto"), Some("1024x1024"), 133),
            (None, Some("1536x1024"), 200),
            // Unknown size ("auto", a custom WxH): the dearest for that quality.
            (Some("low"), Some("auto"), 13),
            (Some("low"), Some("2048x2048"), 13),
            // Neither known: the dearest of the table.
            (Some("xhigh"), None, 200),
            (None, None, 200),
        ];
        for (quality, size, expected) in cases {
            assert_eq!(
                table.lookup(quality, size),
                expected,
                "{quality:?} {size:?}"
            );
        }
    }
}
