//! A provider's `usage` object read straight into its token counts.
//!
//! Parsing it into a `serde_json::Value` first (an ordered map per object, a SipHash per
//! key, an allocation per key and value) cost about 12,000 instructions on every call;
//! this reads the same JSON in one pass and keeps only the numbers. The rules are
//! [`TokenUsage`]'s, and the tests hold this reader to the `Value` reading they replaced.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::extract::TokenUsage;

/// The counts of a `usage` object's text; `None` when it is not JSON or not an object.
pub fn read(text: &[u8]) -> Option<TokenUsage> {
    let Object(usage) = serde_json::from_slice::<Object<Usage>>(text).ok()?;
    let usage = usage?;
    let input = usage.input.or_zero();
    let output = usage.output.or_zero();
    // An unusable total is treated like a missing one: 0 would undercount the call.
    let total = usage.total.0.unwrap_or(input.saturating_add(output));

    let details = usage.input_details.0;
    // One provider sends no details; others send details without the split (only
    // `cached_tokens`). Either way the split is unknown, and text is the safe reading.
    let (text, image) = match &details {
        Some(d) if d.has_split => (d.split.text.or_zero(), d.split.image.or_zero()),
        _ => (input, 0),
    };
    let (cached_text, cached_image) = match &details {
        None => (0, 0),
        Some(d) => match &d.cached_details.0 {
            Some(c) => (c.text.or_zero(), c.image.or_zero()),
            None => {
                let cached = d.cached.or_zero();
                let cached_text = cached.min(text);
                (cached_text, cached - cached_text)
            }
        },
    };
    let text_output = usage
        .output_details
        .0
        .map_or(0, |d| d.text.or_zero().min(output));

    Some(TokenUsage {
        input_tokens: input,
        output_tokens: output,
        total_tokens: total,
        text_input_tokens: text,
        image_input_tokens: image,
        cached_text_input_tokens: cached_text,
        cached_image_input_tokens: cached_image,
        text_output_tokens: text_output,
    })
}

/// The top level of `usage`.
#[derive(Default)]
struct Usage {
    input: Count,
    output: Count,
    total: Count,
    input_details: Object<InputDetails>,
    output_details: Object<Split>,
}

/// `input_tokens_details`.
#[derive(Default)]
struct InputDetails {
    split: Split,
    /// `text_tokens` or `image_tokens` was there, whatever its value.
    has_split: bool,
    cached: Count,
    cached_details: Object<Split>,
}

/// `text_tokens` and `image_tokens`: `output_tokens_details`, `cached_tokens_details`.
#[derive(Default)]
struct Split {
    text: Count,
    image: Count,
}

/// An object's fields, by name. A name given twice counts as its last value, as it did
/// in a `Value` (whose map keeps the last).
trait Fields: Default {
    const NAMES: &'static [&'static str];

    fn field<'de, A: MapAccess<'de>>(&mut self, index: usize, map: &mut A) -> Result<(), A::Error>;
}

impl Fields for Usage {
    const NAMES: &'static [&'static str] = &[
        "input_tokens",
        "output_tokens",
        "total_tokens",
        "input_tokens_details",
        "output_tokens_details",
    ];

    fn field<'de, A: MapAccess<'de>>(&mut self, index: usize, map: &mut A) -> Result<(), A::Error> {
        match index {
            0 => self.input = map.next_value()?,
            1 => self.output = map.next_value()?,
            2 => self.total = map.next_value()?,
            3 => self.input_details = map.next_value()?,
            _ => self.output_details = map.next_value()?,
        }
        Ok(())
    }
}

impl Fields for InputDetails {
    const NAMES: &'static [&'static str] = &[
        "text_tokens",
        "image_tokens",
        "cached_tokens",
        "cached_tokens_details",
    ];

    fn field<'de, A: MapAccess<'de>>(&mut self, index: usize, map: &mut A) -> Result<(), A::Error> {
        match index {
            0 | 1 => {
                self.has_split = true;
                self.split.field(index, map)?;
            }
            2 => self.cached = map.next_value()?,
            _ => self.cached_details = map.next_value()?,
        }
        Ok(())
    }
}

impl Fields for Split {
    const NAMES: &'static [&'static str] = &["text_tokens", "image_tokens"];

    fn field<'de, A: MapAccess<'de>>(&mut self, index: usize, map: &mut A) -> Result<(), A::Error> {
        match index {
            0 => self.text = map.next_value()?,
            _ => self.image = map.next_value()?,
        }
        Ok(())
    }
}

/// A count as the rules read one: a non-negative integer that fits an `i64`; anything
/// else (a float, a string, null, an object) is no count.
#[derive(Default, Clone, Copy)]
struct Count(Option<i64>);

impl Count {
    fn or_zero(self) -> i64 {
        self.0.unwrap_or(0)
    }
}

impl<'de> serde::Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(AnyValue(|n: Option<i64>| Count(n.filter(|n| *n >= 0))))
    }
}

/// `T` when the value is an object, `None` for any other value.
struct Object<T>(Option<T>);

impl<T> Default for Object<T> {
    fn default() -> Self {
        Object(None)
    }
}

impl<'de, T: Fields> serde::Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ObjectVisitor(PhantomData))
    }
}

struct ObjectVisitor<T>(PhantomData<T>);

impl<'de, T: Fields> Visitor<'de> for ObjectVisitor<T> {
    type Value = Object<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Object<T>, A::Error> {
        let mut fields = T::default();
        while let Some(name) = map.next_key_seed(Name(T::NAMES))? {
            match name {
                Some(index) => fields.field(index, &mut map)?,
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Object(Some(fields)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Object<T>, A::Error> {
        IgnoredAny.visit_seq(seq)?;
        Ok(Object(None))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Object<T>, E> {
        Ok(Object(None))
    }

    fn visit_i64<E>(self, _: i64) -> Result<Object<T>, E> {
        Ok(Object(None))
    }

    fn visit_u64<E>(self, _: u64) -> Result<Object<T>, E> {
        Ok(Object(None))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Object<T>, E> {
        Ok(Object(None))
    }

    fn visit_str<E>(self, _: &str) -> Result<Object<T>, E> {
        Ok(Object(None))
    }

    fn visit_unit<E>(self) -> Result<Object<T>, E> {
        Ok(Object(None))
    }
}

/// Any JSON value, of which only an integer is kept (`None` for the rest, which is read
/// through and dropped); `F` makes the result of it.
struct AnyValue<F>(F);

impl<'de, R, F: FnOnce(Option<i64>) -> R> Visitor<'de> for AnyValue<F> {
    type Value = R;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_i64<E>(self, n: i64) -> Result<R, E> {
        Ok((self.0)(Some(n)))
    }

    fn visit_u64<E>(self, n: u64) -> Result<R, E> {
        Ok((self.0)(i64::try_from(n).ok()))
    }

    fn visit_f64<E>(self, _: f64) -> Result<R, E> {
        Ok((self.0)(None))
    }

    fn visit_bool<E>(self, _: bool) -> Result<R, E> {
        Ok((self.0)(None))
    }

    fn visit_str<E>(self, _: &str) -> Result<R, E> {
        Ok((self.0)(None))
    }

    fn visit_unit<E>(self) -> Result<R, E> {
        Ok((self.0)(None))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<R, A::Error> {
        IgnoredAny.visit_map(map)?;
        Ok((self.0)(None))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<R, A::Error> {
        IgnoredAny.visit_seq(seq)?;
        Ok((self.0)(None))
    }
}

/// A key: its index among the names looked for, or `None` for any other key. Read
/// without copying it unless it holds escapes.
struct Name(&'static [&'static str]);

impl<'de> DeserializeSeed<'de> for Name {
    type Value = Option<usize>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Name {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E>(self, key: &str) -> Result<Option<usize>, E> {
        Ok(self.0.iter().position(|name| *name == key))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    /// The reading this module replaced, kept as the reference: `usage` parsed into a
    /// `Value`, then [`TokenUsage::from_json`].
    fn by_value(text: &str) -> Option<TokenUsage> {
        let value: Value = serde_json::from_str(text).ok()?;
        TokenUsage::from_json(&value)
    }

    /// Values a count or a details object may be sent as, the odd ones included.
    const VALUES: &[&str] = &[
        "0",
        "7",
        "-5",
        "2.5",
        "1e3",
        "9223372036854775807",
        "9223372036854775808",
        "18446744073709551615",
        "\"3\"",
        "null",
        "true",
        "[1,{\"text_tokens\":2}]",
        "{}",
        "{\"text_tokens\":4}",
        "{\"text_tokens\":4,\"image_tokens\":6}",
        "{\"image_tokens\":null}",
        "{\"cached_tokens\":5}",
        "{\"text_tokens\":2,\"cached_tokens\":5}",
        "{\"cached_tokens\":5,\"cached_tokens_details\":{\"text_tokens\":1,\"image_tokens\":3}}",
        "{\"cached_tokens_details\":[1]}",
        "{\"text_tokens\":1,\"text_tokens\":9}",
        "{\"te\\u0078t_tokens\":8}",
        "{\"nested\":{\"deep\":[{\"x\":{}}]},\"image_tokens\":3}",
    ];

    const FIELDS: &[&str] = &[
        "input_tokens",
        "output_tokens",
        "total_tokens",
        "input_tokens_details",
        "output_tokens_details",
        "unknown",
    ];

    fn check(text: &str) {
        assert_eq!(read(text.as_bytes()), by_value(text), "{text}");
    }

    #[test]
    fn reads_every_usage_as_the_value_reading_did() {
        // Each field with each value, alone and beside a full usage.
        let full = r#""input_tokens":50,"output_tokens":40,"total_tokens":90,"input_tokens_details":{"text_tokens":10,"image_tokens":40,"cached_tokens":20},"output_tokens_details":{"text_tokens":15}"#;
        let mut count = 0;
        for field in FIELDS {
            for value in VALUES {
                check(&format!("{{\"{field}\":{value}}}"));
                check(&format!("{{{full},\"{field}\":{value}}}"));
                check(&format!("{{\"{field}\":{value},{full}}}"));
                count += 3;
            }
        }
        // Pairs of fields, so that each rule meets the others.
        for (i, a) in FIELDS.iter().enumerate() {
            for b in &FIELDS[i + 1..] {
                for va in VALUES.iter().step_by(3) {
                    for vb in VALUES.iter().skip(1).step_by(2) {
                        check(&format!("{{\"{a}\":{va},\"{b}\":{vb}}}"));
                        count += 1;
                    }
                }
            }
        }
        assert!(count > 1000, "{count}");
    }

    #[test]
    fn what_is_no_usage_object_reads_as_none() {
        for text in [
            "",
            "null",
            "[1]",
            "\"usage\"",
            "12",
            "{",
            "{\"input_tokens\":}",
            "{}x",
        ] {
            check(text);
        }
        assert_eq!(read(b"[1]"), None);
        assert_eq!(read(b"{}"), Some(TokenUsage::default()));
    }
}
