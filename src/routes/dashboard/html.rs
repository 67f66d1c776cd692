//! The dashboard's HTML, written on the server: no template engine, no build step. Every
//! text that comes from data or from the request (key names, model names, filter values)
//! goes through [`esc`].

use std::collections::BTreeSet;
use std::fmt::Write;

use chrono::{Duration, NaiveDate};

use crate::replicas::Roster;
use crate::store::{UsageRow, UsageTotals};
use crate::usage::price::{format_usd, format_usd_sum};
use crate::usage::report;

/// Dollars and cents for people: "$0.57", "$1,234.50"; a cost above zero that rounds to
/// nothing reads "<$0.01" (never "$0.00" for something that cost money).
pub fn money(nanos: i128) -> String {
    let sign = if nanos < 0 { "-" } else { "" };
    let abs = nanos.unsigned_abs();
    let cents = (abs + 5_000_000) / 10_000_000;
    if cents == 0 && abs > 0 {
        return format!("{sign}<$0.01");
    }
    let dollars = (cents / 100).to_string();
    let mut grouped = String::new();
    for (i, c) in dollars.chars().enumerate() {
        if i > 0 && (dollars.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    format!("{sign}${grouped}.{:02}", cents % 100)
}

/// Money in a cell or card: dollars and cents, the exact figure in its tooltip.
fn money_html(nanos: i128) -> String {
    format!(
        "<span title=\"${} exactly\">{}</span>",
        format_usd_sum(nanos),
        money(nanos)
    )
}

/// A group's spend: "$0.04", "$0.04 + 3 unpriced", or "unpriced" when none of its calls
/// has a price (never "$0"); the exact figure in a tooltip.
fn spend(totals: &UsageTotals) -> String {
    match report::cost_nanousd(totals) {
        None => "unpriced".to_owned(),
        Some(nanos) if totals.unpriced > 0 => {
            format!("{} + {} unpriced", money_html(nanos), totals.unpriced)
        }
        Some(nanos) => money_html(nanos),
    }
}

/// What is not known (an interrupted call's status, tokens, latency).
const UNKNOWN: &str = "\u{2014}";

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
    /// The latest requests' page (none: the newest).
    pub cursor: String,
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

/// The header with the log-out button, and the filter form: a key picker (every key, the
/// revoked ones marked), a model, and the period as ISO dates (text, not the browser's
/// date control, which shows dates in the browser's locale).
pub fn top(shown: &Shown, keys: &[(String, &'static str)], models: &[String]) -> String {
    let mut key_options = format!(
        "<option value=\"\"{}>all keys</option>",
        if shown.key.is_empty() {
            " selected"
        } else {
            ""
        }
    );
    let mut listed = false;
    for (name, status) in keys {
        let selected = if *name == shown.key {
            listed = true;
            " selected"
        } else {
            ""
        };
        let mark = if matches!(*status, "active" | "") {
            String::new()
        } else {
            format!(" ({status})")
        };
        let _ = write!(
            key_options,
            "<option value=\"{}\"{selected}>{}{mark}</option>",
            esc(name),
            esc(name)
        );
    }
    if !listed && !shown.key.is_empty() {
        let _ = write!(
            key_options,
            "<option value=\"{}\" selected>{}</option>",
            esc(&shown.key),
            esc(&shown.key)
        );
    }
    let models = models
        .iter()
        .map(|v| format!("<option value=\"{}\">", esc(v)))
        .collect::<String>();
    let date = |name: &str, value: &str| {
        format!(
            "<input name=\"{name}\" value=\"{}\" placeholder=\"YYYY-MM-DD\" \
             pattern=\"\\d{{4}}-\\d{{2}}-\\d{{2}}\" inputmode=\"numeric\" size=\"10\" class=\"date\">",
            esc(value)
        )
    };
    format!(
        "<header class=\"top\"><div class=\"brand\">imagegate <span>usage</span></div>\
         <form method=\"post\" action=\"/dashboard/logout\"><button class=\"ghost\" \
         type=\"submit\">Log out</button></form></header>\
         <form class=\"filters\" method=\"get\" action=\"/dashboard\">\
         <label>Key<select name=\"key\" id=\"key-picker\">{key_options}</select></label>\
         <label>Model<input name=\"model\" list=\"models\" value=\"{}\" placeholder=\"all models\"></label>\
         <label>From (UTC){}</label><label>To (UTC){}</label>\
         <button type=\"submit\">Apply</button><a class=\"reset\" href=\"/dashboard\">Reset</a>\
         <datalist id=\"models\">{models}</datalist></form>",
        esc(&shown.model),
        date("since", &shown.since),
        date("until", &shown.until),
    )
}

/// The period's totals, one card each: client requests (a failover's attempts count
/// once), the requests whose client saw a failure, the requests refused before any
/// provider call.
pub fn cards(total: &UsageTotals, refused: i64) -> String {
    let mut out = String::from("<section class=\"cards\">");
    let mut card = |id: &str, label: &str, value: String, note: &str| {
        let _ = write!(
            out,
            "<div class=\"card\"><div class=\"label\">{label}</div>\
             <div class=\"value\" id=\"{id}\">{value}</div><div class=\"note\">{note}</div></div>"
        );
    };
    card("total-cost", "Spend", spend(total), "USD, priced calls");
    let calls = format!("{} provider calls", total.requests);
    card(
        "total-requests",
        "Requests",
        report::client_requests(total).to_string(),
        &calls,
    );
    card(
        "total-images",
        "Images",
        total.images.to_string(),
        "generated",
    );
    let retried = match total.retries {
        1 => "1 failed attempt retried".to_owned(),
        n => format!("{n} failed attempts retried"),
    };
    card(
        "total-failed",
        "Failed",
        report::client_failures(total).to_string(),
        if total.retries > 0 {
            &retried
        } else {
            "clients saw an error"
        },
    );
    card(
        "total-refused",
        "Refused",
        refused.to_string(),
        "rpm, budget, in flight, model",
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
    // Nothing spent: an axis up to a dollar, not to a billionth of one.
    let max = if highest <= 0 {
        1e9
    } else {
        nice_ceiling(highest as f64 / 1e9) * 1e9
    };
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
             <text class=\"axis\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
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
            match (report::cost_usd(d), d.unpriced) {
                (None, _) => "unpriced".to_owned(),
                (Some(usd), 0) => format!("${usd}"),
                (Some(usd), n) => format!("${usd} + {n} unpriced"),
            },
            report::client_requests(d),
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

/// An axis label: dollars, with cents below $10 and below a dollar as many places as
/// the step needs (the exact figures are in the tables and the bars' tooltips).
fn axis_usd(usd: f64) -> String {
    if usd == 0.0 {
        return "$0".to_owned();
    }
    let places = if usd >= 10.0 {
        0
    } else if usd >= 0.01 {
        2
    } else {
        (-usd.log10().floor()) as usize + 1
    };
    let text = format!("{usd:.places$}");
    let text = if text.contains('.') && places > 2 {
        text.trim_end_matches('0').to_owned()
    } else {
        text
    };
    format!("${text}")
}

/// Totals per model as a table sortable by any column: client requests, those that
/// failed, images, tokens and spend.
pub fn totals_table(id: &str, heading: &str, rows: &[UsageTotals]) -> String {
    if rows.is_empty() {
        return "<p class=\"empty\">No usage in this period.</p>".to_owned();
    }
    let mut out = format!(
        "<table class=\"sortable\" id=\"{id}\"><colgroup><col class=\"name\"><col><col><col>\
         <col><col class=\"spend\"></colgroup><thead><tr><th>{}</th><th class=\"num\">Requests</th>\
         <th class=\"num\">Failed</th><th class=\"num\">Images</th><th class=\"num\">Tokens</th>\
         <th class=\"num\">Spend</th></tr></thead><tbody>",
        esc(heading)
    );
    for r in rows {
        let (requests, failed) = (report::client_requests(r), report::client_failures(r));
        let _ = write!(
            out,
            "<tr data-group=\"{}\"><td title=\"{}\">{}</td><td class=\"num\" data-sort=\"{requests}\">{requests}</td>\
             <td class=\"num\" data-sort=\"{failed}\">{failed}</td><td class=\"num\" data-sort=\"{}\">{}</td>\
             <td class=\"num\" data-sort=\"{}\">{}</td>\
             <td class=\"num cost\" data-sort=\"{}\">{}</td></tr>",
            esc(&r.group),
            esc(&r.group),
            esc(&r.group),
            r.images,
            r.images,
            r.total_tokens,
            r.total_tokens,
            cost_sort(report::cost_nanousd(r)),
            spend(r),
        );
    }
    out.push_str("</tbody></table>");
    out
}

/// A key as the by-key table shows it beside its usage: its state and its budget now.
pub struct KeyLine {
    pub status: &'static str,
    /// Spent and limit in the budget's current period, and the period's name.
    pub budget: Option<(i64, i64, &'static str)>,
}

/// Totals per key, sortable: client requests, failed, refused, spend in the period, and
/// spend against budget in the budget's own period ("$1.20 of $5.00 today", with a bar).
/// Revoked and expired keys are marked.
pub fn keys_table(
    rows: &[UsageTotals],
    refused: &std::collections::BTreeMap<String, i64>,
    keys: &std::collections::HashMap<String, KeyLine>,
) -> String {
    if rows.is_empty() && refused.is_empty() {
        return "<p class=\"empty\">No usage in this period.</p>".to_owned();
    }
    let mut names: Vec<&str> = rows.iter().map(|r| r.group.as_str()).collect();
    for name in refused.keys() {
        if !names.contains(&name.as_str()) {
            names.push(name);
        }
    }
    names.sort_unstable();
    let mut out = String::from(
        "<table class=\"sortable\" id=\"keys\"><colgroup><col class=\"name\"><col><col><col>\
         <col class=\"spend\"><col class=\"budget\"></colgroup><thead><tr><th>Key</th>\
         <th class=\"num\">Requests</th><th class=\"num\">Failed</th><th class=\"num\">Refused</th>\
         <th class=\"num\">Spend</th><th>Budget</th></tr></thead><tbody>",
    );
    let none = UsageTotals::default();
    for name in names {
        let r = rows.iter().find(|r| r.group == name).unwrap_or(&none);
        let (requests, failed) = (report::client_requests(r), report::client_failures(r));
        let refused = refused.get(name).copied().unwrap_or(0);
        let line = keys.get(name);
        let mark = match line.map(|l| l.status) {
            Some(status @ ("revoked" | "expired")) => {
                format!(" <span class=\"badge {status}\">{status}</span>")
            }
            _ => String::new(),
        };
        let budget = match line.and_then(|l| l.budget) {
            Some((spent, limit, period)) => {
                let share = if limit > 0 {
                    (spent as f64 / limit as f64).clamp(0.0, 1.0)
                } else {
                    1.0
                };
                format!(
                    "<td class=\"budget\" data-sort=\"{share}\" title=\"${} of ${} {period}\">\
                     <svg class=\"meter\" viewBox=\"0 0 40 6\" width=\"40\" height=\"6\" aria-hidden=\"true\">\
                     <rect class=\"track\" width=\"40\" height=\"6\" rx=\"3\"/>\
                     <rect class=\"fill\" width=\"{:.1}\" height=\"6\" rx=\"3\"/></svg> {} of {}</td>",
                    format_usd(spent),
                    format_usd(limit),
                    share * 40.0,
                    money(i128::from(spent)),
                    money(i128::from(limit)),
                )
            }
            None => format!("<td class=\"budget none\" data-sort=\"-1\">{UNKNOWN}</td>"),
        };
        let _ = write!(
            out,
            "<tr data-group=\"{}\"><td title=\"{}\"><span class=\"name\">{}</span>{mark}</td>\
             <td class=\"num\" data-sort=\"{requests}\">{requests}</td>\
             <td class=\"num\" data-sort=\"{failed}\">{failed}</td>\
             <td class=\"num\" data-sort=\"{refused}\">{refused}</td>\
             <td class=\"num cost\" data-sort=\"{}\">{}</td>{budget}</tr>",
            esc(name),
            esc(name),
            esc(name),
            cost_sort(report::cost_nanousd(r)),
            spend(r),
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

/// The latest requests, one row each, newest first: time, request id, key, model, the
/// provider that answered, status, tokens, cost and latency; a request that failed over
/// has its earlier attempts (provider, status, cause) folded under it. What is not known
/// (an interrupted call's status, tokens and latency) reads "—".
pub fn requests_table(rows: &[UsageRow]) -> String {
    if rows.is_empty() {
        return "<p class=\"empty\">No requests in this period.</p>".to_owned();
    }
    // Attempts of one request, grouped in the order their newest row comes.
    let mut groups: Vec<Vec<&UsageRow>> = Vec::new();
    for row in rows {
        match groups
            .iter_mut()
            .find(|g| g[0].client_request() == row.client_request())
        {
            Some(group) => group.push(row),
            None => groups.push(vec![row]),
        }
    }
    let mut out = String::from(
        "<table class=\"sortable\" id=\"requests\"><colgroup><col class=\"time\">\
         <col class=\"rid\"><col class=\"name\"><col class=\"model\"><col class=\"provider\">\
         <col class=\"outcome-col\"><col class=\"tokens\"><col class=\"tokens\"><col class=\"spend\">\
         <col class=\"latency\"></colgroup>\
         <thead><tr><th>Time (UTC)</th><th>Request id</th><th>Key</th>\
         <th>Model</th><th>Provider</th><th>Status</th><th class=\"num\">In tokens</th>\
         <th class=\"num\">Out tokens</th><th class=\"num\">Cost</th>\
         <th class=\"num\">Latency</th></tr></thead>",
    );
    for mut group in groups {
        group.sort_by_key(|r| std::cmp::Reverse(r.attempt));
        let last = group[0];
        let known = last.outcome != crate::store::Outcome::Interrupted;
        let unknown = |value: i64, suffix: &str| {
            if known {
                format!("{value}{suffix}")
            } else {
                UNKNOWN.to_owned()
            }
        };
        let ok = if known && (200..300).contains(&last.status) {
            "ok"
        } else {
            "bad"
        };
        // An unpriced row has no cost, estimated or not.
        let estimated = if last.cost_estimated && last.cost_nanousd.is_some() {
            " <abbr title=\"worst-case estimate\">est.</abbr>"
        } else {
            ""
        };
        let cost = match last.cost_nanousd {
            Some(nanos) => money_html(i128::from(nanos)),
            None => "unpriced".to_owned(),
        };
        let attempts = if group.len() > 1 {
            format!(
                " <span class=\"attempts\" title=\"answered on attempt {}\">{} attempts</span>",
                last.attempt,
                group.len()
            )
        } else {
            String::new()
        };
        let id = last.client_request();
        // A completed call's status says it all; any other outcome is written out.
        let outcome = last.outcome.as_str().replace('_', " ");
        let shown_outcome = if last.outcome == crate::store::Outcome::Completed {
            String::new()
        } else {
            format!(" <span class=\"outcome\">{outcome}</span>")
        };
        let _ = write!(
            out,
            "<tbody class=\"request\"><tr data-request-id=\"{}\"><td data-sort=\"{}\">{}</td>\
             <td title=\"{}\"><code>{}</code></td><td title=\"{}\">{}</td><td title=\"{}\">{}</td>\
             <td>{}{attempts}</td>\
             <td data-sort=\"{}\" title=\"{outcome}\"><span class=\"status {ok}\">{}</span>{shown_outcome}</td>\
             <td class=\"num\" data-sort=\"{}\">{}</td><td class=\"num\" data-sort=\"{}\">{}</td>\
             <td class=\"num cost\" data-sort=\"{}\">{cost}{estimated}</td>\
             <td class=\"num\" data-sort=\"{}\">{}</td></tr>",
            esc(id),
            last.created_at.timestamp_micros(),
            last.created_at.format("%Y-%m-%dT%H:%M:%SZ"),
            esc(id),
            esc(id),
            esc(&last.key_name),
            esc(&last.key_name),
            esc(&last.model),
            esc(&last.model),
            esc(&last.provider),
            if known { last.status } else { -1 },
            if known {
                last.status.to_string()
            } else {
                UNKNOWN.to_owned()
            },
            if known { last.input_tokens } else { -1 },
            unknown(last.input_tokens, ""),
            if known { last.output_tokens } else { -1 },
            unknown(last.output_tokens, ""),
            cost_sort(last.cost_nanousd),
            if known { last.latency_ms } else { -1 },
            unknown(last.latency_ms, " ms"),
        );
        for earlier in &group[1..] {
            let cause = earlier.cause.as_deref().unwrap_or(UNKNOWN);
            let _ = write!(
                out,
                "<tr class=\"attempt\" data-attempt-of=\"{}\"><td></td>\
                 <td title=\"{}\"><code>{}</code></td><td colspan=\"2\">\u{21b3} attempt {}</td>\
                 <td>{}</td><td><span class=\"status bad\">{}</span> <span class=\"cause\">{}</span></td>\
                 <td class=\"num\"></td><td class=\"num\"></td><td class=\"num cost\"></td>\
                 <td class=\"num\">{} ms</td></tr>",
                esc(id),
                esc(&earlier.request_id),
                esc(&earlier.request_id),
                earlier.attempt,
                esc(&earlier.provider),
                earlier.status,
                esc(cause),
                earlier.latency_ms,
            );
        }
        out.push_str("</tbody>");
    }
    out.push_str("</table>");
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
        assert_eq!(axis_usd(0.5), "$0.50");
        assert_eq!(axis_usd(0.0), "$0");
        assert_eq!(axis_usd(0.1 * 3.0), "$0.30");
        assert_eq!(axis_usd(0.0025), "$0.0025");
        assert_eq!(axis_usd(50.0), "$50");
    }

    #[test]
    fn money_is_dollars_and_cents() {
        assert_eq!(money(571_928_500), "$0.57");
        assert_eq!(money(1_814_567_899), "$1.81");
        assert_eq!(money(5_000_000), "$0.01");
        assert_eq!(money(7), "<$0.01");
        assert_eq!(money(0), "$0.00");
        assert_eq!(money(1_234_567_890_000), "$1,234.57");
    }

    #[test]
    fn query_strings_are_percent_encoded_and_skip_empty_values() {
        assert_eq!(
            query(&[("key", "a b&c=d"), ("model", ""), ("since", "2025-03-01")]),
            "?key=a%20b%26c%3Dd&since=2025-03-01"
        );
    }
}
