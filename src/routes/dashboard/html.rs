//! The dashboard's HTML, written on the server: no template engine, no build step. Every
//! text that comes from data or from the request (key names, model names, filter values)
//! goes through [`esc`].

use std::collections::BTreeSet;
use std::fmt::Write;

use chrono::{Duration, NaiveDate};

use crate::replicas::Roster;
use crate::store::{UsageRow, UsageTotals};
use crate::usage::price::format_cost;
use crate::usage::report;

/// A group's spend in dollars: "$0.04", "$0.04 + 3 unpriced", or "unpriced" when none of
/// its calls has a price (never "$0").
fn spend(totals: &UsageTotals) -> String {
    let text = report::cost_text(totals);
    match report::cost_usd(totals) {
        Some(_) => format!("${text}"),
        None => text,
    }
}

/// What a table sorts a cost by: the priced sum, and unpriced below every price.
fn cost_sort(nanos: Option<impl ToString>) -> String {
    nanos.map_or_else(|| "-Infinity".to_owned(), |n| n.to_string())
}

/// Text made safe for HTML, in element content and in double-quoted attributes alike.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A query string's pairs, percent-encoded.
pub fn query(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (name, value) in pairs.iter().filter(|(_, v)| !v.is_empty()) {
        out.push(if out.is_empty() { '?' } else { '&' });
        out.push_str(name);
        out.push('=');
        for b in value.bytes() {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                out.push(char::from(b));
            } else {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

/// A whole page around `body`: the stylesheet and the script are the dashboard's own
/// files, the only things the page loads.
pub fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><link rel=\"icon\" href=\"data:,\">\
         <link rel=\"stylesheet\" href=\"/dashboard/assets/dashboard.css\">\
         <script src=\"/dashboard/assets/dashboard.js\" defer></script></head>\
         <body>{body}</body></html>\n",
        esc(title)
    )
}

/// The login form; `error` is shown above it.
pub fn login(error: Option<&str>) -> String {
    let error = error.map_or(String::new(), |e| {
        format!("<p class=\"error\" role=\"alert\">{}</p>", esc(e))
    });
    page(
        "imagegate · sign in",
        &format!(
            "<main class=\"login\"><form method=\"post\" action=\"/dashboard/login\" \
             class=\"login-card\"><h1>imagegate <span>usage</span></h1>{error}\
             <label for=\"token\">Admin token</label>\
             <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" \
             required autofocus><button type=\"submit\">Sign in</button>\
             <p class=\"hint\">The token in the server's admin token variable \
             (IMAGEGATE_ADMIN_TOKEN by default).</p></form></main>"
        ),
    )
}

/// What the filter form shows and every link repeats: the values as the user gave them
/// (the period as dates).
pub struct Shown {
    pub key: String,
    pub model: String,
    pub since: String,
    pub until: String,
}

impl Shown {
    /// The filter as a query string, plus `extra`.
    pub fn query(&self, extra: &[(&str, &str)]) -> String {
        let mut pairs = vec![
            ("key", self.key.as_str()),
            ("model", self.model.as_str()),
            ("since", self.since.as_str()),
            ("until", self.until.as_str()),
        ];
        pairs.extend_from_slice(extra);
        query(&pairs)
    }
}

/// The header with the log-out button, and the filter form.
pub fn top(shown: &Shown, keys: &[String], models: &[String]) -> String {
    let options = |list: &[String]| {
        list.iter()
            .map(|v| format!("<option value=\"{}\">", esc(v)))
            .collect::<String>()
    };
    format!(
        "<header class=\"top\"><div class=\"brand\">imagegate <span>usage</span></div>\
         <form method=\"post\" action=\"/dashboard/logout\"><button class=\"ghost\" \
         type=\"submit\">Log out</button></form></header>\
         <form class=\"filters\" method=\"get\" action=\"/dashboard\">\
         <label>Key<input name=\"key\" list=\"keys\" value=\"{}\" placeholder=\"all keys\"></label>\
         <label>Model<input name=\"model\" list=\"models\" value=\"{}\" placeholder=\"all models\"></label>\
         <label>From<input type=\"date\" name=\"since\" value=\"{}\"></label>\
         <label>To<input type=\"date\" name=\"until\" value=\"{}\"></label>\
         <button type=\"submit\">Apply</button><a class=\"reset\" href=\"/dashboard\">Reset</a>\
         <datalist id=\"keys\">{}</datalist><datalist id=\"models\">{}</datalist></form>",
        esc(&shown.key),
        esc(&shown.model),
        esc(&shown.since),
        esc(&shown.until),
        options(keys),
        options(models),
    )
}

/// The period's totals, one card each.
pub fn cards(total: &UsageTotals) -> String {
    let mut out = String::from("<section class=\"cards\">");
    let mut card = |id: &str, label: &str, value: String, note: &str| {
        let _ = write!(
            out,
            "<div class=\"card\"><div class=\"label\">{label}</div>\
             <div class=\"value\" id=\"{id}\">{value}</div><div class=\"note\">{note}</div></div>"
        );
    };
    card("total-cost", "Spend", spend(total), "USD");
    card(
        "total-requests",
        "Requests",
        total.requests.to_string(),
        "provider calls",
    );
    card(
        "total-images",
        "Images",
        total.images.to_string(),
        "generated",
    );
    card(
        "total-failed",
        "Failed",
        total.failed.to_string(),
        "no image delivered",
    );
    let unpriced = if total.unpriced > 0 {
        "not in the spend"
    } else {
        "every call priced"
    };
    card(
        "total-unpriced",
        "Unpriced",
        total.unpriced.to_string(),
        unpriced,
    );
    out.push_str("</section>");
    out
}

/// A panel: a heading, a CSV link when there is one, and its content.
pub fn panel(id: &str, title: &str, csv: Option<&str>, content: &str) -> String {
    let link = csv.map_or(String::new(), |href| {
        format!(
            "<a class=\"csv\" href=\"{}\" download>Download CSV</a>",
            esc(href)
        )
    });
    format!(
        "<section class=\"panel\" id=\"{id}\"><div class=\"panel-head\"><h2>{}</h2>{link}</div>\
         {content}</section>",
        esc(title)
    )
}

/// Days from `first` to `last` with their totals (none on days without usage), or only
/// the days with usage when the period is too long for one bar a day.
pub fn day_series(
    by_day: &[UsageTotals],
    first: Option<NaiveDate>,
    last: NaiveDate,
) -> Vec<UsageTotals> {
    let Some(first) = first.filter(|f| *f <= last && (last - *f).num_days() < 92) else {
        return by_day.to_vec();
    };
    let mut out = Vec::new();
    let mut day = first;
    while day <= last {
        let group = day.format("%Y-%m-%d").to_string();
        let found = by_day.iter().find(|d| d.group == group);
        out.push(found.cloned().unwrap_or(UsageTotals {
            group,
            ..UsageTotals::default()
        }));
        day += Duration::days(1);
    }
    out
}

/// Spend per day as bars, drawn on the server. Each bar carries its day, its exact priced
/// spend (`data-day`, `data-cost-usd`: empty when every call of the day is unpriced) and
/// its unpriced calls (`data-unpriced`), and a tooltip. Unpriced calls add no height.
pub fn chart(days: &[UsageTotals]) -> String {
    if days.is_empty() {
        return "<p class=\"empty\">No usage in this period.</p>".to_owned();
    }
    let (width, height, left, bottom, top) = (1160.0_f64, 240.0_f64, 64.0, 28.0, 12.0);
    let highest = days.iter().map(|d| d.cost_nanousd).max().unwrap_or(0);
    let max = nice_ceiling(highest.max(1) as f64 / 1e9) * 1e9;
    let plot_h = height - bottom - top;
    let step = (width - left) / days.len() as f64;
    let mut svg = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {width} {height}\" role=\"img\" \
         aria-label=\"Spend by day\" preserveAspectRatio=\"none\">"
    );
    for i in 0..=4 {
        let value = max * f64::from(i) / 4.0;
        let y = top + plot_h - plot_h * f64::from(i) / 4.0;
        let _ = write!(
            svg,
            "<line class=\"grid\" x1=\"{left}\" x2=\"{width}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/>\
             <text class=\"axis\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">${}</text>",
            left - 8.0,
            y + 4.0,
            axis_usd(value / 1e9)
        );
    }
    let label_every = (days.len() / 12).max(1);
    for (i, d) in days.iter().enumerate() {
        let (day, cost) = (esc(&d.group), d.cost_nanousd);
        let h = (cost as f64 / max * plot_h).max(if cost > 0 { 1.0 } else { 0.0 });
        let x = left + step * i as f64 + step * 0.15;
        let _ = write!(
            svg,
            "<g class=\"bar\" data-day=\"{day}\" data-cost-usd=\"{}\" data-unpriced=\"{}\">\
             <title>{day}: {} ({} requests)</title><rect x=\"{x:.1}\" y=\"{:.1}\" \
             width=\"{:.1}\" height=\"{h:.1}\" rx=\"2\"/></g>",
            report::cost_usd(d).unwrap_or_default(),
            d.unpriced,
            spend(d),
            d.requests,
            top + plot_h - h,
            step * 0.7
        );
        if i % label_every == 0 {
            let _ = write!(
                svg,
                "<text class=\"axis\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                x + step * 0.35,
                height - 8.0,
                esc(d.group.get(5..).unwrap_or(&d.group))
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

/// The round figure (1, 2, 2.5 or 5 times a power of ten) at or above `usd`: the top of
/// the chart's axis, so that its four steps read as round figures too.
fn nice_ceiling(usd: f64) -> f64 {
    let power = 10_f64.powf(usd.log10().floor());
    let factor = usd / power;
    let nice = [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .find(|n| factor <= *n + 1e-9)
        .unwrap_or(10.0);
    nice * power
}

/// An axis label: the figure without trailing zeros (the exact figures are in the tables
/// and the bars' tooltips).
fn axis_usd(usd: f64) -> String {
    let text = format!("{usd:.9}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text.is_empty() || text == "-" {
        "0".to_owned()
    } else {
        text.to_owned()
    }
}

/// Totals per group (a key or a model) as a table sortable by any column.
pub fn totals_table(id: &str, heading: &str, rows: &[UsageTotals]) -> String {
    if rows.is_empty() {
        return "<p class=\"empty\">No usage in this period.</p>".to_owned();
    }
    let mut out = format!(
        "<table class=\"sortable\" id=\"{id}\"><thead><tr><th>{}</th><th class=\"num\">Requests</th>\
         <th class=\"num\">Failed</th><th class=\"num\">Images</th><th class=\"num\">Tokens</th>\
         <th class=\"num\">Spend (USD)</th></tr></thead><tbody>",
        esc(heading)
    );
    for r in rows {
        let _ = write!(
            out,
            "<tr data-group=\"{}\"><td>{}</td><td class=\"num\" data-sort=\"{}\">{}</td>\
             <td class=\"num\" data-sort=\"{}\">{}</td><td class=\"num\" data-sort=\"{}\">{}</td>\
             <td class=\"num\" data-sort=\"{}\">{}</td>\
             <td class=\"num cost\" data-sort=\"{}\">{}</td></tr>",
            esc(&r.group),
            esc(&r.group),
            r.requests,
            r.requests,
            r.failed,
            r.failed,
            r.images,
            r.images,
            r.total_tokens,
            r.total_tokens,
            cost_sort(report::cost_nanousd(r)),
            report::cost_text(r),
        );
    }
    out.push_str("</tbody></table>");
    out
}

/// The replicas writing their heartbeat to this database, live ones first, with the
/// roster's warnings (settings or versions that differ between live replicas) above the
/// table as alerts.
pub fn replicas(roster: &Roster) -> String {
    let mut out = String::new();
    for warning in &roster.warnings {
        let _ = write!(
            out,
            "<p class=\"warning\" role=\"alert\">{}</p>",
            esc(warning)
        );
    }
    out.push_str(
        "<table class=\"sortable\" id=\"replicas\"><thead><tr><th>Replica</th><th>Status</th>\
         <th>Version</th><th>Config hash</th><th>Started (UTC)</th><th>Last seen (UTC)</th>\
         <th class=\"num\">Calls in flight</th></tr></thead><tbody>",
    );
    let live = roster.replicas.iter().filter(|r| r.status == "live");
    let hashes: BTreeSet<&str> = live.clone().map(|r| r.config_hash.as_str()).collect();
    let versions: BTreeSet<&str> = live.map(|r| r.version.as_str()).collect();
    for r in &roster.replicas {
        // A value shared by every live replica is plain; one that differs is marked.
        let mark = |differs: bool| {
            if differs && r.status == "live" {
                " differs"
            } else {
                ""
            }
        };
        let this = if r.this {
            " <span class=\"this\">this one</span>"
        } else {
            ""
        };
        let _ = write!(
            out,
            "<tr data-replica=\"{}\"><td>{}{this}</td><td><span class=\"status {}\">{}</span></td>\
             <td class=\"{}\">{}</td><td class=\"hash{}\"><code>{}</code></td>\
             <td data-sort=\"{}\">{}</td><td data-sort=\"{}\">{}</td>\
             <td class=\"num\" data-sort=\"{}\">{}</td></tr>",
            esc(&r.id),
            esc(&r.id),
            if r.status == "live" { "ok" } else { "bad" },
            r.status,
            mark(versions.len() > 1).trim_start(),
            esc(&r.version),
            mark(hashes.len() > 1),
            esc(&r.config_hash),
            r.started_at.timestamp_micros(),
            r.started_at.format("%Y-%m-%d %H:%M:%S"),
            r.last_seen.timestamp_micros(),
            r.last_seen.format("%Y-%m-%d %H:%M:%S"),
            r.calls_in_flight,
            r.calls_in_flight,
        );
    }
    out.push_str("</tbody></table>");
    out
}

/// The latest rows: time, key, model, provider, status, tokens, cost and latency.
pub fn requests_table(rows: &[UsageRow]) -> String {
    if rows.is_empty() {
        return "<p class=\"empty\">No requests in this period.</p>".to_owned();
    }
    let mut out = String::from(
        "<table class=\"sortable\" id=\"requests\"><thead><tr><th>Time (UTC)</th><th>Key</th>\
         <th>Model</th><th>Provider</th><th>Status</th><th class=\"num\">Input tokens</th>\
         <th class=\"num\">Output tokens</th><th class=\"num\">Cost (USD)</th>\
         <th class=\"num\">Latency</th></tr></thead><tbody>",
    );
    for r in rows {
        let ok = if (200..300).contains(&r.status) {
            "ok"
        } else {
            "bad"
        };
        // An unpriced row has no cost, estimated or not.
        let estimated = if r.cost_estimated && r.cost_nanousd.is_some() {
            " <abbr title=\"worst-case estimate\">est.</abbr>"
        } else {
            ""
        };
        let _ = write!(
            out,
            "<tr data-request-id=\"{}\"><td data-sort=\"{}\">{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td data-sort=\"{}\"><span class=\"status {ok}\">{}</span> <span class=\"outcome\">{}</span></td>\
             <td class=\"num\" data-sort=\"{}\">{}</td><td class=\"num\" data-sort=\"{}\">{}</td>\
             <td class=\"num cost\" data-sort=\"{}\">{}{estimated}</td>\
             <td class=\"num\" data-sort=\"{}\">{} ms</td></tr>",
            esc(&r.request_id),
            r.created_at.timestamp_micros(),
            r.created_at.format("%Y-%m-%d %H:%M:%S"),
            esc(&r.key_name),
            esc(&r.model),
            esc(&r.provider),
            r.status,
            r.status,
            r.outcome.as_str().replace('_', " "),
            r.input_tokens,
            r.input_tokens,
            r.output_tokens,
            r.output_tokens,
            cost_sort(r.cost_nanousd),
            format_cost(r.cost_nanousd),
            r.latency_ms,
            r.latency_ms,
        );
    }
    out.push_str("</tbody></table>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc(r#"<script>alert("x")</script> & 'y'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
    }

    #[test]
    fn the_axis_ends_on_a_round_figure() {
        assert_eq!(nice_ceiling(1.31), 2.0);
        assert_eq!(nice_ceiling(0.000_000_007), 0.000_000_01);
        assert_eq!(nice_ceiling(2.2), 2.5);
        assert_eq!(nice_ceiling(40.0), 50.0);
        assert_eq!(axis_usd(0.5), "0.5");
        assert_eq!(axis_usd(0.0), "0");
        assert_eq!(axis_usd(0.1 * 3.0), "0.3");
    }

    #[test]
    fn query_strings_are_percent_encoded_and_skip_empty_values() {
        assert_eq!(
            query(&[("key", "a b&c=d"), ("model", ""), ("since", "2025-03-01")]),
            "?key=a%20b%26c%3Dd&since=2025-03-01"
        );
    }
}
