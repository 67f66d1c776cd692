//! Journal lines written by hand: a usage row and an intent as JSON, byte for byte what
//! `serde_json` writes for them, without its per-field cost.
//!
//! Every provider call appends an intent and a row to the journal before its answer ends.
//! Through serde each key went through the string escaper, each timestamp through
//! `fmt`, and the line's buffer grew four times: about 28,000 instructions a call, 8% of
//! all imagegate spends on a small request. Here the keys are literals, strings are copied
//! as they are unless they hold a character JSON must escape (then serde_json escapes
//! them), and numbers and timestamps are written digit by digit. The derived `Serialize`
//! stays the reference: the tests hold the two to the same bytes, so a field added to the
//! struct and not here fails them, and the reader (serde's `Deserialize`) is unchanged.

use chrono::{DateTime, Datelike, Timelike, Utc};

use super::Intent;
use crate::store::UsageRow;

/// A row's line with its newline, e.g. 826 bytes for a small generation's.
pub fn row(row: &UsageRow) -> Vec<u8> {
    let mut out = Object::new(1024);
    out.str("request_id", &row.request_id);
    out.int("key_id", row.key_id);
    out.str("key_name", &row.key_name);
    out.str("model", &row.model);
    out.str("provider", &row.provider);
    out.str("upstream_model", &row.upstream_model);
    out.str("endpoint", &row.endpoint);
    out.int("status", row.status.into());
    out.str("outcome", row.outcome.as_str());
    out.bool("streamed", row.streamed);
    out.opt_int("n", row.n.map(i64::from));
    out.opt_str("size", row.size.as_deref());
    out.opt_str("quality", row.quality.as_deref());
    out.int("images", row.images.into());
    out.int("text_input_tokens", row.text_input_tokens);
    out.int("image_input_tokens", row.image_input_tokens);
    out.int("cached_text_input_tokens", row.cached_text_input_tokens);
    out.int("cached_image_input_tokens", row.cached_image_input_tokens);
    out.int("input_tokens", row.input_tokens);
    out.int("output_tokens", row.output_tokens);
    out.int("total_tokens", row.total_tokens);
    out.opt_int("cost_nanousd", row.cost_nanousd);
    out.int("latency_ms", row.latency_ms);
    out.time("created_at", &row.created_at);
    out.opt_str("raw_usage", row.raw_usage.as_deref());
    out.bool("usage_suspect", row.usage_suspect);
    out.bool("cost_estimated", row.cost_estimated);
    out.int("attempt", row.attempt.into());
    out.opt_str("client_request_id", row.client_request_id.as_deref());
    out.opt_str("cause", row.cause.as_deref());
    out.line()
}

/// An intent's line, `{"intent":{...}}`, with its newline.
pub fn intent(intent: &Intent) -> Vec<u8> {
    let mut out = Object::new(512);
    out.key("intent");
    out.buf.push(b'{');
    out.first = true;
    out.str("request_id", &intent.request_id);
    out.int("key_id", intent.key_id);
    out.str("key_name", &intent.key_name);
    out.str("model", &intent.model);
    out.str("provider", &intent.provider);
    out.str("upstream_model", &intent.upstream_model);
    out.str("endpoint", &intent.endpoint);
    out.bool("streamed", intent.streamed);
    out.opt_int("n", intent.n.map(i64::from));
    out.opt_str("size", intent.size.as_deref());
    out.opt_str("quality", intent.quality.as_deref());
    out.opt_int("worst_case_nanousd", intent.worst_case_nanousd);
    out.time("created_at", &intent.created_at);
    out.int("attempt", intent.attempt.into());
    out.opt_str("client_request_id", intent.client_request_id.as_deref());
    out.buf.push(b'}');
    out.line()
}

/// A JSON object being written, one field after the other.
struct Object {
    buf: Vec<u8>,
    first: bool,
}

impl Object {
    fn new(capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity);
        buf.push(b'{');
        Object { buf, first: true }
    }

    /// `"key":`, after a comma unless it is the object's first. Keys are this module's
    /// literals, none of which needs escaping.
    fn key(&mut self, key: &'static str) {
        debug_assert!(!needs_escape(key), "{key}");
        if !self.first {
            self.buf.push(b',');
        }
        self.first = false;
        self.buf.push(b'"');
        self.buf.extend_from_slice(key.as_bytes());
        self.buf.extend_from_slice(b"\":");
    }

    fn str(&mut self, key: &'static str, value: &str) {
        self.key(key);
        self.string(value);
    }

    fn opt_str(&mut self, key: &'static str, value: Option<&str>) {
        self.key(key);
        match value {
            Some(value) => self.string(value),
            None => self.buf.extend_from_slice(b"null"),
        }
    }

    fn int(&mut self, key: &'static str, value: i64) {
        self.key(key);
        self.buf
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }

    fn opt_int(&mut self, key: &'static str, value: Option<i64>) {
        match value {
            Some(value) => self.int(key, value),
            None => {
                self.key(key);
                self.buf.extend_from_slice(b"null");
            }
        }
    }

    fn bool(&mut self, key: &'static str, value: bool) {
        self.key(key);
        let text: &[u8] = if value { b"true" } else { b"false" };
        self.buf.extend_from_slice(text);
    }

    /// As chrono serializes a `DateTime<Utc>`: RFC 3339 with `Z`, and the fraction of the
    /// second in 0, 3, 6 or 9 digits, the fewest that hold it exactly.
    fn time(&mut self, key: &'static str, at: &DateTime<Utc>) {
        self.key(key);
        let year = at.year();
        if !(0..=9999).contains(&year) {
            // chrono writes a sign and more digits out there; no call is dated so.
            self.buf.extend_from_slice(
                serde_json::to_string(at)
                    .expect("a timestamp serializes")
                    .as_bytes(),
            );
            return;
        }
        self.buf.push(b'"');
        digits(&mut self.buf, year as u32, 4);
        self.buf.push(b'-');
        digits(&mut self.buf, at.month(), 2);
        self.buf.push(b'-');
        digits(&mut self.buf, at.day(), 2);
        self.buf.push(b'T');
        digits(&mut self.buf, at.hour(), 2);
        self.buf.push(b':');
        digits(&mut self.buf, at.minute(), 2);
        self.buf.push(b':');
        // A leap second is kept in the nanoseconds (1,000,000,000 and up), as chrono's
        // own formatting does: seconds show 60.
        let nanos = at.nanosecond();
        let (second, nanos) = if nanos >= 1_000_000_000 {
            (at.second() + 1, nanos - 1_000_000_000)
        } else {
            (at.second(), nanos)
        };
        digits(&mut self.buf, second, 2);
        if nanos != 0 {
            self.buf.push(b'.');
            if nanos % 1_000_000 == 0 {
                digits(&mut self.buf, nanos / 1_000_000, 3);
            } else if nanos % 1_000 == 0 {
                digits(&mut self.buf, nanos / 1_000, 6);
            } else {
                digits(&mut self.buf, nanos, 9);
            }
        }
        self.buf.extend_from_slice(b"Z\"");
    }

    /// A JSON string: the text as it is when nothing in it needs escaping (the usual
    /// case: ids, names, sizes), else escaped by serde_json, as serde would have.
    fn string(&mut self, value: &str) {
        if needs_escape(value) {
            serde_json::to_writer(&mut self.buf, value).expect("writing to a Vec cannot fail");
        } else {
            self.buf.push(b'"');
            self.buf.extend_from_slice(value.as_bytes());
            self.buf.push(b'"');
        }
    }

    fn line(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(b"}\n");
        self.buf
    }
}

/// What JSON requires escaped in a string, and all serde_json escapes: `"`, `\` and the
/// control characters below U+0020.
fn needs_escape(text: &str) -> bool {
    text.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\')
}

/// `value` in exactly `width` decimal digits (zeros in front); `value` has no more.
fn digits(buf: &mut Vec<u8>, value: u32, width: u32) {
    let mut div = 10u32.pow(width - 1);
    while div > 0 {
        buf.push(b'0' + (value / div % 10) as u8);
        div /= 10;
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;
    use crate::store::Outcome;

    fn base_row() -> UsageRow {
        UsageRow {
            request_id: "req_0f79f7ef9ab10b2c000000000000".into(),
            key_id: 1,
            key_name: "team-a".into(),
            model: "gpt-image-1".into(),
            provider: "piapi".into(),
            upstream_model: "gpt-image-1".into(),
            endpoint: "generations".into(),
            status: 200,
            outcome: Outcome::Completed,
            streamed: false,
            n: None,
            size: Some("1024x1024".into()),
            quality: Some("low".into()),
            images: 1,
            text_input_tokens: 19,
            image_input_tokens: 1105,
            cached_text_input_tokens: 0,
            cached_image_input_tokens: 0,
            input_tokens: 1124,
            output_tokens: 765,
            total_tokens: 1889,
            cost_nanousd: Some(41_745_000),
            latency_ms: 172,
            created_at: Utc.with_ymd_and_hms(2026, 12, 8, 1, 9, 6).unwrap(),
            raw_usage: Some(r#"{"total_tokens": 1889, "input_tokens": 1124}"#.into()),
            usage_suspect: false,
            cost_estimated: false,
            attempt: 1,
            client_request_id: Some("req_0f79f7ef9ab10b2c000000000000".into()),
            cause: None,
        }
    }

    fn base_intent() -> Intent {
        Intent {
            request_id: "req_1".into(),
            key_id: 7,
            key_name: "team-a".into(),
            model: "gpt-image-1".into(),
            provider: "apiyi".into(),
            upstream_model: "gpt-image-1".into(),
            endpoint: "edits".into(),
            streamed: true,
            n: Some(2),
            size: None,
            quality: None,
            worst_case_nanousd: Some(249_645_000),
            created_at: Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap(),
            attempt: 2,
            client_request_id: None,
        }
    }

    /// Texts that take each way through `string`: plain, non-ASCII (copied as is), and
    /// every character serde_json escapes.
    const TEXTS: &[&str] = &[
        "",
        "plain",
        "naïve-日本-🙂",
        "quote\"d",
        "back\\slash",
        "line\nbreak\ttab\r\u{1}\u{1f}",
        "\u{7f} is not escaped",
    ];

    /// Fractions that give 0, 3, 6 and 9 digits, and a leap second.
    fn times() -> Vec<DateTime<Utc>> {
        let at = Utc.with_ymd_and_hms(2026, 12, 31, 23, 59, 59).unwrap();
        let mut times: Vec<_> = [0, 5_000_000, 120_000, 84_715_588, 1]
            .into_iter()
            .map(|nanos| at + chrono::Duration::nanoseconds(nanos))
            .collect();
        times.push(Utc.with_ymd_and_hms(1, 1, 1, 0, 0, 0).unwrap());
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .unwrap()
            .and_hms_nano_opt(23, 59, 59, 1_500_000_000)
            .unwrap()
            .and_utc();
        times.push(leap);
        times
    }

    fn same_as_serde<T: serde::Serialize>(value: &T, ours: Vec<u8>) {
        let mut theirs = serde_json::to_vec(value).unwrap();
        theirs.push(b'\n');
        assert_eq!(
            String::from_utf8(ours).unwrap(),
            String::from_utf8(theirs).unwrap()
        );
    }

    #[test]
    fn rows_are_written_as_serde_writes_them() {
        let mut rows = vec![base_row()];
        for text in TEXTS {
            let mut r = base_row();
            r.request_id = format!("req_{text}");
            r.key_name = text.to_string();
            r.raw_usage = Some(text.to_string());
            r.cause = Some(text.to_string());
            rows.push(r);
        }
        for at in times() {
            let mut r = base_row();
            r.created_at = at;
            rows.push(r);
        }
        let mut nulls = base_row();
        nulls.n = Some(-3);
        nulls.size = None;
        nulls.quality = None;
        nulls.cost_nanousd = None;
        nulls.raw_usage = None;
        nulls.client_request_id = None;
        nulls.usage_suspect = true;
        nulls.cost_estimated = true;
        nulls.streamed = true;
        nulls.outcome = Outcome::UpstreamError;
        nulls.status = 502;
        nulls.key_id = i64::MIN;
        nulls.total_tokens = i64::MAX;
        rows.push(nulls);
        for outcome in [Outcome::Failed, Outcome::Interrupted] {
            let mut r = base_row();
            r.outcome = outcome;
            rows.push(r);
        }
        for r in &rows {
            same_as_serde(r, row(r));
        }
    }

    #[test]
    fn intents_are_written_as_serde_writes_them() {
        #[derive(serde::Serialize)]
        struct Wrapped<'a> {
            intent: &'a Intent,
        }
        let mut intents = vec![base_intent()];
        for text in TEXTS {
            let mut i = base_intent();
            i.model = text.to_string();
            i.size = Some(text.to_string());
            i.client_request_id = Some(text.to_string());
            intents.push(i);
        }
        for at in times() {
            let mut i = base_intent();
            i.created_at = at;
            i.worst_case_nanousd = None;
            i.n = None;
            i.streamed = false;
            intents.push(i);
        }
        for i in &intents {
            same_as_serde(&Wrapped { intent: i }, intent(i));
        }
    }

    #[test]
    fn lines_read_back_as_what_was_written() {
        let r = base_row();
        let back: UsageRow = serde_json::from_slice(&row(&r)).unwrap();
        assert_eq!(back, r);
    }
}
