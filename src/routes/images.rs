//! The image endpoints: extract, route, forward.

use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tracing::Instrument;

use crate::auth::Principal;
use crate::body_timeout::{BodyTimeouts, declared_length, timeout_in, with_timeouts};
use crate::config::{Model, Route};
use crate::dedupe::{self, Dedupe, Fingerprint, KeepTicket};
use crate::error::ApiError;
use crate::limits::{QuotaHold, QuotaLimit, QuotaRefusal};
use crate::multipart::{SpoolArea, Upload};
use crate::openai::edit::parse_json_edit;
use crate::openai::generation::GenerationRequest;
use crate::routes::jobs::{self, JobRequest};
use crate::routing::{Call, CostGuard, Prepared, RequestSource};
use crate::state::{AppState, RequestId, Runtime};
use crate::upstream::{Endpoint, RequestSummary, UpstreamBody, UpstreamRequest};

pub async fn generations(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    json_call(
        state,
        principal,
        request_id,
        Endpoint::Generations,
        headers,
        body,
    )
    .await
}

/// A generation, or an edit sent as JSON (its images are references, not uploads): the
/// whole body is read, checked, routed by its `model`, and rewritten for each route.
async fn json_call(
    state: Arc<AppState>,
    principal: Arc<Principal>,
    request_id: RequestId,
    endpoint: Endpoint,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    recording(&state)?;
    let runtime = state.runtime.load_full();
    let server = &runtime.config.server;
    let limit = match endpoint {
        Endpoint::Edits => server.max_json_edit_body_bytes,
        _ => server.max_json_body_bytes,
    };
    let quota = QuotaLimit::shared(
        server.json_memory_max_bytes.get() as u64,
        runtime.config.limits.max_share_per_key,
    );
    let mut memory = state.json_memory.empty_hold(principal.key_id, quota);
    let bytes = read_json(&headers, body, limit.get(), &mut memory).await?;
    let request = match endpoint {
        Endpoint::Edits => parse_json_edit(&bytes, server.uploads.max_images)?,
        _ => GenerationRequest::parse(&bytes)?,
    };
    let model = resolve(&runtime, &principal, request.model(), endpoint)?;
    let fingerprint = Dedupe::fingerprint(
        principal.key_id,
        endpoint,
        idempotency_key(&headers),
        &bytes,
    );
    // The parsed body is what is sent from here on: a large JSON edit (inline `data:`
    // images) is not held twice for the whole call.
    drop(bytes);
    let stream = request.stream();
    let mut call = Call {
        state,
        runtime,
        principal,
        request_id,
        model,
        endpoint,
        keep: None,
        job: None,
    };
    let source = JsonSource {
        endpoint,
        body: request.body,
        _memory: memory,
    };
    if jobs::prefers_async(&headers) {
        let job = JobRequest {
            fingerprint: Some(fingerprint),
            retry: Dedupe::is_retry(&headers),
            stream,
        };
        // Boxed: its future is several times the size of the rest of this one, and every
        // request in flight, async or not, would hold that much for its whole call.
        return Box::pin(jobs::submit(call, source, job)).await;
    }
    call.keep = match claim(&call, &headers, fingerprint).await {
        Ok(keep) => keep,
        Err(kept) => return Ok(kept),
    };
    release_head(headers);
    detached(call, source).await
}

/// Drops the request's headers before the wait for the provider. hyper parses a request
/// head without copying it: each header value is a view into the connection's read
/// buffer (8 KiB), and while one view lives that buffer stays allocated beside the one the
/// connection reads into next. What the call needs later was copied out by now (ids, the
/// key, the idempotency key's fingerprint, the trace context), so a call the provider holds
/// for a minute no longer holds the head's buffer too.
fn release_head(headers: HeaderMap) {
    drop(headers);
}

/// Refuses a billable request while its usage could not be journaled: it would be a
/// provider call imagegate might not be able to account for.
fn recording(state: &AppState) -> Result<(), ApiError> {
    match state.usage.unavailable() {
        None => Ok(()),
        Some(reason) => {
            tracing::warn!(%reason, "refusing a billable request: the usage journal cannot be written");
            Err(ApiError::UsageJournalUnavailable)
        }
    }
}

/// The image routes' layer: their request bodies fail with 408 when the client stops
/// sending (`server.request_body_idle_timeout`) or takes too long in all
/// (`server.request_body_timeout`), and what a handler leaves unread is discarded after it
/// (see [`crate::body_timeout`]). Timed from when the request passed authentication.
pub async fn body_timeouts(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let limits = {
        let server = &state.runtime.load().config.server;
        BodyTimeouts {
            idle: server.request_body_idle_timeout,
            total: server.request_body_timeout,
        }
    };
    next.run(request.map(|body| with_timeouts(body, limits)))
        .await
}

fn idempotency_key(headers: &HeaderMap) -> Option<&str> {
    headers.get("idempotency-key").and_then(|v| v.to_str().ok())
}

/// Registers the request against duplicates. A retry of a call still running, or whose
/// result was kept, on this replica or another, is answered from it; otherwise the request
/// goes on as an original.
async fn claim(
    call: &Call,
    headers: &HeaderMap,
    fingerprint: Fingerprint,
) -> Result<Option<KeepTicket>, Response> {
    let Call {
        state,
        model,
        endpoint,
        request_id,
        ..
    } = call;
    let serving = || model.routes.iter().filter(|r| r.serves(*endpoint));
    // As long as the first route that serves the endpoint may take.
    let wait = serving()
        .next()
        .map_or(Duration::from_secs(600), |r| r.provider.total_timeout);
    // Every route the call may fail over to, then the wait of a retry that joined it late.
    let running = serving()
        .take(model.failover.max_attempts.get())
        .map(|r| r.provider.total_timeout)
        .sum::<Duration>()
        + wait;
    let limits = dedupe::Limits { wait, running };
    state
        .dedupe
        .claim(
            fingerprint,
            dedupe::Retry::of(headers),
            &request_id.0,
            limits,
        )
        .await
}

/// Runs the provider call on a tracked task, so that it completes (and its usage is
/// recorded) even when the client goes away while waiting: the provider bills it anyway.
async fn detached(
    call: Call,
    mut source: impl RequestSource + 'static,
) -> Result<Response, ApiError> {
    let tasks = call.state.tasks.clone();
    // In the request's span, which the provider attempts' spans are children of.
    tasks
        .spawn(async move { call.forward(&mut source).await }.in_current_span())
        .await
        .map_err(ApiError::internal)?
}

/// A generation's or JSON edit's body, rewritten for each route it is sent to.
struct JsonSource {
    endpoint: Endpoint,
    body: serde_json::Map<String, serde_json::Value>,
    /// The body's part of `server.json_memory_max_bytes`, held as long as the body is.
    _memory: QuotaHold,
}

#[async_trait::async_trait]
impl RequestSource for JsonSource {
    async fn prepare(
        &mut self,
        route: &Route,
        _attempt: usize,
        _cost: CostGuard,
    ) -> Result<Prepared, ApiError> {
        let mut body = self.body.clone();
        body.insert("model".into(), route.upstream_model.clone().into());
        route.policy.apply(&mut body);
        let upstream = GenerationRequest { body };
        let summary = RequestSummary {
            stream: upstream.stream(),
            n: upstream.n().and_then(|n| i32::try_from(n).ok()),
            size: upstream.str_field("size").map(str::to_owned),
            quality: upstream.str_field("quality").map(str::to_owned),
            prompt_chars: upstream
                .str_field("prompt")
                .map_or(0, |p| p.chars().count()),
            partial_images: upstream.body.get("partial_images").and_then(|v| v.as_i64()),
        };
        let bytes = serde_json::to_vec(&upstream.body).map_err(ApiError::internal)?;
        Ok(Prepared {
            request: UpstreamRequest {
                endpoint: self.endpoint,
                content_type: HeaderValue::from_static("application/json"),
                body: UpstreamBody::Full(bytes.into()),
                summary,
            },
            pump: None,
        })
    }
}

/// Edits and variations, one handler (the route's [`Endpoint`] extension says which): read
/// the upload up to `model` (holding earlier parts on disk), route, then stream the rest
/// through to the provider while it arrives. An edit sent as JSON goes the way of a
/// generation instead.
pub async fn uploads(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    Extension(request_id): Extension<RequestId>,
    Extension(endpoint): Extension<Endpoint>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if endpoint == Endpoint::Edits && is_json(&headers) {
        return json_call(state, principal, request_id, endpoint, headers, body).await;
    }
    recording(&state)?;
    let runtime = state.runtime.load_full();
    let server = &runtime.config.server;
    let mut upload = Upload::new(&headers, body, endpoint, server.uploads)?;
    let spool = SpoolArea {
        dir: server.spool_dir.clone(),
        limit: QuotaLimit::shared(
            server.spool_max_bytes,
            runtime.config.limits.max_share_per_key,
        ),
        usage: state.spool.clone(),
        key_id: principal.key_id,
    };
    let requested = upload.read_until_model(&spool).await?;
    let model = resolve(&runtime, &principal, requested.as_deref(), endpoint)?;
    let serving = model.routes.iter().filter(|r| r.serves(endpoint)).count();
    let attempts = serving.min(model.failover.max_attempts.get());
    let mut call = Call {
        state,
        runtime,
        principal,
        request_id,
        model,
        endpoint,
        keep: None,
        job: None,
    };
    if jobs::prefers_async(&headers) {
        // Boxed, as in `json_call`: a synchronous edit does not hold its state.
        return Box::pin(upload_job(call, &headers, upload, &spool)).await;
    }
    // An upload's body is only known once it has streamed through, so edits are matched
    // by their idempotency key alone.
    if let Some(key) = idempotency_key(&headers) {
        let fingerprint = Dedupe::fingerprint(call.principal.key_id, endpoint, Some(key), b"");
        call.keep = match claim(&call, &headers, fingerprint).await {
            Ok(keep) => keep,
            Err(kept) => return Ok(kept),
        };
    }
    release_head(headers);
    let source = upload.into_source(&spool, attempts).await?;
    detached(call, source).await
}

/// An upload sent with `Prefer: respond-async`: received whole (into the spool, within
/// its quota) before the job is created and answered 202.
async fn upload_job(
    call: Call,
    headers: &HeaderMap,
    upload: Upload,
    spool: &SpoolArea,
) -> Result<Response, ApiError> {
    let source = upload.into_recorded(spool).await?;
    // As for the synchronous call, an upload is matched by its idempotency key alone.
    let fingerprint = idempotency_key(headers)
        .map(|key| Dedupe::fingerprint(call.principal.key_id, call.endpoint, Some(key), b""));
    let job = JobRequest {
        fingerprint,
        retry: Dedupe::is_retry(headers),
        stream: source.streamed(),
    };
    jobs::submit(call, source, job).await
}

/// The model a request names (or the default), when the key may use it and one of its
/// routes serves `endpoint`: refused otherwise before any provider is called or anything
/// is billed.
fn resolve(
    runtime: &Runtime,
    principal: &Principal,
    requested: Option<&str>,
    endpoint: Endpoint,
) -> Result<Arc<Model>, ApiError> {
    match runtime.config.resolve_model(requested) {
        Some(model) if !principal.allows(&model.name, &runtime.config.aliases) => Err(
            ApiError::ModelNotAllowed(requested.unwrap_or(&model.name).to_owned()),
        ),
        Some(model) if model.serves(endpoint) => Ok(Arc::clone(model)),
        Some(model) => Err(ApiError::InvalidRequest {
            message: format!(
                "The model `{}` does not support the `{}` endpoint here.",
                requested.unwrap_or(&model.name),
                endpoint.as_str()
            ),
            param: Some("model".into()),
            code: Some("unsupported_endpoint"),
        }),
        None => Err(match requested {
            Some(name) => ApiError::ModelNotFound(name.to_owned()),
            None => ApiError::invalid(
                "You must provide a model parameter (no default model is configured).",
                Some("model"),
            ),
        }),
    }
}

/// True when the body is declared as JSON (`application/json`, or a `+json` type).
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            let essence = ct.split(';').next().unwrap_or_default().trim();
            essence.eq_ignore_ascii_case("application/json")
                || essence.to_ascii_lowercase().ends_with("+json")
        })
}

/// Reads a JSON body up to `limit` bytes into `memory`'s part of
/// `server.json_memory_max_bytes`: a body that declares its length holds it before a byte
/// is read, one without (chunked) holds what has arrived so far, growing with each chunk,
/// so that a body trickled in holds only what it has sent. 413 beyond `limit` (at once when
/// Content-Length says so), 415 when the body is declared as something other than JSON,
/// 429 `key_memory_share_exceeded` when the key's bodies would hold more than its share,
/// 503 `server_busy` when all bodies would hold more than the whole.
async fn read_json(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    memory: &mut QuotaHold,
) -> Result<Bytes, ApiError> {
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or_default().to_ascii_lowercase();
        if !ct.starts_with("application/json") && !ct.contains("+json") {
            return Err(ApiError::UnsupportedMediaType {
                expected: "application/json",
            });
        }
    }
    let declared = declared_length(headers);
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let declared = declared.unwrap_or(0);
    memory.grow(declared).map_err(memory_refused)?;
    let mut body = Limited::new(body, limit);
    let mut bytes = BytesMut::with_capacity(usize::try_from(declared).unwrap_or(0));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|err| {
            if err.is::<LengthLimitError>() {
                return ApiError::PayloadTooLarge { limit };
            }
            match timeout_in(&*err) {
                Some(timeout) => ApiError::RequestTimeout(timeout),
                None => ApiError::invalid(format!("Could not read the request body: {err}"), None),
            }
        })?;
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        let read = (bytes.len() + chunk.len()) as u64;
        if read > memory.bytes() {
            memory.grow(read - memory.bytes()).map_err(memory_refused)?;
        }
        bytes.extend_from_slice(&chunk);
    }
    memory.shrink_to(bytes.len() as u64);
    Ok(bytes.freeze())
}

/// A JSON body's hold on memory refused: the key's share, or the whole of it.
fn memory_refused(refusal: QuotaRefusal) -> ApiError {
    match refusal {
        QuotaRefusal::KeyShare => {
            metrics::counter!("imagegate_key_share_refused_total", "quota" => "json_memory")
                .increment(1);
            ApiError::KeyMemoryShare
        }
        QuotaRefusal::Full => {
            metrics::counter!("imagegate_json_memory_full_total").increment(1);
            ApiError::JsonMemoryFull
        }
    }
}
