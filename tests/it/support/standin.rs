//! Provider stand-ins: real HTTP servers on port 0 that record every request and answer
//! with a handler the test sets (and may swap or delay), plus realistic provider answers.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::response::Response;
use http::{HeaderMap, StatusCode};
use http_body_util::BodyExt;
use tokio::net::TcpListener;

/// A request as a stand-in provider received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// False when the body broke off (the sender aborted it).
    pub complete: bool,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("stand-in received JSON")
    }
}

type Handler = Arc<dyn Fn(&Received) -> Response + Send + Sync>;

/// A provider stand-in: records every request and answers with `handler`.
pub struct StandIn {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Received>>>,
    handler: Arc<Mutex<Handler>>,
    /// How long the stand-in waits before answering (before its status line).
    delay: Arc<Mutex<Duration>>,
}

impl StandIn {
    pub async fn start(handler: impl Fn(&Received) -> Response + Send + Sync + 'static) -> StandIn {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind stand-in");
        let addr = listener.local_addr().expect("stand-in address");
        let received = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Mutex<Handler>> = Arc::new(Mutex::new(Arc::new(handler)));
        let delay = Arc::new(Mutex::new(Duration::ZERO));
        let (rec, h, d) = (
            Arc::clone(&received),
            Arc::clone(&handler),
            Arc::clone(&delay),
        );
        let app = axum::Router::new().fallback(move |request: Request| {
            let (rec, h, d) = (Arc::clone(&rec), Arc::clone(&h), Arc::clone(&d));
            async move {
                let (parts, body) = request.into_parts();
                let body = body.collect().await.map(|c| c.to_bytes());
                let complete = body.is_ok();
                let body = body.unwrap_or_default();
                let got = Received {
                    complete,
                    path: parts.uri.path().to_owned(),
                    headers: parts.headers,
                    body,
                };
                let handler = Arc::clone(&*h.lock().expect("handler lock"));
                let response = handler(&got);
                rec.lock().expect("received lock").push(got);
                let delay = *d.lock().expect("delay lock");
                tokio::time::sleep(delay).await;
                response
            }
        });
        #[expect(
            clippy::disallowed_methods,
            reason = "test stand-ins live until the process ends"
        )]
        tokio::spawn(async move { axum::serve(listener, app).await.expect("stand-in serve") });
        StandIn {
            addr,
            received,
            handler,
            delay,
        }
    }

    /// A stand-in answering every request with this JSON body.
    pub async fn json(status: u16, body: &str) -> StandIn {
        let body = body.to_owned();
        StandIn::start(move |_| respond(status, "application/json", body.clone())).await
    }

    pub fn set_handler(&self, handler: impl Fn(&Received) -> Response + Send + Sync + 'static) {
        *self.handler.lock().expect("handler lock") = Arc::new(handler);
    }

    pub fn set_delay(&self, delay: Duration) {
        *self.delay.lock().expect("delay lock") = delay;
    }

    /// Waits up to two seconds until `n` requests have arrived (whole or not); false if not.
    pub async fn wait_for_requests(&self, n: usize) -> bool {
        for _ in 0..100 {
            if self.requests().len() == n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Requests whose body arrived whole.
    pub fn complete_requests(&self) -> Vec<Received> {
        self.requests().into_iter().filter(|r| r.complete).collect()
    }

    pub fn requests(&self) -> Vec<Received> {
        self.received.lock().expect("received lock").clone()
    }
}

/// A provider base URL on a port with nothing listening: bound, noted, closed.
pub fn dead_url() -> String {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    format!("http://{}/v1", closed.local_addr().expect("addr"))
}

pub fn respond(status: u16, content_type: &str, body: impl Into<Body>) -> Response {
    Response::builder()
        .status(StatusCode::from_u16(status).expect("status"))
        .header("content-type", content_type)
        .body(body.into())
        .expect("response")
}

/// A realistic JSON answer: one image per `n`, then `usage`.
pub fn image_response(n: usize, usage: &str) -> String {
    let data: Vec<String> = (0..n)
        .map(|_| format!(r#"{{"b64_json":"{PNG_B64}"}}"#))
        .collect();
    format!(
        r#"{{"created":1795251252,"background":"opaque","data":[{}],"output_format":"png","quality":"low","size":"1024x1024","usage":{usage}}}"#,
        data.join(",")
    )
}

pub const PNG_B64: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";
pub const USAGE: &str = r#"{"total_tokens":1889,"input_tokens":1124,"output_tokens":765,"input_tokens_details":{"text_tokens":19,"image_tokens":1105}}"#;
