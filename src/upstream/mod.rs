//! The only code that holds a provider key or calls a provider.

mod answer;
mod mock;
mod redact;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use tokio::sync::mpsc;

use crate::config::{Config, Provider, ProviderKind};

pub use crate::config::Endpoint;

impl Endpoint {
    /// Its place in per-endpoint tables.
    fn index(self) -> usize {
        match self {
            Endpoint::Generations => 0,
            Endpoint::Edits => 1,
            Endpoint::Variations => 2,
        }
    }

    fn path(self) -> &'static str {
        match self {
            Endpoint::Generations => "images/generations",
            Endpoint::Edits => "images/edits",
            Endpoint::Variations => "images/variations",
        }
    }
}

/// What imagegate knows of a request apart from its body: enough for the usage row and
/// for the mock provider to answer in kind.
#[derive(Debug, Clone, Default)]
pub struct RequestSummary {
    pub stream: bool,
    pub n: Option<i32>,
    pub size: Option<String>,
    pub quality: Option<String>,
    pub prompt_chars: usize,
    /// `partial_images` as sent, when it was a whole number.
    pub partial_images: Option<i64>,
}

/// A request body: whole (JSON), or fed part by part through a channel (multipart).
pub enum UpstreamBody {
    Full(Bytes),
    Stream(BodyReceiver),
}

/// The feeding end of a streamed body. Dropped without [`BodySender::finish`], it fails the
/// body, so that a provider never takes a cut-off upload for a complete one.
pub struct BodySender {
    tx: mpsc::Sender<Bytes>,
    finished: Arc<AtomicBool>,
}

pub struct BodyReceiver {
    rx: mpsc::Receiver<Bytes>,
    finished: Arc<AtomicBool>,
}

/// The provider request has gone: nobody reads the body any more.
#[derive(Debug)]
pub struct BodyClosed;

pub fn body_channel(capacity: usize) -> (BodySender, UpstreamBody) {
    let (tx, rx) = mpsc::channel(capacity);
    let finished = Arc::new(AtomicBool::new(false));
    (
        BodySender {
            tx,
            finished: Arc::clone(&finished),
        },
        UpstreamBody::Stream(BodyReceiver { rx, finished }),
    )
}

impl BodySender {
    pub async fn send(&self, chunk: Bytes) -> Result<(), BodyClosed> {
        self.tx.send(chunk).await.map_err(|_| BodyClosed)
    }

    /// The body is complete: its end is a real end.
    pub fn finish(self) {
        self.finished.store(true, Ordering::Release);
    }
}

impl BodyReceiver {
    /// The next chunk; `None` at a finished end; an error when the sender went away early.
    pub async fn next(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        match self.rx.recv().await {
            Some(chunk) => Some(Ok(chunk)),
            None if self.finished.load(Ordering::Acquire) => None,
            None => Some(Err(std::io::Error::other("upload aborted"))),
        }
    }
}

impl UpstreamBody {
    fn into_reqwest(self) -> reqwest::Body {
        match self {
            UpstreamBody::Full(bytes) => reqwest::Body::from(bytes),
            UpstreamBody::Stream(rx) => reqwest::Body::wrap_stream(futures_util::stream::unfold(
                Some(rx),
                |rx| async move {
                    let mut rx = rx?;
                    match rx.next().await {
                        Some(Ok(chunk)) => Some((Ok(chunk), Some(rx))),
                        Some(Err(err)) => Some((Err(err), None)),
                        None => None,
                    }
                },
            )),
        }
    }
}

pub struct UpstreamRequest {
    pub endpoint: Endpoint,
    pub content_type: HeaderValue,
    pub body: UpstreamBody,
    /// What is known of the request when it is sent: all of it for JSON, the parts read
    /// before `model` for an upload streamed through (its pump returns the rest).
    pub summary: RequestSummary,
}

pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, UpstreamError>> + Send>>;

pub struct UpstreamResponse {
    pub status: StatusCode,
    /// Only the headers a client may see (see [`RESPONSE_HEADERS`]).
    pub headers: HeaderMap,
    pub body: BodyStream,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("connection failed: {1}")]
    Connect(Cause, String),
    #[error("timed out")]
    Timeout,
    #[error("{1}")]
    Other(Cause, String),
}

impl UpstreamError {
    /// Why no answer came, in one word a person and a dashboard can group by.
    pub fn cause(&self) -> Cause {
        match self {
            UpstreamError::Connect(cause, _) | UpstreamError::Other(cause, _) => *cause,
            UpstreamError::Timeout => Cause::Timeout,
        }
    }
}

/// Why a provider attempt got no answer: stable labels for logs, usage rows and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The provider's address refused the connection (nothing listening).
    Refused,
    /// The provider's host name did not resolve.
    Dns,
    /// The TLS handshake failed (certificate, protocol).
    Tls,
    /// No answer (or no next chunk) within the provider's timeout.
    Timeout,
    /// The connection was reset or closed before the answer ended.
    Reset,
    /// Another failure to connect.
    Connect,
    /// Anything else (a malformed answer, no client for the provider).
    Other,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Refused => "refused",
            Cause::Dns => "dns",
            Cause::Tls => "tls",
            Cause::Timeout => "timeout",
            Cause::Reset => "reset",
            Cause::Connect => "connect",
            Cause::Other => "other",
        }
    }

    /// Reads the cause off an error's chain: an I/O error's kind where there is one, else
    /// the words hyper and rustls use for DNS and TLS failures.
    fn of(err: &(dyn std::error::Error + 'static), connecting: bool) -> Cause {
        let mut next = Some(err);
        while let Some(err) = next {
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                match io.kind() {
                    std::io::ErrorKind::ConnectionRefused => return Cause::Refused,
                    std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof => return Cause::Reset,
                    std::io::ErrorKind::TimedOut => return Cause::Timeout,
                    _ => {}
                }
            }
            let text = err.to_string().to_ascii_lowercase();
            if text.contains("dns error") || text.contains("failed to lookup address") {
                return Cause::Dns;
            }
            if text.contains("certificate") || text.contains("tls") || text.contains("handshake") {
                return Cause::Tls;
            }
            next = err.source();
        }
        if connecting {
            Cause::Connect
        } else {
            Cause::Other
        }
    }
}

/// Headers of a provider's response passed on to the client. Never hop-by-hop ones,
/// never the length (a body rewritten on the way changes it).
const RESPONSE_HEADERS: [HeaderName; 3] = [
    header::CONTENT_TYPE,
    header::RETRY_AFTER,
    HeaderName::from_static("retry-after-ms"),
];

/// One HTTP client per provider, built from a configuration and replaced with it.
pub struct Upstreams {
    clients: HashMap<String, Client>,
}

/// A provider's clients with what every request to it repeats, worked out once: the
/// endpoints' URLs and the `Authorization` header.
struct Client {
    /// One per serving thread ([`crate::worker::index`]): a connection in a client's pool is served
    /// by the thread that opened it, so sharing one pool between threads would have every
    /// request wake another thread.
    per_worker: Vec<reqwest::Client>,
    /// Indexed by [`Endpoint::index`].
    urls: [reqwest::Url; 3],
    authorization: HeaderValue,
}

impl Upstreams {
    pub fn build(config: &Config) -> anyhow::Result<Self> {
        let mut clients = HashMap::new();
        for (name, provider) in &config.providers {
            let ProviderKind::OpenAi {
                base_url, api_key, ..
            } = &provider.kind
            else {
                continue;
            };
            let per_worker = (0..config.server.workers.max(1))
                .map(|_| {
                    reqwest::Client::builder()
                        .connect_timeout(provider.connect_timeout)
                        .user_agent(concat!("imagegate/", env!("CARGO_PKG_VERSION")))
                        .pool_idle_timeout(std::time::Duration::from_secs(90))
                        // A provider's redirect is its error: following it would resend the
                        // upload, and the key, somewhere the configuration does not name.
                        .redirect(reqwest::redirect::Policy::none())
                        .build()
                })
                .collect::<Result<Vec<_>, _>>()?;
            let url = |endpoint: Endpoint| base_url.join(endpoint.path());
            let mut authorization = HeaderValue::try_from(format!("Bearer {}", api_key.expose()))
                .map_err(|_| {
                anyhow::anyhow!("provider {name}: the API key is not a valid header value")
            })?;
            authorization.set_sensitive(true);
            clients.insert(
                name.clone(),
                Client {
                    per_worker,
                    urls: [
                        url(Endpoint::Generations)?,
                        url(Endpoint::Edits)?,
                        url(Endpoint::Variations)?,
                    ],
                    authorization,
                },
            );
        }
        Ok(Upstreams { clients })
    }

    /// Sends one request and returns as soon as the provider's status and headers arrive;
    /// the body follows as a stream.
    pub async fn send(
        &self,
        provider: &Provider,
        request: UpstreamRequest,
    ) -> Result<UpstreamResponse, UpstreamError> {
        if let ProviderKind::Mock { delay } = &provider.kind {
            // Boxed, so that a real provider's call does not carry the mock's state.
            return Ok(Box::pin(mock::answer(*delay, request)).await);
        }
        let client = self.clients.get(&provider.name).ok_or_else(|| {
            UpstreamError::Other(
                Cause::Other,
                format!("no client for provider {}", provider.name),
            )
        })?;
        let http = &client.per_worker[crate::worker::index() % client.per_worker.len()];
        // The attempt's span (the caller's current one): the provider continues its trace.
        let trace = crate::telemetry::trace_headers(&tracing::Span::current());
        let response = http
            .post(client.urls[request.endpoint.index()].clone())
            .headers(trace)
            .header(header::AUTHORIZATION, client.authorization.clone())
            .header(header::CONTENT_TYPE, request.content_type)
            .header(header::ACCEPT, "application/json, text/event-stream")
            .timeout(provider.total_timeout)
            .body(request.body.into_reqwest())
            .send()
            .await
            .map_err(classify)?;
        let mut headers = HeaderMap::new();
        for name in RESPONSE_HEADERS {
            if let Some(value) = response.headers().get(&name) {
                headers.insert(name, value.clone());
            }
        }
        Ok(UpstreamResponse {
            status: response.status(),
            headers,
            body: response.bytes_stream().map_err(classify).boxed(),
        })
    }
}

fn classify(err: reqwest::Error) -> UpstreamError {
    if err.is_timeout() {
        UpstreamError::Timeout
    } else if err.is_connect() {
        UpstreamError::Connect(Cause::of(&err, true), crate::error::root_cause(&err))
    } else {
        UpstreamError::Other(Cause::of(&err, false), crate::error::root_cause(&err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_closed_port_reads_refused() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let err = reqwest::Client::new()
            .get(format!("http://{addr}/"))
            .send()
            .await
            .unwrap_err();
        let err = classify(err);
        assert!(matches!(err, UpstreamError::Connect(..)), "{err:?}");
        assert_eq!(err.cause(), Cause::Refused);
    }

    #[tokio::test]
    async fn a_connection_closed_mid_answer_reads_reset() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = socket.read(&mut buf).await;
            let head = "HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial";
            socket.write_all(head.as_bytes()).await.unwrap();
        };
        let client = reqwest::Client::new();
        let (response, ()) = tokio::join!(client.get(format!("http://{addr}/")).send(), server);
        let response = response.unwrap();
        let err = classify(response.bytes().await.unwrap_err());
        assert_eq!(err.cause(), Cause::Reset, "{err:?}");
    }
}
