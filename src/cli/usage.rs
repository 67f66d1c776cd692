//! `imagegate usage`: usage totals as a table, JSON or CSV.

use std::io::Write;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::ValueEnum;
use imagegate::store::{GroupBy, UsageTotals};
use imagegate::usage::price::format_usd_sum;

/// How usage totals are grouped: the command line's names for [`GroupBy`].
#[derive(Clone, Copy, ValueEnum)]
pub enum Group {
    Key,
    Model,
    Provider,
    Day,
}

impl From<Group> for GroupBy {
    fn from(group: Group) -> Self {
        match group {
            Group::Key => GroupBy::Key,
            Group::Model => GroupBy::Model,
            Group::Provider => GroupBy::Provider,
            Group::Day => GroupBy::Day,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Csv,
}

/// A `--since` value: an RFC 3339 time, or a duration back from now.
pub fn parse_since(text: &str) -> anyhow::Result<DateTime<Utc>> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    let ago = humantime::parse_duration(text).with_context(|| {
        format!("--since {text:?}: expected a duration like 24h or 7d, or an RFC 3339 time")
    })?;
    Ok(Utc::now() - chrono::Duration::from_std(ago)?)
}

pub fn print_usage(rows: &[UsageTotals], group_by: GroupBy, format: Format) -> anyhow::Result<()> {
    let group = match group_by {
        GroupBy::Key => "key",
        GroupBy::Model => "model",
        GroupBy::Provider => "provider",
        GroupBy::Day => "day",
    };
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => print_json(&mut out, rows, group),
        Format::Csv => print_csv(&mut out, rows, group),
        Format::Table => print_table(&mut out, rows, group),
    }
}

/// One object per group, the group's name under the grouping's own key.
fn print_json(out: &mut impl Write, rows: &[UsageTotals], group: &str) -> anyhow::Result<()> {
    let items: Vec<_> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                group: r.group, "requests": r.requests, "images": r.images,
                "input_tokens": r.input_tokens, "output_tokens": r.output_tokens,
                "total_tokens": r.total_tokens, "cost_usd": priced_cost(r),
                "unpriced_requests": r.unpriced,
            })
        })
        .collect();
    writeln!(out, "{}", serde_json::to_string_pretty(&items)?)?;
    Ok(())
}

fn print_csv(out: &mut impl Write, rows: &[UsageTotals], group: &str) -> anyhow::Result<()> {
    let mut csv = csv::Writer::from_writer(out);
    csv.write_record([
        group,
        "requests",
        "images",
        "input_tokens",
        "output_tokens",
        "total_tokens",
        "cost_usd",
        "unpriced_requests",
    ])?;
    for r in rows {
        csv.write_record([
            r.group.clone(),
            r.requests.to_string(),
            r.images.to_string(),
            r.input_tokens.to_string(),
            r.output_tokens.to_string(),
            r.total_tokens.to_string(),
            priced_cost(r).unwrap_or_default(),
            r.unpriced.to_string(),
        ])?;
    }
    csv.flush()?;
    Ok(())
}

/// The cost of a group's priced rows; none when every row is unpriced (JSON null, an
/// empty CSV field: never $0). `unpriced_requests` counts the rows left out.
fn priced_cost(r: &UsageTotals) -> Option<String> {
    (r.unpriced < r.requests).then(|| format_usd_sum(r.cost_nanousd))
}

/// A group's cost in the table: unpriced rows are never shown as $0, nor silently left
/// out of a sum ("0.04 + 3 unpriced").
fn table_cost(r: &UsageTotals) -> String {
    match r.unpriced {
        0 => format_usd_sum(r.cost_nanousd),
        n if n == r.requests => "unpriced".into(),
        n => format!("{} + {n} unpriced", format_usd_sum(r.cost_nanousd)),
    }
}

/// Aligned columns and a TOTAL line (sums saturate rather than wrap; they are i128).
fn print_table(out: &mut impl Write, rows: &[UsageTotals], group: &str) -> anyhow::Result<()> {
    writeln!(
        out,
        "{group:<24} {:>9} {:>7} {:>13} {:>13} {:>13} {:>24}",
        "requests", "images", "input_tok", "output_tok", "total_tok", "cost_usd"
    )?;
    let total = rows.iter().fold(
        UsageTotals {
            group: "TOTAL".into(),
            requests: 0,
            images: 0,
            input_tokens: 0,
            output_tokens: 0,
            total_tokens: 0,
            cost_nanousd: 0,
            unpriced: 0,
        },
        |mut total, r| {
            total.requests = total.requests.saturating_add(r.requests);
            total.images = total.images.saturating_add(r.images);
            total.input_tokens = total.input_tokens.saturating_add(r.input_tokens);
            total.output_tokens = total.output_tokens.saturating_add(r.output_tokens);
            total.total_tokens = total.total_tokens.saturating_add(r.total_tokens);
            total.cost_nanousd = total.cost_nanousd.saturating_add(r.cost_nanousd);
            total.unpriced = total.unpriced.saturating_add(r.unpriced);
            total
        },
    );
    for r in rows.iter().chain(std::iter::once(&total)) {
        writeln!(
            out,
            "{:<24} {:>9} {:>7} {:>13} {:>13} {:>13} {:>24}",
            r.group,
            r.requests,
            r.images,
            r.input_tokens,
            r.output_tokens,
            r.total_tokens,
            table_cost(r)
        )?;
    }
    if rows.is_empty() {
        eprintln!("no usage recorded for this selection");
    }
    Ok(())
}
