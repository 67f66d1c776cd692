//! A usage report as JSON or CSV: one rendering for `imagegate usage`, `GET /admin/usage`
//! and the dashboard's download, so that their figures cannot drift apart. Calls of
//! unpriced routes (a null cost) are never shown as $0: a group all of whose calls are
//! unpriced has no cost (JSON null, an empty CSV field, "unpriced" for people), and a mix
//! shows the priced calls' sum with the unpriced count beside it ([`cost_text`]). Every CSV
//! field goes through [`CsvField`], so text that a spreadsheet would run as a formula (a key
//! named `=SUM(1+1)`) is written as text.

use std::borrow::Cow;

use crate::store::{GroupBy, Outcome, UsageRow, UsageTotals};
use crate::usage::price::{format_usd, format_usd_sum};

/// Whether a group has calls and none of them has a price: then it has no cost at all.
fn all_unpriced(totals: &UsageTotals) -> bool {
    totals.unpriced > 0 && totals.unpriced >= totals.requests
}

/// The cost of a group's priced calls in billionths of a dollar; none when every call of
/// the group is unpriced.
pub fn cost_nanousd(totals: &UsageTotals) -> Option<i128> {
    (!all_unpriced(totals)).then_some(totals.cost_nanousd)
}

/// The cost of a group's priced calls in dollars (exact decimal text); none when every
/// call of the group is unpriced.
pub fn cost_usd(totals: &UsageTotals) -> Option<String> {
    cost_nanousd(totals).map(format_usd_sum)
}

/// A group's cost for people: "0.04", "unpriced" when every call is, or "0.04 + 3
/// unpriced" for a mix (the unpriced calls are neither $0 nor silently left out).
pub fn cost_text(totals: &UsageTotals) -> String {
    match cost_usd(totals) {
        None => "unpriced".to_owned(),
        Some(usd) if totals.unpriced > 0 => format!("{usd} + {} unpriced", totals.unpriced),
        Some(usd) => usd,
    }
}

/// The report's columns after the group's own (named after the grouping), in order.
pub const COLUMNS: [&str; 14] = [
    "requests",
    "billed",
    "failed",
    "unpriced",
    "images",
    "text_input_tokens",
    "image_input_tokens",
    "cached_text_input_tokens",
    "cached_image_input_tokens",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cost_usd",
    "cost_nanousd",
];

/// One group's figures as text, in [`COLUMNS`]' order. The cost is exact in both forms:
/// dollars as a decimal string, and billionths of a dollar; both empty when every call of
/// the group is unpriced.
pub fn values(totals: &UsageTotals) -> [String; 14] {
    [
        totals.requests.to_string(),
        totals.billed.to_string(),
        totals.failed.to_string(),
        totals.unpriced.to_string(),
        totals.images.to_string(),
        totals.text_input_tokens.to_string(),
        totals.image_input_tokens.to_string(),
        totals.cached_text_input_tokens.to_string(),
        totals.cached_image_input_tokens.to_string(),
        totals.input_tokens.to_string(),
        totals.output_tokens.to_string(),
        totals.total_tokens.to_string(),
        cost_usd(totals).unwrap_or_default(),
        cost_nanousd(totals).map_or_else(String::new, |n| n.to_string()),
    ]
}

/// One object per group, the group's name under the grouping's own key; counts and tokens
/// as numbers, the cost as `cost_usd` (exact decimal text) and `cost_nanousd` (a number),
/// both null when every call of the group is unpriced.
pub fn json(rows: &[UsageTotals], group_by: GroupBy) -> Vec<serde_json::Value> {
    rows.iter()
        .map(|r| {
            serde_json::json!({
                group_by.name(): r.group,
                "requests": r.requests,
                "billed": r.billed,
                "failed": r.failed,
                "client_requests": client_requests(r),
                "client_failures": client_failures(r),
                "unpriced": r.unpriced,
                "images": r.images,
                "text_input_tokens": r.text_input_tokens,
                "image_input_tokens": r.image_input_tokens,
                "cached_text_input_tokens": r.cached_text_input_tokens,
                "cached_image_input_tokens": r.cached_image_input_tokens,
                "input_tokens": r.input_tokens,
                "output_tokens": r.output_tokens,
                "total_tokens": r.total_tokens,
                "cost_usd": cost_usd(r),
                "cost_nanousd": cost_nanousd(r),
            })
        })
        .collect()
}

/// Text a spreadsheet would take for a formula (or, for tab and carriage return, for a
/// formula after it trims them) when it begins a cell.
const FORMULA_LEADERS: [char; 6] = ['=', '+', '-', '@', '\t', '\r'];

/// A text cell as a spreadsheet must read it: text, never a formula. Text that begins with
/// one of [`FORMULA_LEADERS`] gets a `'` in front, which spreadsheets take as "this is
/// text" (CSV injection); anything else is written as it is.
pub fn csv_text(text: &str) -> Cow<'_, str> {
    if text.starts_with(FORMULA_LEADERS) {
        Cow::Owned(format!("'{text}"))
    } else {
        Cow::Borrowed(text)
    }
}

/// One field of a CSV line, as every CSV writer here takes it.
///
/// Text (names of keys, models and providers, ids, times) comes from people and providers
/// and goes through [`csv_text`]. A number is one imagegate formatted itself from an
/// integer or an exact decimal (`-?[0-9]+(\.[0-9]+)?` at most), written as it is: a
/// leading `-` there is a negative number, which no spreadsheet runs as a formula, and a
/// `'` in front would turn the column into text that no longer adds up.
pub enum CsvField<'a> {
    Text(&'a str),
    Number(String),
}

impl CsvField<'_> {
    fn cell(&self) -> Cow<'_, str> {
        match self {
            CsvField::Text(text) => csv_text(text),
            CsvField::Number(number) => Cow::Borrowed(number),
        }
    }
}

/// CSV lines, each field written as [`CsvField::cell`] has it.
struct CsvOut(csv::Writer<Vec<u8>>);

impl CsvOut {
    fn new() -> Self {
        CsvOut(csv::Writer::from_writer(Vec::new()))
    }

    fn line<'a>(&mut self, fields: impl IntoIterator<Item = CsvField<'a>>) -> csv::Result<()> {
        let cells: Vec<String> = fields
            .into_iter()
            .map(|field| field.cell().into_owned())
            .collect();
        self.0.write_record(cells)
    }

    fn finish(self) -> csv::Result<Vec<u8>> {
        self.0.into_inner().map_err(|err| err.into_error().into())
    }
}

/// A header line (the grouping's name, then [`COLUMNS`]) and one line per group: the
/// group's name as text, the figures as numbers.
pub fn csv(rows: &[UsageTotals], group_by: GroupBy) -> Result<Vec<u8>, csv::Error> {
    let mut out = CsvOut::new();
    out.line(
        std::iter::once(group_by.name())
            .chain(COLUMNS)
            .map(CsvField::Text),
    )?;
    for r in rows {
        let figures = values(r).map(CsvField::Number);
        out.line(std::iter::once(CsvField::Text(&r.group)).chain(figures))?;
    }
    out.finish()
}

/// Client requests in a group: its provider calls less the retries (a request that failed
/// over wrote a row per attempt).
pub fn client_requests(totals: &UsageTotals) -> i64 {
    totals.requests.saturating_sub(totals.retries)
}

/// Requests whose client saw a failure: failed calls less those another route answered
/// after (each retry follows one failed attempt).
pub fn client_failures(totals: &UsageTotals) -> i64 {
    totals.failed.saturating_sub(totals.retries).max(0)
}

/// The totals of every group together (sums saturate rather than wrap; they are i128).
pub fn total(rows: &[UsageTotals], name: &str) -> UsageTotals {
    rows.iter().fold(
        UsageTotals {
            group: name.to_owned(),
            ..UsageTotals::default()
        },
        |mut t, r| {
            t.requests = t.requests.saturating_add(r.requests);
            t.billed = t.billed.saturating_add(r.billed);
            t.failed = t.failed.saturating_add(r.failed);
            t.unpriced = t.unpriced.saturating_add(r.unpriced);
            t.retries = t.retries.saturating_add(r.retries);
            t.images = t.images.saturating_add(r.images);
            t.text_input_tokens = t.text_input_tokens.saturating_add(r.text_input_tokens);
            t.image_input_tokens = t.image_input_tokens.saturating_add(r.image_input_tokens);
            t.cached_text_input_tokens = t
                .cached_text_input_tokens
                .saturating_add(r.cached_text_input_tokens);
            t.cached_image_input_tokens = t
                .cached_image_input_tokens
                .saturating_add(r.cached_image_input_tokens);
            t.input_tokens = t.input_tokens.saturating_add(r.input_tokens);
            t.output_tokens = t.output_tokens.saturating_add(r.output_tokens);
            t.total_tokens = t.total_tokens.saturating_add(r.total_tokens);
            t.cost_nanousd = t.cost_nanousd.saturating_add(r.cost_nanousd);
            t
        },
    )
}

/// The columns of one usage row as `GET /admin/requests` gives it (never the key, only its
/// name), in order.
pub const ROW_COLUMNS: [&str; 25] = [
    "request_id",
    "client_request_id",
    "attempt",
    "created_at",
    "key",
    "model",
    "provider",
    "upstream_model",
    "endpoint",
    "status",
    "outcome",
    "cause",
    "streamed",
    "images",
    "text_input_tokens",
    "image_input_tokens",
    "cached_text_input_tokens",
    "cached_image_input_tokens",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cost_usd",
    "cost_nanousd",
    "cost_estimated",
    "latency_ms",
];

/// One row as JSON, under [`ROW_COLUMNS`]' names; an unpriced row's cost is null. What
/// is not known is null, never 0: an interrupted call's status, tokens and latency (it was
/// cut off with the process before anything was reported).
pub fn row_json(row: &UsageRow) -> serde_json::Value {
    let known = row.outcome != Outcome::Interrupted;
    let tokens = |count: i64| known.then_some(count);
    serde_json::json!({
        "request_id": row.request_id,
        "client_request_id": row.client_request(),
        "attempt": row.attempt,
        "created_at": row.created_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "key": row.key_name,
        "model": row.model,
        "provider": row.provider,
        "upstream_model": row.upstream_model,
        "endpoint": row.endpoint,
        "status": known.then_some(row.status),
        "outcome": row.outcome.as_str(),
        "cause": row.cause,
        "streamed": row.streamed,
        "images": row.images,
        "text_input_tokens": tokens(row.text_input_tokens),
        "image_input_tokens": tokens(row.image_input_tokens),
        "cached_text_input_tokens": tokens(row.cached_text_input_tokens),
        "cached_image_input_tokens": tokens(row.cached_image_input_tokens),
        "input_tokens": tokens(row.input_tokens),
        "output_tokens": tokens(row.output_tokens),
        "total_tokens": tokens(row.total_tokens),
        "cost_usd": row.cost_nanousd.map(format_usd),
        "cost_nanousd": row.cost_nanousd,
        "cost_estimated": row.cost_estimated,
        "latency_ms": known.then_some(row.latency_ms),
    })
}

/// Rows as CSV: a header line ([`ROW_COLUMNS`]) and one line per row, with the values
/// [`row_json`] gives (text through [`csv_text`]; numbers, `cost_usd` and booleans as
/// imagegate wrote them; null as an empty field).
pub fn rows_csv(rows: &[UsageRow]) -> Result<Vec<u8>, csv::Error> {
    let mut out = CsvOut::new();
    out.line(ROW_COLUMNS.map(CsvField::Text))?;
    for row in rows {
        let json = row_json(row);
        out.line(ROW_COLUMNS.map(|column| match &json[column] {
            // A decimal imagegate formatted from the row's nano-dollars.
            serde_json::Value::String(usd) if column == "cost_usd" => CsvField::Number(usd.clone()),
            serde_json::Value::String(text) => CsvField::Text(text),
            serde_json::Value::Null => CsvField::Number(String::new()),
            other => CsvField::Number(other.to_string()),
        }))?;
    }
    out.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(requests: i64, unpriced: i64, cost_nanousd: i128) -> UsageTotals {
        UsageTotals {
            requests,
            unpriced,
            cost_nanousd,
            ..UsageTotals::default()
        }
    }

    #[test]
    fn unpriced_calls_are_never_a_zero_cost() {
        assert_eq!(cost_text(&group(2, 0, 40_000_000)), "0.04");
        assert_eq!(cost_text(&group(3, 3, 0)), "unpriced");
        assert_eq!(cost_text(&group(5, 3, 40_000_000)), "0.04 + 3 unpriced");
        // No calls at all cost nothing.
        assert_eq!(cost_text(&group(0, 0, 0)), "0.00");
        assert_eq!(cost_usd(&group(3, 3, 0)), None);
        let values = values(&group(3, 3, 0));
        assert_eq!((values[12].as_str(), values[13].as_str()), ("", ""));
    }

    #[test]
    fn text_that_would_be_a_formula_is_written_as_text() {
        for (text, cell) in [
            ("=SUM(1+1)", "'=SUM(1+1)"),
            ("+1", "'+1"),
            ("-2+3", "'-2+3"),
            ("@A1", "'@A1"),
            ("\t=1", "'\t=1"),
            ("\r=1", "'\r=1"),
            ("svc=1", "svc=1"),
            ("", ""),
        ] {
            assert_eq!(csv_text(text), cell, "{text:?}");
        }
        let totals = UsageTotals {
            group: "-1".into(),
            requests: 1,
            cost_nanousd: -5,
            ..UsageTotals::default()
        };
        let csv = String::from_utf8(csv(&[totals], GroupBy::Key).expect("csv")).expect("utf-8");
        // The name is text; the numbers imagegate formatted stay numbers, negative or not.
        assert!(
            csv.ends_with("\n'-1,1,0,0,0,0,0,0,0,0,0,0,0,-0.000000005,-5\n"),
            "{csv}"
        );
    }
}
