//! Async jobs, imagegate's own extension: `Prefer: respond-async` on an image request
//! answers 202 with a job at once and runs the call in the background, through the same
//! routing, failover and usage as the synchronous call; `GET /v1/images/jobs/{id}` tells
//! how it stands and, once it succeeded, holds the body the synchronous call would have
//! returned. The jobs' rows and results are [`crate::jobs`].

use std::sync::Arc;

use axum::Extension;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body_util::BodyExt;
use tracing::Instrument;

use crate::auth::Principal;
use crate::dedupe::Fingerprint;
use crate::error::ApiError;
use crate::jobs::{self, Finished, Held, Jobs, Order, Record, Status};
use crate::openai::{ErrorBody, ErrorDetail};
use crate::routing::{Call, RequestSource};
use crate::state::AppState;
use crate::store::JobCreated;

/// The most of a failed call's error body that is read for the job's error.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Whether the request asks to be answered at once with a job (RFC 7240's
/// `respond-async` preference). A `Prefer` header that is not a well-formed list of
/// preferences counts as absent, as the RFC asks of preferences a server cannot read.
pub fn prefers_async(headers: &HeaderMap) -> bool {
    let mut wanted = false;
    for value in headers.get_all("prefer") {
        let Some(names) = value.to_str().ok().and_then(preference_names) else {
            return false;
        };
        wanted |= names
            .iter()
            .any(|n| n.eq_ignore_ascii_case("respond-async"));
    }
    wanted
}

/// The names in one `Prefer` value (`name[=value] *(;param)`, comma separated), or `None`
/// when it is malformed.
fn preference_names(value: &str) -> Option<Vec<&str>> {
    let token = |t: &str| {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    let mut names = Vec::new();
    for preference in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        for (index, part) in preference.split(';').map(str::trim).enumerate() {
            let (name, val) = match part.split_once('=') {
                Some((name, val)) => (name.trim(), Some(val.trim())),
                None => (part, None),
            };
            let quoted = |v: &str| v.len() >= 2 && v.starts_with('"') && v.ends_with('"');
            if !token(name) || val.is_some_and(|v| !token(v) && !quoted(v)) {
                return None;
            }
            if index == 0 {
                names.push(name);
            }
        }
    }
    Some(names)
}

/// What the handler knows of the request beyond its [`Call`].
pub struct JobRequest {
    /// Its duplicate-protection fingerprint, when it has one (see [`crate::dedupe`]).
    pub fingerprint: Option<Fingerprint>,
    /// Sent as a retry: it gets the job its first try created.
    pub retry: bool,
    /// Asks for a streamed answer, which a job cannot give.
    pub stream: bool,
}

/// Creates the job (or finds the one a retry's first try created), starts it on a tracked
/// task and answers 202. The request must be whole by now (an upload: in the spool).
pub async fn submit(
    mut call: Call,
    source: impl RequestSource + 'static,
    request: JobRequest,
) -> Result<Response, ApiError> {
    if request.stream {
        return Err(ApiError::invalid(
            "'stream': true cannot be combined with 'Prefer: respond-async': a job's result is the JSON answer. Send one or the other.",
            Some("stream"),
        ));
    }
    let state = Arc::clone(&call.state);
    let order = Order {
        key_id: call.principal.key_id,
        endpoint: call.endpoint.as_str().to_owned(),
        request_id: call.request_id.0.to_string(),
        fingerprint: request.fingerprint,
        retry: request.retry,
    };
    let config = &call.runtime.config.jobs;
    let record = match state.jobs.create(order, config).await {
        Ok(JobCreated::New(record)) => record,
        Ok(JobCreated::Existing(record)) => return Ok(accepted(&record)),
        Ok(JobCreated::QueueFull) => {
            return Err(ApiError::JobQueueFull {
                limit: config.max_queued_per_key.get(),
            });
        }
        Err(err) => {
            tracing::warn!(error = %err, "an async job could not be created");
            return Err(ApiError::JobsUnavailable);
        }
    };
    call.job = Some(Arc::from(record.id.as_str()));
    let held = state.jobs.hold(&record.id);
    // A trace of its own, linked to the request that queued it: the request's span ends
    // with its 202, the job's attempts long after.
    let span = tracing::info_span!(
        parent: None,
        "job",
        otel.name = "job",
        otel.kind = "internal",
        job = %record.id,
        request_id = %call.request_id.0,
    );
    span.follows_from(tracing::Span::current());
    state.tasks.spawn(run(call, source, held).instrument(span));
    Ok(accepted(&record))
}

/// 202 with the job's state, where to poll it, and the preference applied.
fn accepted(record: &Record) -> Response {
    let mut response = (StatusCode::ACCEPTED, axum::Json(summary(record))).into_response();
    let headers = response.headers_mut();
    headers.insert(
        "preference-applied",
        HeaderValue::from_static("respond-async"),
    );
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/images/jobs/{}", record.id)) {
        headers.insert(header::LOCATION, location);
    }
    response
}

/// The job, without its result.
fn summary(record: &Record) -> serde_json::Value {
    let mut job = serde_json::json!({
        "id": record.id,
        "object": "image.job",
        "status": record.status,
        "created_at": jobs::unix(record.created_at),
        "completed_at": record.completed_at.map(jobs::unix),
    });
    if let Some(error) = jobs::stored_error(record) {
        job["error"] = error;
        job["status_code"] = serde_json::json!(record.status_code);
    }
    job
}

/// The job's life: wait for its turn (a key runs at most its own `max_in_flight`, else
/// `limits.max_in_flight_per_key`, jobs at once), send the call, keep what came back.
async fn run(mut call: Call, mut source: impl RequestSource, held: Held) {
    let id = held.id().to_owned();
    let state = Arc::clone(&call.state);
    let key_id = call.principal.key_id;
    let default = call.runtime.config.limits.max_in_flight_per_key.get();
    let cap = call.principal.max_in_flight(default);
    let _turn = state.jobs.running.enter(key_id, cap).await;
    let response = match as_key_is_now(&mut call).await {
        Err(err) => err.into_response(),
        Ok(()) => {
            match state.jobs.started(&id).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(job = %id, "a job failed by another replica (its lease ran out) is not run");
                    return;
                }
                Err(err) => {
                    tracing::error!(job = %id, %err, "could not record that a job started");
                }
            }
            match call.forward(&mut source).await {
                Ok(response) => response,
                Err(err) => err.into_response(),
            }
        }
    };
    let finished = keep(&state.jobs, &id, response).await;
    let kept = state.runtime.load().config.jobs.kept;
    if let Err(err) = state.jobs.finish(&id, key_id, finished, kept).await {
        tracing::error!(job = %id, %err, "could not record how a job ended");
    }
}

/// A job runs as its key is when it starts, not as it was when the job was queued: the
/// key is read again, and a key revoked, expired or no longer allowed the model since gets
/// the error a synchronous call would get now, before anything is sent or billed. Its
/// budget is the one read now (the call's hold checks it). A database that does not answer
/// in time leaves the key as it was read last, as for a synchronous call during an outage.
async fn as_key_is_now(call: &mut Call) -> Result<(), ApiError> {
    let principal = match call.state.keys.reread(&call.principal).await {
        Ok(Some(principal)) => principal,
        Ok(None) => return Err(ApiError::KEY_REVOKED),
        Err(_unavailable) => {
            tracing::warn!(key = %call.principal.name, "a job runs on its key as last read: the database did not answer");
            Arc::clone(&call.principal)
        }
    };
    if principal.expired(chrono::Utc::now()) {
        return Err(ApiError::KEY_EXPIRED);
    }
    if !principal.allows(&call.model.name, &call.runtime.config.aliases) {
        return Err(ApiError::ModelNotAllowed(call.model.name.clone()));
    }
    call.principal = principal;
    Ok(())
}

/// Reads the call's answer to its end (which writes its usage row): a success into the
/// job's result in the result store, an error into the job's error.
async fn keep(jobs: &Jobs, id: &str, response: Response) -> Finished {
    let status = response.status();
    let provider = response
        .headers()
        .get("x-imagegate-provider")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_owned();
    let json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.to_ascii_lowercase().contains("json"));
    if !status.is_success() {
        let body = http_body_util::Limited::new(response.into_body(), MAX_ERROR_BODY)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let error = ErrorBody::from_upstream(&provider, status.as_u16(), &body).error;
        return failed(status, error);
    }
    if !json {
        drain(response.into_body().into_data_stream()).await;
        return failed(
            StatusCode::BAD_GATEWAY,
            detail("The provider's answer was not JSON.", "upstream_error"),
        );
    }
    match write_result(jobs, id, response.into_body()).await {
        Ok(bytes) => Finished::Succeeded {
            status_code: status.as_u16(),
            bytes,
        },
        Err(err) => {
            tracing::error!(job = %id, err = %err, "could not keep a job's result");
            let message = match err {
                Unkept::Body(_) => "The result could not be kept: the provider's answer broke off.",
                Unkept::Store(_) => {
                    "The result could not be kept: the result store ([results] url) could not be written."
                }
            };
            failed(
                StatusCode::INTERNAL_SERVER_ERROR,
                detail(message, "server_error"),
            )
        }
    }
}

/// Why a result was not kept.
#[derive(Debug, thiserror::Error)]
enum Unkept {
    #[error("the answer broke off: {0}")]
    Body(axum::Error),
    #[error(transparent)]
    Store(crate::results::ResultsError),
}

fn failed(status: StatusCode, error: ErrorDetail) -> Finished {
    Finished::Failed {
        status_code: status.as_u16(),
        error,
    }
}

fn detail(message: &str, kind: &str) -> ErrorDetail {
    ErrorBody::new(message, kind, None, None).error
}

/// Streams the body into the job's result, visible only once whole; returns its size. A
/// result store that fails on the way does not cut the answer short: the rest is read
/// (and dropped), so that its usage is metered whole and billed once.
async fn write_result(jobs: &Jobs, id: &str, body: Body) -> Result<u64, Unkept> {
    let mut writer = jobs.result_writer(id);
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(Unkept::Body)?;
        if let Err(err) = writer.write(&chunk).await {
            drain(stream).await;
            return Err(Unkept::Store(err));
        }
    }
    writer.finish().await.map_err(Unkept::Store)
}

/// Reads a body to its end, so that its usage is metered.
async fn drain(mut stream: axum::body::BodyDataStream) {
    while let Some(Ok(_)) = stream.next().await {}
}

/// `GET /v1/images/jobs/{id}`: the job of the caller's key, from any replica. Unknown,
/// expired and other keys' jobs all get the same 404.
pub async fn retrieve(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::JobNotFound(id.chars().take(64).collect());
    let (retention, wait) = {
        let config = &state.runtime.load().config;
        (config.jobs.retention, config.server.key_lookup_timeout)
    };
    // A poll waits for the database no longer than a key lookup does: a hung connection
    // gets the client a 503 to retry, not a hung poll.
    let read = tokio::time::timeout(wait, state.jobs.get(&id, principal.key_id, retention));
    let record = match read.await {
        Ok(Ok(record)) => record.ok_or_else(not_found)?,
        Ok(Err(err)) => {
            tracing::warn!(error = %err, "an async job could not be read");
            return Err(ApiError::JobsUnavailable);
        }
        Err(_elapsed) => {
            tracing::warn!("an async job could not be read within server.key_lookup_timeout");
            return Err(ApiError::JobsUnavailable);
        }
    };
    let Some(name) = record
        .result_name
        .as_deref()
        .filter(|_| record.status == Status::Succeeded)
    else {
        return Ok(axum::Json(summary(&record)).into_response());
    };
    // The result is sent from the result store as it is, inside the job object: exactly
    // the bytes the synchronous call would have answered.
    let reading = state
        .jobs
        .read_result(name)
        .await
        .map_err(|err| ApiError::internal(format!("reading a job's result: {err}")))?
        .ok_or_else(not_found)?;
    let mut head = serde_json::to_vec(&summary(&record)).map_err(ApiError::internal)?;
    head.pop(); // the closing brace
    head.extend_from_slice(b",\"result\":");
    let body = futures_util::stream::once(async move { Ok(Bytes::from(head)) })
        .chain(reading.body.into_data_stream())
        .chain(futures_util::stream::once(async {
            Ok::<_, axum::Error>(Bytes::from_static(b"}"))
        }));
    let mut response = Response::new(Body::from_stream(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefer(values: &[&str]) -> bool {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append("prefer", HeaderValue::from_str(value).expect("value"));
        }
        prefers_async(&headers)
    }

    #[test]
    fn respond_async_is_read_from_well_formed_preferences_only() {
        assert!(prefer(&["respond-async"]));
        assert!(prefer(&["wait=100, Respond-Async"]));
        assert!(prefer(&[
            "return=minimal; foo=\"some parameter\"",
            "respond-async"
        ]));
        assert!(!prefer(&[]));
        assert!(!prefer(&["wait=10"]));
        assert!(!prefer(&["respond-asynchronously"]));
        // Malformed: the whole header counts as absent.
        for malformed in [
            "respond-async, @",
            "respond-async;",
            "=x, respond-async",
            "respond-async=\"x",
        ] {
            assert!(!prefer(&[malformed]), "{malformed}");
        }
        assert!(
            !prefer(&["respond-async", "a b"]),
            "one malformed value of several"
        );
    }
}
