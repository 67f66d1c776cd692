//! Hostile clients: oversized headers, stalled uploads, invalid UTF-8, header injection in
//! multipart parts, floods of tiny parts, endless part headers, deeply nested JSON. Each
//! gets a clear error, nothing panics, nothing is billed or left behind, the server stays
//! up, and no response carries the provider's key.

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::generations::expect_error;
use crate::support::forms::{BOUNDARY, Form, PNG, content_type};
use crate::support::raw::{
    assert_timed_out, assert_upload_broke_off, connect, healthy, read_response, stall_after,
};
use crate::support::*;

async fn post_form(gw: &TestGateway, path: &str, body: Vec<u8>) -> reqwest::Response {
    gw.client
        .post(gw.url(path))
        .bearer_auth(&gw.key)
        .header("content-type", content_type())
        .body(body)
        .send()
        .await
        .expect("request reaches imagegate")
}

/// Reads an error response to its end and checks it is OpenAI's shape without secrets.
async fn expect_clean_error(response: reqwest::Response, status: u16) -> Value {
    let headers = format!("{:?}", response.headers());
    assert!(!headers.contains(PROVIDER_KEY), "provider key in headers");
    let error = expect_error(response, status).await;
    assert!(
        !error.to_string().contains(PROVIDER_KEY),
        "provider key leaked"
    );
    error
}

#[tokio::test]
async fn oversized_request_headers_get_431_and_the_server_stays_up() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = TestGateway::start(Db::Sqlite, &test_config(&provider.base_url(), "")).await;

    // One header larger than the server's read buffer (64 KiB): refused before any of
    // imagegate's code runs.
    let mut socket = connect(gw.addr).await;
    let head = format!(
        "POST /v1/images/generations HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\nx-big: {}\r\n\r\n",
        gw.key,
        "a".repeat(600 * 1024)
    );
    // The server may stop reading (and reset) before all of it is written.
    let _ = socket.write_all(head.as_bytes()).await;
    let response = read_response(&mut socket, Duration::from_secs(5)).await;
    assert_eq!(response.status, 431, "{}", response.head);

    // More headers than hyper takes (100).
    let mut socket = connect(gw.addr).await;
    let many: String = (0..150).map(|i| format!("x-h{i}: v\r\n")).collect();
    let head = format!("GET /v1/models HTTP/1.1\r\nhost: x\r\n{many}\r\n");
    let _ = socket.write_all(head.as_bytes()).await;
    let response = read_response(&mut socket, Duration::from_secs(5)).await;
    assert_eq!(response.status, 431, "{}", response.head);

    // A large header hyper accepts reaches imagegate, which answers in OpenAI's shape.
    let response = gw
        .client
        .post(gw.url("/v1/images/generations"))
        .header("authorization", format!("Bearer {}", "k".repeat(40 * 1024)))
        .header("content-type", "application/json")
        .body(r#"{"prompt":"p"}"#)
        .send()
        .await
        .expect("send");
    let error = expect_clean_error(response, 401).await;
    assert_eq!(error["code"], "invalid_api_key");
    assert!(error.to_string().len() < 1024, "the key is not echoed back");

    healthy(&gw).await;
    assert!(provider.requests().is_empty());
    gw.shutdown().await;
}

fn idle_config(provider: &str) -> String {
    test_config(provider, "").replacen(
        "[server]\n",
        "[server]\nrequest_body_idle_timeout = \"400ms\"\n",
        1,
    )
}

#[tokio::test]
async fn a_stalled_upload_gets_408_and_releases_everything() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = TestGateway::start(Db::Postgres, &idle_config(&provider.base_url())).await;

    // Image before model: the image waits in the spool when the client stalls.
    let spooling = Form::new()
        .text("prompt", b"p")
        .large_image()
        .text("model", b"gpt-image-1")
        .body();
    // Model first: the provider call has begun when the client stalls.
    let streaming = Form::new()
        .text("model", b"gpt-image-1")
        .text("prompt", b"p")
        .large_image()
        .body();
    for (what, body, cut, spooled) in [
        ("spooling", &spooling, 50_000, true),
        ("streaming", &streaming, 50_000, false),
    ] {
        let started = Instant::now();
        let mut socket = stall_after(&gw, "/v1/images/edits", &content_type(), body, cut).await;
        if spooled {
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(
                gw.spool_files(),
                1,
                "{what}: the image is on disk while it waits"
            );
        }
        let response = read_response(&mut socket, Duration::from_secs(5)).await;
        assert!(started.elapsed() >= Duration::from_millis(400), "{what}");
        assert_timed_out(&gw, &response, &mut socket, what).await;
    }
    // The stand-in saw the streamed upload start and break off; nothing arrived whole.
    assert_upload_broke_off(&provider).await;

    // A JSON body that stops halfway.
    let json = br#"{"model":"gpt-image-1","prompt":"a fox in the snow"}"#;
    let mut socket = stall_after(&gw, "/v1/images/generations", "application/json", json, 20).await;
    let response = read_response(&mut socket, Duration::from_secs(5)).await;
    assert_eq!(response.status, 408, "{}", response.head);
    assert_eq!(response.error()["code"], "request_timeout");

    // A slow client that keeps sending is not cut off.
    let form = Form::new()
        .text("model", b"gpt-image-1")
        .text("prompt", b"p")
        .image()
        .body();
    let mut socket = stall_after(&gw, "/v1/images/edits", &content_type(), &form, 0).await;
    for piece in form.chunks(form.len() / 4 + 1) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        socket.write_all(piece).await.expect("piece");
    }
    let response = read_response(&mut socket, Duration::from_secs(5)).await;
    assert_eq!(
        response.status,
        200,
        "{}",
        String::from_utf8_lossy(&response.body)
    );

    tokio::time::sleep(Duration::from_millis(200)).await;
    let rows = gw.usage_rows(1).await;
    assert_eq!(
        rows[0].status, 200,
        "only the slow but steady upload was billed"
    );
    healthy(&gw).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn invalid_utf8_gets_a_400_and_no_panic() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = TestGateway::start(Db::Sqlite, &test_config(&provider.base_url(), "")).await;

    for body in [
        &b"{\"model\":\"gpt-image-1\",\"prompt\":\"\xff\xfe fox\"}"[..],
        b"{\"model\":\"gpt-image-1\",\"prompt\":\"fox\",\"\xc3\x28\":1}",
        b"{\"model\":\"gpt-\xed\xa0\x80image-1\",\"prompt\":\"fox\"}",
        b"\xef\xbb\xbf{\"prompt\":\"fox\"}",
    ] {
        let response = gw
            .client
            .post(gw.url("/v1/images/generations"))
            .bearer_auth(&gw.key)
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await
            .expect("send");
        let error = expect_clean_error(response, 400).await;
        assert_eq!(error["type"], "invalid_request_error", "{error}");
    }

    let cases: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        (
            "prompt",
            Form::new()
                .text("model", b"gpt-image-1")
                .text("prompt", b"a \xff fox")
                .image()
                .body(),
            Some("prompt"),
        ),
        (
            "model",
            Form::new()
                .text("model", b"gpt-\xc0image")
                .text("prompt", b"p")
                .image()
                .body(),
            Some("model"),
        ),
        (
            "an unknown text field",
            Form::new()
                .text("model", b"gpt-image-1")
                .text("prompt", b"p")
                .text("user", b"\x80\x81")
                .image()
                .body(),
            Some("user"),
        ),
        (
            "filename",
            Form::new()
                .text("model", b"gpt-image-1")
                .text("prompt", b"p")
                .part(
                    b"form-data; name=\"image\"; filename=\"\xff\xfe.png\"",
                    b"Content-Type: image/png\r\n",
                    PNG,
                )
                .body(),
            None,
        ),
        (
            "part name",
            Form::new()
                .text("model", b"gpt-image-1")
                .text("prompt", b"p")
                .part(b"form-data; name=\"\xe9t\xe9\"", b"", b"x")
                .image()
                .body(),
            None,
        ),
    ];
    for (what, body, param) in cases {
        for path in ["/v1/images/edits", "/v1/images/variations"] {
            let error = expect_clean_error(post_form(&gw, path, body.clone()).await, 400).await;
            if path.ends_with("edits") {
                assert_eq!(error["param"].as_str(), param, "{what}: {error}");
            }
        }
    }
    assert!(
        provider.complete_requests().is_empty(),
        "nothing reached the provider"
    );
    assert!(all_rows(&*gw.store).await.is_empty());
    assert_eq!(gw.spool_files(), 0);
    healthy(&gw).await;
    gw.shutdown().await;
}

/// The parts of a multipart body as raw header lines and values, split on `boundary`.
fn raw_parts(content_type: &str, body: &[u8]) -> Vec<(Vec<String>, Bytes)> {
    let boundary = multer::parse_boundary(content_type).expect("boundary");
    let delimiter = format!("--{boundary}");
    let text = body.to_vec();
    let mut parts = Vec::new();
    let mut rest = &text[..];
    let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).position(|w| w == needle);
    let start = find(rest, delimiter.as_bytes()).expect("first delimiter");
    rest = &rest[start + delimiter.len()..];
    while rest.starts_with(b"\r\n") {
        rest = &rest[2..];
        let head_end = find(rest, b"\r\n\r\n").expect("part head");
        let head = String::from_utf8(rest[..head_end].to_vec()).expect("UTF-8 head");
        rest = &rest[head_end + 4..];
        let end = find(rest, format!("\r\n{delimiter}").as_bytes()).expect("part end");
        parts.push((
            head.split("\r\n").map(str::to_owned).collect(),
            Bytes::copy_from_slice(&rest[..end]),
        ));
        rest = &rest[end + 2 + delimiter.len()..];
    }
    assert!(rest.starts_with(b"--"), "closing delimiter");
    parts
}

#[tokio::test]
async fn header_injection_in_part_names_and_filenames_reaches_no_header_upstream() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = TestGateway::start(Db::Sqlite, &test_config(&provider.base_url(), "")).await;
    let evil_name =
        br#"form-data; name="image"; filename="a\"; name=\"model\"\r\nX-Injected: 1.png""#;
    let form = Form::new()
        .text("model", b"gpt-image-1")
        .text("prompt", b"p")
        // A quote escaped the way multer reads it, with a line break spelled out.
        .part(evil_name, b"Content-Type: image/png\r\n", PNG)
        // A real extra header line on the client's part: it must stay with the client.
        .part(
            b"form-data; name=\"mask\"; filename=\"m.png\"",
            b"Content-Type: image/png; x=\"\r\nX-Injected: 2\r\nContent-Length: 1\r\n",
            PNG,
        )
        // Quotes and semicolons in a text part's name.
        .part(br#"form-data; name="user\"; filename=\"x.png""#, b"", b"u1")
        .body();
    let response = gw
        .client
        .post(gw.url("/v1/images/edits"))
        .bearer_auth(&gw.key)
        .header("content-type", content_type())
        .header("x-injected", "3")
        .body(form)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    let got = provider.complete_requests();
    assert_eq!(got.len(), 1);
    let got = &got[0];
    assert!(
        got.headers.get("x-injected").is_none(),
        "client headers stay"
    );
    let content_type = got.headers["content-type"].to_str().expect("ct");
    let parts = raw_parts(content_type, &got.body);
    let mut names = Vec::new();
    for (head, _) in &parts {
        assert!(
            head.len() <= 2
                && head[0].starts_with("Content-Disposition: form-data; name=\"")
                && head[1..].iter().all(|h| h.starts_with("Content-Type: ")),
            "part headers: {head:?}"
        );
        let disposition = &head[0];
        // Exactly the quotes imagegate wrote: around name and (for files) filename.
        let quotes = disposition.matches('"').count();
        assert!(quotes == 2 || quotes == 4, "{disposition}");
        names.push(
            disposition
                .split('"')
                .nth(1)
                .expect("a quoted name")
                .to_owned(),
        );
    }
    assert_eq!(
        names,
        [
            "model",
            "prompt",
            "image",
            "mask",
            "user%22; filename=%22x.png",
            "quality"
        ]
    );
    let image = &parts[2].0[0];
    assert!(
        image.ends_with(r#"filename="a%22; name=%22model%22%5Cr%5CnX-Injected: 1.png""#),
        "the filename stays one quoted value: {image}"
    );
    assert_eq!(parts[3].0[1], "Content-Type: image/png");
    assert_eq!(parts[0].1, "gpt-image-1");
    gw.usage_rows(1).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn floods_of_tiny_parts_and_endless_part_headers_are_refused_early() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = TestGateway::start(Db::Sqlite, &test_config(&provider.base_url(), "")).await;

    for model_first in [false, true] {
        let mut form = Form::new();
        if model_first {
            form = form.text("model", b"gpt-image-1");
        }
        form = form.text("prompt", b"p").image();
        for i in 0..20_000 {
            form = form.text(&format!("f{i}"), b"x");
        }
        let started = Instant::now();
        let error =
            expect_clean_error(post_form(&gw, "/v1/images/edits", form.body()).await, 400).await;
        assert!(
            error["message"]
                .as_str()
                .is_some_and(|m| m.contains("Too many parts")),
            "{error}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    // A part header that never ends: refused once it passes the limit, without waiting
    // for (or holding) the rest of the upload.
    let mut body =
        format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"")
            .into_bytes();
    // Just past the 16 KiB limit, so that the server has read all that was sent when it
    // answers (a close with unread bytes would reset the connection under the answer).
    body.extend(std::iter::repeat_n(b'a', 16 * 1024 + 100));
    let sent = body.len();
    body.extend(std::iter::repeat_n(b'a', 100 * 1024 * 1024));
    let mut socket = stall_after(&gw, "/v1/images/edits", &content_type(), &body, sent).await;
    let response = read_response(&mut socket, Duration::from_secs(5)).await;
    assert_eq!(response.status, 400, "{}", response.head);
    assert!(
        response.error()["message"]
            .as_str()
            .is_some_and(|m| m.contains("headers are longer")),
        "{}",
        String::from_utf8_lossy(&response.body)
    );

    assert!(provider.complete_requests().is_empty());
    assert!(all_rows(&*gw.store).await.is_empty());
    assert_eq!(gw.spool_files(), 0);
    healthy(&gw).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn deeply_nested_json_gets_a_400_not_a_stack_overflow() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = TestGateway::start(Db::Sqlite, &test_config(&provider.base_url(), "")).await;
    // Each under the test config's 64 KiB body limit, each hundreds of times deeper than
    // serde_json's recursion limit (128).
    let depth = 30_000;
    let bodies = [
        "[".repeat(depth) + &"]".repeat(depth),
        "{\"a\":".repeat(depth / 3) + "1" + &"}".repeat(depth / 3),
        format!(
            r#"{{"prompt":"fox","user":{}1{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        ),
        // Unclosed: the parser gives up at its depth limit, not at the end of input.
        "[".repeat(60_000),
    ];
    for body in bodies {
        let response = gw.post_json("/v1/images/generations", &body).await;
        let error = expect_clean_error(response, 400).await;
        assert_eq!(error["type"], "invalid_request_error");
    }
    healthy(&gw).await;
    assert!(provider.requests().is_empty());
    gw.shutdown().await;
}
