//! The quotas every key shares (JSON bodies in memory, the upload spool) hold at most
//! `limits.max_share_per_key` for one key: one key trickling many bodies, or stalling many
//! uploads, is refused with its own 429 while another key's calls are still answered.

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncWriteExt, split};
use tokio::net::TcpStream;

use crate::support::forms::Form;
use crate::support::raw::{self, RawResponse, read_response};
use crate::support::*;

const EDITS: &str = "/v1/images/edits";
/// `server.max_json_edit_body_bytes` by default.
const JSON_EDIT_LIMIT: usize = 22_020_096;
/// A quarter (the default share) of `server.json_memory_max_bytes` by default (512 MiB).
const JSON_SHARE: usize = 134_217_728;

/// A second key on `gw`, beside its own.
async fn other_key(gw: &TestGateway) -> String {
    let other = imagegate::auth::issue_key("other-svc");
    gw.store
        .create_key(other.new.clone())
        .await
        .expect("create key");
    other.key
}

fn json_edit() -> String {
    json!({
        "model": "gpt-image-1",
        "prompt": "fox",
        "images": [{"image_url": format!("data:image/png;base64,{PNG_B64}")}],
    })
    .to_string()
}

/// The head of a JSON edit with `key` whose body comes chunked: no Content-Length, so its
/// size is not known until it has all arrived.
fn chunked_head(key: &str) -> String {
    format!(
        "POST {EDITS} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    )
}

fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

/// A JSON edit sent chunked with `key`, whole, and its answer.
async fn chunked_edit(gw: &TestGateway, key: &str) -> RawResponse {
    let mut socket = raw::connect(gw.addr).await;
    let mut request = chunked_head(key).into_bytes();
    request.extend(chunk(json_edit().as_bytes()));
    request.extend_from_slice(b"0\r\n\r\n");
    socket.write_all(&request).await.expect("request");
    read_response(&mut socket, Duration::from_secs(10)).await
}

/// The answer on `socket`, if one comes within `within`.
async fn answer_within(socket: &mut TcpStream, within: Duration) -> Option<RawResponse> {
    tokio::time::timeout(within, read_response(socket, Duration::from_secs(3600)))
        .await
        .ok()
}

fn assert_share_refused(response: &RawResponse, code: &str) {
    assert_eq!(response.status, 429, "{}", response.head);
    let error = response.error();
    assert_eq!(error["code"], code, "{error}");
    assert_eq!(error["type"], "requests", "{error}");
    assert!(
        response
            .head
            .to_ascii_lowercase()
            .contains("retry-after: 1"),
        "{}",
        response.head
    );
}

/// The attack of issue 17: 24 JSON edits of one key, chunked, each trickled a byte at a
/// time. Before, each held the whole 21 MiB limit before a byte was read (504 MiB of 512),
/// and another key's chunked edit got 503 `server_busy`; now a chunked body holds what has
/// arrived, and one key's bodies hold at most its share.
#[tokio::test]
async fn one_keys_trickled_json_bodies_leave_other_keys_their_memory() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = TestGateway::start(Db::Sqlite, &test_config(&provider.base_url(), "")).await;
    let other = other_key(&gw).await;

    let mut trickling = Vec::new();
    for _ in 0..24 {
        let mut socket = raw::connect(gw.addr).await;
        socket
            .write_all(chunked_head(&gw.key).as_bytes())
            .await
            .expect("head");
        socket.write_all(&chunk(b"{")).await.expect("first byte");
        trickling.push(socket);
    }
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        for socket in &mut trickling {
            socket.write_all(&chunk(b" ")).await.expect("one more byte");
        }
    }
    let answer = chunked_edit(&gw, &other).await;
    assert_eq!(
        answer.status,
        200,
        "another key's chunked edit while one key trickles 24: {}\n{}",
        answer.head,
        String::from_utf8_lossy(&answer.body)
    );
    let answer = chunked_edit(&gw, &gw.key).await;
    assert_eq!(
        answer.status, 200,
        "the trickling key holds 96 bytes: {}",
        answer.head
    );

    // Bodies that declare their length hold it before it is read, within the key's share:
    // six at the limit fit in a quarter of the budget, the seventh is refused at once.
    let fitting = JSON_SHARE / JSON_EDIT_LIMIT;
    assert_eq!(fitting, 6);
    let at_the_limit = vec![b' '; JSON_EDIT_LIMIT];
    let mut declared = Vec::new();
    for _ in 0..fitting {
        declared.push(raw::stall_after(&gw, EDITS, "application/json", &at_the_limit, 1).await);
    }
    // Taken in the order sent.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut seventh = raw::stall_after(&gw, EDITS, "application/json", &at_the_limit, 1).await;
    let refused = read_response(&mut seventh, Duration::from_secs(10)).await;
    assert_share_refused(&refused, "key_memory_share_exceeded");
    for socket in &mut declared {
        assert!(
            answer_within(socket, Duration::from_millis(50))
                .await
                .is_none(),
            "the six within the share are still being read"
        );
    }

    // A chunked body of the same key grows into what its share has left, and is refused
    // as soon as it would pass it.
    let left = JSON_SHARE - fitting * JSON_EDIT_LIMIT;
    let (mut read, mut write) = split(raw::connect(gw.addr).await);
    let mut request = chunked_head(&gw.key).into_bytes();
    request.extend(chunk(&vec![b' '; left + 100_000]));
    let sending = async move {
        // The server may stop reading once it has answered.
        let _ = write.write_all(&request).await;
        write
    };
    let (refused, _write) =
        tokio::join!(read_response(&mut read, Duration::from_secs(10)), sending);
    assert_share_refused(&refused, "key_memory_share_exceeded");

    // The other key is not held back by any of it.
    let answer = chunked_edit(&gw, &other).await;
    assert_eq!(answer.status, 200, "{}", answer.head);
    let answer = gw.post_json_as(&other, EDITS, &json_edit()).await;
    assert_eq!(answer.status(), 200);
    assert_eq!(
        provider.requests().len(),
        4,
        "the refused bodies were not sent"
    );
    let refusals = gw
        .metric("imagegate_key_share_refused_total{quota=\"json_memory\"}")
        .await;
    assert!(refusals >= 2.0, "{refusals}");
    drop((trickling, declared, seventh));
    gw.shutdown().await;
}

/// Bytes in the spool folder, once they have stopped changing.
async fn settled_spool_bytes(dir: &Path) -> u64 {
    let size = || {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    };
    let mut last = size();
    let mut same = 0;
    while same < 3 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = size();
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    last
}

/// An upload whose image comes before `model`, so that it waits in the spool.
fn spooled_upload(image_bytes: usize) -> Form {
    let mut image = b"\x89PNG\r\n\x1a\n".to_vec();
    image.resize(image_bytes, 7);
    Form::new()
        .file("image", &image)
        .text("model", "gpt-image-1")
        .text("prompt", "p")
}

/// One key's stalled uploads, 90 kB spooled each, cannot fill the spool (400 kB): before,
/// four of them held 360 kB and another key's 60 kB upload got 503 `spool_full`; now the
/// key holds at most its quarter (100 kB), its other uploads get 429
/// `key_spool_share_exceeded`, and the other key's upload is answered.
#[tokio::test]
async fn one_keys_stalled_uploads_leave_other_keys_their_spool() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let config = test_config(&provider.base_url(), "").replacen(
        "[server]\n",
        "[server]\nspool_max_bytes = 400000\n",
        1,
    );
    let gw = TestGateway::start(Db::Postgres, &config).await;
    let other = other_key(&gw).await;

    let upload = spooled_upload(200_000);
    let body = upload.body();
    let mut stalled = Vec::new();
    for _ in 0..5 {
        stalled.push(raw::stall_after(&gw, EDITS, &upload.content_type(), &body, 90_000).await);
    }
    let spooled = settled_spool_bytes(&gw.spool_dir()).await;

    let answer = gw
        .post_form_as(&other, EDITS, &spooled_upload(60_000))
        .await;
    let status = answer.status();
    assert_eq!(
        status,
        200,
        "another key's upload while one key stalls five: {}",
        answer.text().await.unwrap_or_default()
    );
    assert!(
        spooled <= 100_000,
        "one key's share: {spooled} bytes spooled"
    );

    let answers = futures_util::future::join_all(
        stalled
            .iter_mut()
            .map(|socket| answer_within(socket, Duration::from_secs(2))),
    )
    .await;
    let refused: Vec<&RawResponse> = answers.iter().flatten().collect();
    assert_eq!(
        refused.len(),
        4,
        "all but the one within the share are refused"
    );
    for response in refused {
        assert_share_refused(response, "key_spool_share_exceeded");
    }
    assert_eq!(
        provider.requests().len(),
        1,
        "only the other key's upload was sent"
    );
    drop(stalled);
    gw.shutdown().await;
}
