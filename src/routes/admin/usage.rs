//! `GET /admin/usage` (totals by key, model, provider, day or hour, as JSON or CSV),
//! `GET /admin/requests` (the latest usage rows, newest first, a page at a time, as JSON or
//! CSV) and `GET /admin/refusals` (requests refused before a provider call, per key and
//! reason). The
//! dashboard reads through the same functions, so that its figures are these.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, NaiveDate, Utc};
use http::header;
use serde_json::json;

use crate::error::ApiError;
use crate::state::AppState;
use crate::store::{GroupBy, PageCursor, Store, UsageFilter, UsageRow, UsageTotals};
use crate::usage::report;

/// Rows `GET /admin/requests` returns when the request does not say.
pub const DEFAULT_LIMIT: i64 = 50;
/// The most rows one page may hold.
pub const MAX_LIMIT: i64 = 1000;

/// A query string as name-value pairs, in order.
pub type Pairs = Vec<(String, String)>;

/// How a report is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Csv,
}

/// A query string's parameters, each at most once; an empty value counts as absent (an
/// HTML form sends its empty fields). Any other parameter than `allowed` is refused, so
/// that a misspelt filter is not silently ignored.
pub struct Params(Pairs);

impl Params {
    pub fn new(
        query: Result<Query<Pairs>, QueryRejection>,
        allowed: &[&str],
    ) -> Result<Self, ApiError> {
        let Query(pairs) = query.map_err(|err| ApiError::invalid(err.body_text(), None))?;
        for (i, (name, _)) in pairs.iter().enumerate() {
            if !allowed.contains(&name.as_str()) {
                return Err(ApiError::invalid(
                    format!(
                        "Unknown query parameter '{name}'; expected one of: {}.",
                        allowed.join(", ")
                    ),
                    Some(name),
                ));
            }
            if pairs[..i].iter().any(|(earlier, _)| earlier == name) {
                return Err(ApiError::invalid(
                    format!("Query parameter '{name}' is given more than once."),
                    Some(name),
                ));
            }
        }
        Ok(Params(pairs))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, v)| n == name && !v.is_empty())
            .map(|(_, v)| v.as_str())
    }

    /// `key`, `model`, `provider`, `since` and `until` (those present), then `group_by`.
    pub fn filter(&self) -> Result<UsageFilter, ApiError> {
        let group_by = match self.get("group_by") {
            None => GroupBy::Key,
            Some(name) => GroupBy::parse(name).ok_or_else(|| {
                ApiError::invalid(
                    format!("group_by '{name}' is not one of: key, model, provider, day, hour."),
                    Some("group_by"),
                )
            })?,
        };
        Ok(UsageFilter {
            key_name: self.get("key").map(str::to_owned),
            model: self.get("model").map(str::to_owned),
            provider: self.get("provider").map(str::to_owned),
            since: self
                .get("since")
                .map(|t| parse_time("since", t))
                .transpose()?,
            until: self
                .get("until")
                .map(|t| parse_time("until", t))
                .transpose()?,
            group_by,
        })
    }

    pub fn format(&self) -> Result<Format, ApiError> {
        match self.get("format") {
            None | Some("json") => Ok(Format::Json),
            Some("csv") => Ok(Format::Csv),
            Some(other) => Err(ApiError::invalid(
                format!("format '{other}' is not one of: json, csv."),
                Some("format"),
            )),
        }
    }
}

/// An RFC 3339 time, or a date (`YYYY-MM-DD`, a UTC day): as `since`, the day's first
/// instant; as `until`, the next day's, so that the day itself is included.
pub fn parse_time(param: &str, text: &str) -> Result<DateTime<Utc>, ApiError> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    let day = NaiveDate::parse_from_str(text, "%Y-%m-%d").ok();
    let day = match (param, day) {
        ("until", Some(day)) => day.succ_opt(),
        (_, day) => day,
    };
    day.and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
        .ok_or_else(|| {
            ApiError::invalid(
                format!("{param} '{text}' is neither an RFC 3339 time (2025-03-01T12:00:00Z) nor a date (2025-03-01)."),
                Some(param),
            )
        })
}

/// The report a filter selects.
pub async fn totals(store: &dyn Store, filter: &UsageFilter) -> Result<Vec<UsageTotals>, ApiError> {
    store.usage_report(filter).await.map_err(ApiError::internal)
}

/// A report as CSV, ready to download under `name`.
pub fn csv_response(
    rows: &[UsageTotals],
    group_by: GroupBy,
    name: &str,
) -> Result<Response, ApiError> {
    let body = report::csv(rows, group_by).map_err(ApiError::internal)?;
    Ok(csv_download(
        body,
        &format!("{name}-by-{}.csv", group_by.name()),
    ))
}

/// CSV text as a download named `file`.
pub fn csv_download(body: Vec<u8>, file: &str) -> Response {
    let disposition = format!("attachment; filename=\"{file}\"");
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        body,
    )
        .into_response()
}

/// `GET /admin/usage?key=&model=&provider=&since=&until=&group_by=&format=`.
pub async fn usage(
    State(state): State<Arc<AppState>>,
    query: Result<Query<Pairs>, QueryRejection>,
) -> Result<Response, ApiError> {
    const ALLOWED: &[&str] = &[
        "key", "model", "provider", "since", "until", "group_by", "format",
    ];
    let params = Params::new(query, ALLOWED)?;
    let (filter, format) = (params.filter()?, params.format()?);
    let rows = totals(state.store.as_ref(), &filter).await?;
    match format {
        Format::Csv => csv_response(&rows, filter.group_by, "usage"),
        Format::Json => Ok(Json(json!({
            "object": "list",
            "group_by": filter.group_by.name(),
            "data": report::json(&rows, filter.group_by),
        }))
        .into_response()),
    }
}

/// A page's cursor, opaque to clients: base64url of `v1:<microseconds since the epoch of
/// the page's last row>:<its request id>`.
pub fn encode_cursor(row: &UsageRow) -> String {
    let text = format!(
        "v1:{}:{}",
        row.created_at.timestamp_micros(),
        row.request_id
    );
    URL_SAFE_NO_PAD.encode(text)
}

pub fn decode_cursor(cursor: &str) -> Result<PageCursor, ApiError> {
    let decoded = URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok());
    let parsed = decoded.as_deref().and_then(|text| {
        let mut parts = text.splitn(3, ':');
        let (Some("v1"), Some(micros), Some(id)) = (parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        Some(PageCursor {
            created_at: DateTime::from_timestamp_micros(micros.parse().ok()?)?,
            request_id: id.to_owned(),
        })
    });
    parsed.ok_or_else(|| {
        ApiError::invalid(
            "cursor is not one this server gave: pass next_cursor from the previous page as it is.",
            Some("cursor"),
        )
    })
}

/// A page of rows (newest first) and the cursor of the next one, if there are more.
pub async fn page(
    store: &dyn Store,
    filter: &UsageFilter,
    after: Option<&PageCursor>,
    limit: i64,
) -> Result<(Vec<UsageRow>, Option<String>), ApiError> {
    let mut rows = store
        .usage_page(filter, after, limit + 1)
        .await
        .map_err(ApiError::internal)?;
    let more = rows.len() as i64 > limit;
    rows.truncate(usize::try_from(limit).unwrap_or(0));
    let next = more.then(|| rows.last().map(encode_cursor)).flatten();
    Ok((rows, next))
}

/// `limit`: 1 to [`MAX_LIMIT`], [`DEFAULT_LIMIT`] when absent.
fn parse_limit(params: &Params) -> Result<i64, ApiError> {
    let Some(text) = params.get("limit") else {
        return Ok(DEFAULT_LIMIT);
    };
    text.parse::<i64>()
        .ok()
        .filter(|n| (1..=MAX_LIMIT).contains(n))
        .ok_or_else(|| {
            ApiError::invalid(
                format!("limit '{text}' must be a whole number from 1 to {MAX_LIMIT}."),
                Some("limit"),
            )
        })
}

/// `GET /admin/requests?key=&model=&provider=&since=&until=&limit=&cursor=&format=`. As
/// CSV, the next page's cursor is in the `x-next-cursor` header (absent on the last page).
pub async fn requests(
    State(state): State<Arc<AppState>>,
    query: Result<Query<Pairs>, QueryRejection>,
) -> Result<Response, ApiError> {
    const ALLOWED: &[&str] = &[
        "key", "model", "provider", "since", "until", "limit", "cursor", "format",
    ];
    let params = Params::new(query, ALLOWED)?;
    let (filter, format) = (params.filter()?, params.format()?);
    let limit = parse_limit(&params)?;
    let after = params.get("cursor").map(decode_cursor).transpose()?;
    let (rows, next) = page(state.store.as_ref(), &filter, after.as_ref(), limit).await?;
    if format == Format::Csv {
        let mut response = rows_csv_response(&rows)?;
        if let Some(next) = next.and_then(|n| http::HeaderValue::from_str(&n).ok()) {
            response.headers_mut().insert("x-next-cursor", next);
        }
        return Ok(response);
    }
    Ok(Json(json!({
        "object": "list",
        "data": rows.iter().map(report::row_json).collect::<Vec<_>>(),
        "has_more": next.is_some(),
        "next_cursor": next,
    }))
    .into_response())
}

/// The refusals a filter's key and period select (its model and provider do not apply:
/// a refusal has neither), per key and reason.
pub async fn refusal_totals(
    store: &dyn Store,
    filter: &UsageFilter,
) -> Result<Vec<crate::store::RefusalTotal>, ApiError> {
    let key = filter.key_name.as_deref();
    (store.refusal_totals(key, filter.since, filter.until).await).map_err(ApiError::internal)
}

/// `GET /admin/refusals?key=&since=&until=`: requests of known keys refused before any
/// provider call (over `rpm`, budget or requests in flight, a model outside the key's
/// list, an expired key), per key and reason, with the total per reason. Counted in each
/// replica's memory and written every few seconds: the last seconds may not be in yet.
pub async fn refusals(
    State(state): State<Arc<AppState>>,
    query: Result<Query<Pairs>, QueryRejection>,
) -> Result<Response, ApiError> {
    let params = Params::new(query, &["key", "since", "until"])?;
    let filter = params.filter()?;
    let rows = refusal_totals(state.store.as_ref(), &filter).await?;
    let mut by_reason = serde_json::Map::new();
    for row in &rows {
        let sum = by_reason.entry(row.reason.clone()).or_insert(json!(0));
        *sum = json!(sum.as_i64().unwrap_or(0) + row.count);
    }
    let total: i64 = rows.iter().map(|r| r.count).sum();
    Ok(Json(json!({
        "object": "list",
        "data": rows.iter().map(|r| json!({"key": r.key_name, "reason": r.reason, "count": r.count})).collect::<Vec<_>>(),
        "by_reason": by_reason,
        "total": total,
    }))
    .into_response())
}

/// Usage rows as a CSV download.
pub fn rows_csv_response(rows: &[UsageRow]) -> Result<Response, ApiError> {
    let body = report::rows_csv(rows).map_err(ApiError::internal)?;
    Ok(csv_download(body, "requests.csv"))
}
