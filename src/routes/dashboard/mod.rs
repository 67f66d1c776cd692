//! The usage dashboard: `GET /dashboard`, a page written on the server (spend by day, by
//! key and by model, the latest requests), its CSV download, and its login. Its figures
//! come through the admin API's own functions ([`super::admin::usage`]).
//!
//! Authentication: the login form takes the admin token, stores a session and sets its
//! cookie ([`session`]); [`crate::gate`] sends a request without a live one to the form
//! (303). Failed logins are throttled per client address ([`crate::login_throttle`]).

pub mod html;
pub mod session;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use chrono::{Duration, NaiveDate, Utc};
use http::{HeaderMap, HeaderValue, StatusCode, header};

use super::admin::keys::key_status;
use super::admin::usage::{
    Pairs, Params, csv_response, decode_cursor, page, refusal_totals, rows_csv_response, totals,
};
use crate::auth::admin_token_matches;
use crate::config::Secret;
use crate::error::ApiError;
use crate::replicas::Roster;
use crate::state::{AppState, ClientAddress};
use crate::store::{BudgetPeriod, GroupBy, PageCursor, UsageFilter, UsageRow, UsageTotals};
use crate::usage::report;

pub const LOGIN: &str = "/dashboard/login";
/// Days the page shows when the request names no period.
const DEFAULT_DAYS: i64 = 30;
/// Rows of the latest requests' table.
const LATEST: i64 = 50;
/// The page's parameters: the filters, and which page of the latest requests.
const PAGE: &[&str] = &["key", "model", "since", "until", "cursor"];

const CSS: &str = include_str!("assets/dashboard.css");
const JS: &str = include_str!("assets/dashboard.js");

/// Nothing but the dashboard's own files: no inline script, no other origin, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// An HTML page with the dashboard's security headers; never cached.
fn html(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

/// `GET /dashboard/login`.
pub async fn login_form() -> Response {
    html(StatusCode::OK, html::login(None))
}

#[derive(serde::Deserialize)]
pub struct Login {
    token: String,
}

/// `POST /dashboard/login`: the right admin token stores a new session, sets its cookie
/// and goes to the dashboard; anything else shows the form again with 401. An address with
/// [`crate::login_throttle::MAX_FAILURES`] failures in the last minute gets the form with
/// 429 and `retry-after` instead, whatever it sends, until the oldest of them is a minute
/// old.
pub async fn login(
    State(state): State<Arc<AppState>>,
    client: Option<Extension<ClientAddress>>,
    headers: HeaderMap,
    form: Result<Form<Login>, FormRejection>,
) -> Response {
    // The client as the access log names it: the TCP peer, or from X-Forwarded-For only when
    // the peer is one of `server.trusted_proxies` (behind a proxy, each client is throttled
    // on its own). The router driven without the server has none, and counts as one client.
    let client = client.map_or(
        IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        |Extension(ClientAddress(ip))| ip,
    );
    if let Some(wait) = state.login_throttle.refused(client, Instant::now()) {
        tracing::warn!(target: "imagegate::admin", %client, "dashboard login refused: too many failed logins");
        return too_many_failures(wait);
    }
    let config = Arc::clone(&state.runtime.load().config);
    let token = config.admin_token.as_ref();
    let given = form.map(|Form(login)| login.token).unwrap_or_default();
    if !admin_token_matches(token, &given) {
        state.login_throttle.failed(client, Instant::now());
        tracing::warn!(target: "imagegate::admin", %client, "dashboard login refused: wrong admin token");
        let message = match token {
            Some(_) => "That is not the admin token.",
            None => "The admin API is off: the server has no admin token set.",
        };
        return html(StatusCode::UNAUTHORIZED, html::login(Some(message)));
    }
    let Some(token) = token else {
        return html(StatusCode::UNAUTHORIZED, html::login(None));
    };
    state.login_throttle.succeeded(client);
    tracing::info!(target: "imagegate::admin", %client, "dashboard login");
    start_session(&state, token, &headers).await
}

/// The login form again, with 429 and `retry-after`: the address must `wait`.
fn too_many_failures(wait: std::time::Duration) -> Response {
    let seconds = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
    let message = format!("Too many failed logins from your address. Try again in {seconds} s.");
    let mut response = html(StatusCode::TOO_MANY_REQUESTS, html::login(Some(&message)));
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    response
}

/// Stores a new session and sends the browser to the dashboard with its cookie; the form
/// with 503 when the database does not take it.
async fn start_session(state: &AppState, token: &Secret, headers: &HeaderMap) -> Response {
    let new = session::issue(token, Utc::now());
    let stored = state
        .store
        .create_session(&new.hash, new.created_at, new.expires_at);
    if let Err(err) = stored.await {
        tracing::error!(target: "imagegate::admin", %err, "dashboard login: the session could not be stored");
        let message =
            "The session could not be stored (the database is not answering). Try again shortly.";
        return html(StatusCode::SERVICE_UNAVAILABLE, html::login(Some(message)));
    }
    let cookie = session::set_cookie(&new.id, headers);
    ([(header::SET_COOKIE, cookie)], Redirect::to("/dashboard")).into_response()
}

/// `POST /dashboard/logout`: ends the session, on every replica, and clears its cookie.
pub async fn logout(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let token = state.runtime.load().config.admin_token.clone();
    if let Some(hash) = session::presented(&headers, token.as_ref()) {
        if let Err(err) = state.store.delete_session(&hash).await {
            tracing::error!(target: "imagegate::admin", %err, "dashboard logout: the session could not be deleted");
            return ApiError::NotReady.into_response();
        }
    }
    (
        [(header::SET_COOKIE, session::clear_cookie(&headers))],
        Redirect::to(LOGIN),
    )
        .into_response()
}

/// The filter a dashboard request names, the period defaulting to the last
/// [`DEFAULT_DAYS`] days, and the values the form shows.
fn filter(params: &Params) -> Result<(UsageFilter, html::Shown), ApiError> {
    let today = Utc::now().date_naive();
    let default_since = (today - Duration::days(DEFAULT_DAYS - 1))
        .format("%Y-%m-%d")
        .to_string();
    let shown = html::Shown {
        key: params.get("key").unwrap_or_default().to_owned(),
        model: params.get("model").unwrap_or_default().to_owned(),
        since: match (params.get("since"), params.get("until")) {
            (Some(since), _) => since.to_owned(),
            (None, None) => default_since,
            (None, Some(_)) => String::new(),
        },
        until: params.get("until").unwrap_or_default().to_owned(),
        cursor: params.get("cursor").unwrap_or_default().to_owned(),
    };
    let mut filter = params.filter()?;
    if filter.since.is_none() && !shown.since.is_empty() {
        filter.since = Some(super::admin::usage::parse_time("since", &shown.since)?);
    }
    Ok((filter, shown))
}

/// A filter error on a page: the message, and the way back.
fn bad_filter(err: &ApiError) -> Response {
    let body = format!(
        "<main class=\"login\"><div class=\"login-card\"><h1>imagegate <span>usage</span></h1>\
         <p class=\"error\" role=\"alert\">{}</p><a href=\"/dashboard\">Back to the dashboard</a>\
         </div></main>",
        html::esc(&err.to_string())
    );
    html(
        StatusCode::BAD_REQUEST,
        html::page("imagegate · usage", &body),
    )
}

/// `GET /dashboard?key=&model=&since=&until=&cursor=`.
pub async fn dashboard(
    State(state): State<Arc<AppState>>,
    query: Result<Query<Pairs>, QueryRejection>,
) -> Result<Response, ApiError> {
    let parsed = Params::new(query, PAGE).and_then(|params| {
        let (filter, shown) = filter(&params)?;
        let cursor = params.get("cursor").map(decode_cursor).transpose()?;
        Ok((filter, shown, cursor))
    });
    let (filter, shown, cursor) = match parsed {
        Ok(parsed) => parsed,
        Err(err) => return Ok(bad_filter(&err)),
    };
    let figures = Figures::read(&state, &filter, cursor.as_ref()).await?;
    let body = render(&filter, &shown, &figures);
    Ok(html(
        StatusCode::OK,
        html::page("imagegate · usage", &format!("<main>{body}</main>")),
    ))
}

/// What the page shows, read through the admin API's functions.
struct Figures {
    by_day: Vec<UsageTotals>,
    by_key: Vec<UsageTotals>,
    by_model: Vec<UsageTotals>,
    latest: Vec<UsageRow>,
    /// The next page of the latest requests, if there is one.
    next_cursor: Option<String>,
    /// Refused requests per key in the period.
    refused: BTreeMap<String, i64>,
    /// The replicas sharing the database (a panel when two or more are live).
    replicas: Roster,
    /// Every key's name and status, for the key picker.
    key_names: Vec<(String, &'static str)>,
    /// Each key's state and budget now, by name (the active key when a name was reused).
    keys: HashMap<String, html::KeyLine>,
    models: Vec<String>,
}

impl Figures {
    async fn read(
        state: &AppState,
        filter: &UsageFilter,
        cursor: Option<&PageCursor>,
    ) -> Result<Self, ApiError> {
        let store = state.store.as_ref();
        let with = |group_by| UsageFilter {
            group_by,
            ..filter.clone()
        };
        let mut key_names: Vec<(String, &'static str)> = Vec::new();
        let mut keys = HashMap::new();
        let now = Utc::now();
        for (key, standing) in super::admin::keys::standings(state, now).await? {
            let status = key_status(&key, now);
            let line = html::KeyLine {
                status,
                budget: standing.map(|s| {
                    let period = match s.period {
                        BudgetPeriod::Day => "today",
                        BudgetPeriod::Month => "this month",
                        BudgetPeriod::Total => "in total",
                    };
                    (s.spent_nanousd, s.limit_nanousd, period)
                }),
            };
            // Oldest first: an active key replaces a revoked one of its name.
            keys.insert(key.name.clone(), line);
            key_names.retain(|(name, _)| *name != key.name);
            key_names.push((key.name, status));
        }
        let by_key = totals(store, &with(GroupBy::Key)).await?;
        // Names in the usage rows that no key has now (deleted from the database) too.
        for group in &by_key {
            if !key_names.iter().any(|(name, _)| *name == group.group) {
                key_names.push((group.group.clone(), ""));
            }
        }
        key_names.sort();
        let mut refused = BTreeMap::new();
        for row in refusal_totals(store, filter).await? {
            *refused.entry(row.key_name).or_insert(0) += row.count;
        }
        let runtime = state.runtime.load_full();
        let (latest, next_cursor) = page(store, filter, cursor, LATEST).await?;
        Ok(Figures {
            by_day: totals(store, &with(GroupBy::Day)).await?,
            by_key,
            by_model: totals(store, &with(GroupBy::Model)).await?,
            latest,
            next_cursor,
            refused,
            replicas: super::admin::replicas::roster(state).await?,
            key_names,
            keys,
            models: runtime
                .config
                .public_names()
                .into_iter()
                .map(str::to_owned)
                .collect(),
        })
    }
}

/// The page's content: filters, cards, the day chart, the two tables, the latest rows.
fn render(filter: &UsageFilter, shown: &html::Shown, f: &Figures) -> String {
    let last_day = filter
        .until
        .map(|until| (until - Duration::microseconds(1)).date_naive())
        .unwrap_or_else(|| Utc::now().date_naive());
    let first_day = NaiveDate::parse_from_str(&shown.since, "%Y-%m-%d").ok();
    let days = html::day_series(&f.by_day, first_day, last_day);
    let period = match days.first() {
        Some(first) => format!("Spend by day, {} to {last_day}", first.group),
        None => "Spend by day".to_owned(),
    };
    let csv = |group: &str| {
        let link = format!(
            "/dashboard/usage.csv{}",
            shown.query(&[("group_by", group)])
        );
        Some(link)
    };
    let keys = html::keys_table(&f.by_key, &f.refused, &f.keys);
    let models = html::totals_table("models", "Model", &f.by_model);
    let refused: i64 = f.refused.values().sum();
    let requests_csv = {
        let mut query = shown.query(&[("cursor", shown.cursor.as_str())]);
        query.insert_str(0, "/dashboard/requests.csv");
        query
    };
    let mut pages = String::new();
    if !shown.cursor.is_empty() {
        let _ = write!(
            pages,
            "<a class=\"page\" id=\"newest-page\" href=\"/dashboard{}\">\u{2190} Newest</a>",
            html::esc(&shown.query(&[]))
        );
    }
    if let Some(next) = &f.next_cursor {
        let _ = write!(
            pages,
            "<a class=\"page\" id=\"next-page\" href=\"/dashboard{}\">Older \u{2192}</a>",
            html::esc(&shown.query(&[("cursor", next.as_str())]))
        );
    }
    let pages = format!("<nav class=\"pages\">{pages}</nav>");
    [
        html::top(shown, &f.key_names, &f.models),
        html::cards(&report::total(&f.by_key, "total"), refused),
        replicas_panel(&f.replicas),
        html::panel(
            "by-day",
            &period,
            csv("day").as_deref(),
            &html::chart(&days),
        ),
        html::panel("by-key", "By key", csv("key").as_deref(), &keys),
        html::panel("by-model", "By model", csv("model").as_deref(), &models),
        html::panel(
            "latest",
            &format!("Latest requests ({LATEST} provider calls a page)"),
            Some(&requests_csv),
            &format!("{}{pages}", html::requests_table(&f.latest)),
        ),
        "<footer>Times and days are UTC (ISO 8601). Spend shows dollars and cents; hover a \
         figure for its exact amount, to the billionth of a dollar, as the CSV downloads hold \
         it (the same figures as GET /admin/usage and GET /admin/requests). Requests count \
         each client request once; a failover's attempts are folded under it.</footer>"
            .to_owned(),
    ]
    .concat()
}

/// The replicas' panel when two or more replicas are live (one replica alone has nothing to
/// compare), or when live replicas disagree.
fn replicas_panel(roster: &Roster) -> String {
    if roster.live < 2 && roster.warnings.is_empty() {
        return String::new();
    }
    let title = format!("Replicas ({} live)", roster.live);
    html::panel("replicas-panel", &title, None, &html::replicas(roster))
}

/// `GET /dashboard/usage.csv?key=&model=&since=&until=&group_by=`: the figures the page
/// shows, as `GET /admin/usage?format=csv` gives them for the same filter.
pub async fn usage_csv(
    State(state): State<Arc<AppState>>,
    query: Result<Query<Pairs>, QueryRejection>,
) -> Result<Response, ApiError> {
    const ALLOWED: &[&str] = &["key", "model", "since", "until", "group_by"];
    let params = Params::new(query, ALLOWED)?;
    let (filter, _) = filter(&params)?;
    let rows = totals(state.store.as_ref(), &filter).await?;
    csv_response(&rows, filter.group_by, "usage")
}

/// `GET /dashboard/requests.csv?key=&model=&since=&until=`: the latest requests the page
/// shows, as `GET /admin/requests?format=csv&limit=50` gives them for the same filter.
pub async fn requests_csv(
    State(state): State<Arc<AppState>>,
    query: Result<Query<Pairs>, QueryRejection>,
) -> Result<Response, ApiError> {
    let params = Params::new(query, PAGE)?;
    let (filter, _) = filter(&params)?;
    let cursor = params.get("cursor").map(decode_cursor).transpose()?;
    let (rows, _) = page(state.store.as_ref(), &filter, cursor.as_ref(), LATEST).await?;
    rows_csv_response(&rows)
}

/// The embedded stylesheet.
pub async fn css() -> Response {
    asset("text/css; charset=utf-8", CSS)
}

/// The embedded script: sorts the tables.
pub async fn js() -> Response {
    asset("text/javascript; charset=utf-8", JS)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "max-age=300"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}
