//! Raw connections to a [`TestGateway`]: a request head written by hand, a body sent in part
//! or trickled, the response read off the socket, and whether the server closes it.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{PROVIDER_KEY, StandIn, TestGateway};

/// A response read off a raw connection.
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn error(&self) -> Value {
        let body: Value = serde_json::from_slice(&self.body).expect("JSON error body");
        for field in ["message", "type", "param", "code"] {
            assert!(
                body["error"].get(field).is_some(),
                "{field} missing: {body}"
            );
        }
        body["error"].clone()
    }
}

/// Reads one response: its head, then as many body bytes as Content-Length says.
pub async fn read_response(socket: &mut (impl AsyncRead + Unpin), within: Duration) -> RawResponse {
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                let length = head
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, v)| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + length {
                    let status = head
                        .split_whitespace()
                        .nth(1)
                        .and_then(|s| s.parse().ok())
                        .expect("status line");
                    let body = buf[end + 4..end + 4 + length].to_vec();
                    return RawResponse { status, head, body };
                }
            }
            let n = socket.read(&mut chunk).await.expect("read response");
            assert!(n > 0, "connection closed before a response: {buf:?}");
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(within, read)
        .await
        .expect("a response in time")
}

/// Whether the server closes the connection (reads EOF, or a reset) within `within`.
pub async fn closes(socket: &mut (impl AsyncRead + Unpin), within: Duration) -> bool {
    let mut chunk = [0u8; 1024];
    let until_closed = async {
        loop {
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, until_closed).await.is_ok()
}

pub async fn healthy(gw: &TestGateway) {
    let response = gw
        .client
        .get(gw.url("/healthz"))
        .send()
        .await
        .expect("server still up");
    assert_eq!(response.status(), 200);
}

pub async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.expect("connect")
}

/// The head of a `POST path` with the gateway's key, declaring a body of `length` bytes.
pub fn post_head(gw: &TestGateway, path: &str, ct: &str, length: usize) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-type: {ct}\r\ncontent-length: {length}\r\n\r\n",
        gw.key
    )
}

/// Sends a request head and the first `sent` bytes of `body` (declaring all of it), then
/// stalls.
pub async fn stall_after(
    gw: &TestGateway,
    path: &str,
    ct: &str,
    body: &[u8],
    sent: usize,
) -> TcpStream {
    let mut socket = connect(gw.addr).await;
    let head = post_head(gw, path, ct, body.len());
    socket.write_all(head.as_bytes()).await.expect("head");
    socket.write_all(&body[..sent]).await.expect("part of body");
    socket
}

/// Checks a body that took too long was answered 408 `request_timeout` in OpenAI's shape
/// without the provider's key, the connection then closed and no spool file was left.
pub async fn assert_timed_out(
    gw: &TestGateway,
    response: &RawResponse,
    socket: &mut (impl AsyncRead + Unpin),
    what: &str,
) -> Value {
    assert_eq!(response.status, 408, "{what}: {}", response.head);
    let error = response.error();
    assert_eq!(error["code"], "request_timeout", "{what}");
    assert!(!String::from_utf8_lossy(&response.body).contains(PROVIDER_KEY));
    assert!(
        closes(socket, Duration::from_secs(2)).await,
        "{what}: the connection is closed"
    );
    assert_eq!(gw.spool_files(), 0, "{what}: no spool file left");
    error
}

/// Checks the provider call an upload had begun was ended: the stand-in saw the upload
/// start and break off, and nothing arrived whole.
pub async fn assert_upload_broke_off(provider: &StandIn) {
    assert!(
        provider.wait_for_requests(1).await,
        "the provider call that had begun was ended"
    );
    assert!(provider.complete_requests().is_empty());
}
