//! `imagegate usage`: usage totals as a table, JSON or CSV.

use std::io::Write;

use anyhow::Context;
use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use clap::ValueEnum;
use imagegate::store::{GroupBy, UsageTotals};
use imagegate::usage::report;

/// How usage totals are grouped: the command line's names for [`GroupBy`].
#[derive(Clone, Copy, ValueEnum)]
pub enum Group {
    Key,
    Model,
    Provider,
    Day,
    Hour,
}

impl From<Group> for GroupBy {
    fn from(group: Group) -> Self {
        match group {
            Group::Key => GroupBy::Key,
            Group::Model => GroupBy::Model,
            Group::Provider => GroupBy::Provider,
            Group::Day => GroupBy::Day,
            Group::Hour => GroupBy::Hour,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Csv,
}

/// A `--since` or `--until` value: an RFC 3339 time, a date (a UTC day: `--since` from its
/// first instant, `--until` up to the next day's, so that the day is included, as
/// `GET /admin/usage` reads them), or a duration back from now.
pub fn parse_time(flag: &str, text: &str) -> anyhow::Result<DateTime<Utc>> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    if let Ok(day) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        let day = if flag == "--until" {
            day.succ_opt().unwrap_or(day)
        } else {
            day
        };
        return Ok(day.and_time(NaiveTime::MIN).and_utc());
    }
    let ago = humantime::parse_duration(text).with_context(|| {
        format!(
            "{flag} {text:?}: expected a duration like 24h or 7d, a date like 2026-12-07, \
             or an RFC 3339 time"
        )
    })?;
    Ok(Utc::now() - chrono::Duration::from_std(ago)?)
}

/// The same JSON and CSV as `GET /admin/usage` ([`report`]), or a table for people.
pub fn print_usage(rows: &[UsageTotals], group_by: GroupBy, format: Format) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => {
            let items = report::json(rows, group_by);
            writeln!(out, "{}", serde_json::to_string_pretty(&items)?)?;
        }
        Format::Csv => out.write_all(&report::csv(rows, group_by)?)?,
        Format::Table => print_table(&mut out, rows, group_by.name())?,
    }
    Ok(())
}

/// Aligned columns and a TOTAL line; a cost is shown as [`report::cost_text`] has it.
fn print_table(out: &mut impl Write, rows: &[UsageTotals], group: &str) -> anyhow::Result<()> {
    writeln!(
        out,
        "{group:<24} {:>9} {:>7} {:>7} {:>13} {:>13} {:>13} {:>24}",
        "requests", "failed", "images", "input_tok", "output_tok", "total_tok", "cost_usd"
    )?;
    let total = report::total(rows, "TOTAL");
    for r in rows.iter().chain(std::iter::once(&total)) {
        writeln!(
            out,
            "{:<24} {:>9} {:>7} {:>7} {:>13} {:>13} {:>13} {:>24}",
            r.group,
            r.requests,
            r.failed,
            r.images,
            r.input_tokens,
            r.output_tokens,
            r.total_tokens,
            report::cost_text(r)
        )?;
    }
    if total.unpriced > 0 {
        writeln!(
            out,
            "{} calls have no price: their cost is not in cost_usd",
            total.unpriced
        )?;
    }
    if rows.is_empty() {
        eprintln!("no usage recorded for this selection");
    }
    Ok(())
}
