//! Multipart edits and variations through a real imagegate: every captured SDK upload
//! replayed part for part, the limits, malformed bodies, aborted uploads, the disk spool.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::generations::expect_error;
use crate::support::forms::Form;
use crate::support::*;
use imagegate::usage::Outcome;

/// One part of a multipart body, as a provider sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Part {
    name: String,
    filename: Option<String>,
    content_type: Option<String>,
    size: usize,
    sha256: String,
    /// The value of a text part.
    text: Option<String>,
}

async fn parse_parts(content_type: &str, body: Bytes) -> Vec<Part> {
    let boundary = multer::parse_boundary(content_type).expect("boundary");
    let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut parts = Vec::new();
    while let Some(field) = multipart.next_field().await.expect("well-formed multipart") {
        let name = field.name().unwrap_or_default().to_owned();
        let filename = field.file_name().map(str::to_owned);
        let content_type = field.content_type().map(|m| m.to_string());
        let data = field.bytes().await.expect("part data");
        parts.push(Part {
            text: filename
                .is_none()
                .then(|| String::from_utf8_lossy(&data).into_owned()),
            name,
            filename,
            content_type,
            size: data.len(),
            sha256: hex::encode(Sha256::digest(&data)),
        });
    }
    parts
}

fn content_type_of(headers: &[(String, String)]) -> String {
    headers
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.clone())
        .expect("capture has a content type")
}

fn text_part(name: &str, value: &str) -> Part {
    Part {
        name: name.into(),
        filename: None,
        content_type: None,
        size: value.len(),
        sha256: hex::encode(Sha256::digest(value.as_bytes())),
        text: Some(value.into()),
    }
}

/// What the provider must receive for a client's parts: the same parts in the same order,
/// bytes identical; `model` rewritten, the test routes' policies applied, image parts named
/// as the provider wants, octet-stream files labelled with their real type.
fn expected_parts(sent: &[Part]) -> Vec<Part> {
    let model = sent
        .iter()
        .find(|p| p.name == "model")
        .and_then(|p| p.text.clone())
        .unwrap_or_else(|| "gpt-image-1".into());
    let mut out = Vec::new();
    for part in sent {
        let mut part = part.clone();
        if model == "gpt-image-2" && part.name == "input_fidelity" {
            continue;
        }
        if part.name == "model" {
            let upstream = if model == "gpt-image-2" {
                "upstream-gpt-image-2"
            } else {
                model.as_str()
            };
            part = text_part("model", upstream);
        }
        if model == "gpt-image-2" && part.name == "moderation" {
            part = text_part("moderation", "low");
        }
        let is_image = part.name == "image" || part.name.starts_with("image[");
        if is_image && model == "gpt-image-1.5" {
            part.name = "image[]".into();
        }
        if part.filename.is_some()
            && part
                .content_type
                .as_deref()
                .is_none_or(|t| t == "application/octet-stream")
        {
            part.content_type = Some("image/png".into());
        }
        out.push(part);
    }
    let has = |name: &str| sent.iter().any(|p| p.name == name);
    if model == "gpt-image-2" && !has("moderation") {
        out.push(text_part("moderation", "low"));
    }
    if model == "gpt-image-1" && !has("quality") {
        out.push(text_part("quality", "standard"));
    }
    out
}

crate::on_both_databases!(replays_every_edit_and_variation_capture);

fn edit_sse() -> String {
    format!(
        "event: image_edit.completed\ndata: {{\"type\":\"image_edit.completed\",\"b64_json\":\"{PNG_B64}\",\"usage\":{USAGE}}}\n\n"
    )
}

async fn replays_every_edit_and_variation_capture(db: Db) {
    let provider = StandIn::start(|got| {
        let body = String::from_utf8_lossy(&got.body);
        if body.contains("name=\"stream\"\r\n\r\ntrue") {
            respond(200, "text/event-stream", edit_sse())
        } else {
            respond(200, "application/json", image_response(1, USAGE))
        }
    })
    .await;
    let gw = TestGateway::start(db, &test_config(&provider.base_url(), "")).await;
    let mut names = captures_named("_edit_");
    names.extend(captures_named("variation"));
    assert!(names.len() >= 40, "{names:?}");
    for (i, name) in names.iter().enumerate() {
        let cap = capture(name);
        let sent = parse_parts(
            &content_type_of(&cap.headers),
            Bytes::from(cap.body.clone()),
        )
        .await;
        let streamed = sent
            .iter()
            .any(|p| p.name == "stream" && p.text.as_deref() == Some("true"));
        let response = gw.replay(&cap).await;
        assert_eq!(
            response.status(),
            200,
            "{name}: {:?}",
            response.text().await
        );
        let body = response.text().await.expect("body");
        if streamed {
            assert_eq!(body, edit_sse(), "{name}");
        } else {
            assert_eq!(body, image_response(1, USAGE), "{name}");
        }
        let received = provider.requests();
        assert_eq!(received.len(), i + 1, "{name}");
        let got = received.last().expect("called");
        let endpoint = if name.contains("variation") {
            "variations"
        } else {
            "edits"
        };
        assert_eq!(got.path, format!("/v1/images/{endpoint}"), "{name}");
        assert_eq!(
            got.headers["authorization"],
            format!("Bearer {PROVIDER_KEY}")
        );
        let upstream_type = got.headers["content-type"].to_str().expect("ct").to_owned();
        let got_parts = parse_parts(&upstream_type, got.body.clone()).await;
        assert_eq!(got_parts, expected_parts(&sent), "{name}");
    }
    let rows = gw.usage_rows(names.len()).await;
    for (row, name) in rows.iter().zip(&names) {
        let endpoint = if name.contains("variation") {
            "variations"
        } else {
            "edits"
        };
        assert_eq!(row.endpoint, endpoint, "{name}");
        assert_eq!(
            (row.status, row.outcome),
            (200, Outcome::Completed),
            "{name}"
        );
        assert_eq!(
            (row.input_tokens, row.output_tokens, row.images),
            (1124, 765, 1),
            "{name}"
        );
        let expected = match row.model.as_str() {
            "gpt-image-1" => gpt_image_1_cost(19, 1105, 765),
            "gpt-image-1.5" => (19 + 1105) * 5000 + 765 * 10000,
            "gpt-image-2" => 19 * 5000 + 1105 * 8000 + 765 * 30000,
            "dall-e-2" => 20_000_000,
            other => panic!("{other}"),
        };
        assert_eq!(row.cost_nanousd, Some(expected), "{name}");
    }
    assert_eq!(gw.spool_files(), 0, "no spool file outlives its request");
    gw.shutdown().await;
}

fn png(size: usize) -> Vec<u8> {
    let mut data = PNG_SIGNATURE.to_vec();
    data.resize(size, 7);
    data
}

const LIMITS: &str = "max_images = 3\nmax_image_bytes = 100000\nmax_mask_bytes = 1000\nmax_multipart_body_bytes = 1000000\n";

fn limited_config(provider: &str) -> String {
    test_config(provider, "").replacen("[server]\n", &format!("[server]\n{LIMITS}"), 1)
}

async fn post_form(
    gw: &TestGateway,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> reqwest::Response {
    gw.client
        .post(gw.url(path))
        .bearer_auth(&gw.key)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("send")
}

#[tokio::test]
async fn limits_and_malformed_uploads_get_clear_errors_and_nothing_billed() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = TestGateway::start(Db::Postgres, &limited_config(&provider.base_url())).await;
    let path = "/v1/images/edits";
    let base = || Form::new().text("model", "gpt-image-1").text("prompt", "p");
    let cases: Vec<(&str, Form, u16, Option<&str>)> = vec![
        (
            "four images",
            base()
                .file("image[]", &png(10))
                .file("image[]", &png(10))
                .file("image[]", &png(10))
                .file("image[]", &png(10)),
            400,
            Some("image"),
        ),
        (
            "image over its limit",
            base().file("image", &png(100_001)),
            413,
            None,
        ),
        (
            "mask over its limit",
            base().file("image", &png(10)).file("mask", &png(1001)),
            413,
            None,
        ),
        ("no image", base(), 400, Some("image")),
        (
            "no prompt",
            Form::new()
                .text("model", "gpt-image-1")
                .file("image", &png(10)),
            400,
            Some("prompt"),
        ),
        (
            "empty prompt",
            Form::new().text("prompt", " ").file("image", &png(10)),
            400,
            Some("prompt"),
        ),
        (
            "n out of range",
            base().text("n", "11").file("image", &png(10)),
            400,
            Some("n"),
        ),
        (
            "whole upload over its limit",
            (0..6)
                .fold(base(), |form, i| {
                    form.text(&format!("note{i}"), "x".repeat(200_000))
                })
                .file("image", &png(10)),
            413,
            None,
        ),
        (
            "unknown model after the image",
            Form::new().file("image", &png(10)).text("model", "nope"),
            404,
            Some("model"),
        ),
    ];
    for (what, form, status, param) in cases {
        let error = expect_error(
            post_form(&gw, path, &form.content_type(), form.body()).await,
            status,
        )
        .await;
        assert_eq!(error["param"].as_str(), param, "{what}: {error}");
    }
    // The same upload, chunked: no length to check up front, so the limit cuts it off as it streams.
    let big = (0..6)
        .fold(base(), |form, i| {
            form.text(&format!("note{i}"), "x".repeat(200_000))
        })
        .file("image", &png(10));
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = big
        .body()
        .chunks(64 * 1024)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let response = gw
        .client
        .post(gw.url(path))
        .bearer_auth(&gw.key)
        .header("content-type", big.content_type())
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .expect("send");
    expect_error(response, 413).await;
    let variation = Form::new().file("image", &png(10)).file("image", &png(10));
    expect_error(
        post_form(
            &gw,
            "/v1/images/variations",
            &variation.content_type(),
            variation.body(),
        )
        .await,
        400,
    )
    .await;

    let form = base().file("image", &png(10));
    let mut truncated = form.body();
    truncated.truncate(truncated.len() - 20);
    expect_error(
        post_form(&gw, path, &form.content_type(), truncated).await,
        400,
    )
    .await;
    expect_error(
        post_form(&gw, path, "multipart/form-data", form.body()).await,
        400,
    )
    .await;
    expect_error(
        post_form(
            &gw,
            path,
            "multipart/form-data; boundary=other",
            form.body(),
        )
        .await,
        400,
    )
    .await;
    // JSON is an edit by reference (see json_edits), never a variation.
    let error = expect_error(
        post_form(&gw, path, "application/json", b"{}".to_vec()).await,
        400,
    )
    .await;
    assert_eq!(error["param"], "images");
    expect_error(
        post_form(
            &gw,
            "/v1/images/variations",
            "application/json",
            b"{}".to_vec(),
        )
        .await,
        415,
    )
    .await;
    // Declared too large: refused before a byte of the body is read.
    let response = gw
        .client
        .post(gw.url(path))
        .bearer_auth(&gw.key)
        .header("content-type", form.content_type())
        .header("content-length", "2000000")
        .body(vec![0u8; 2_000_000])
        .send()
        .await
        .expect("send");
    expect_error(response, 413).await;

    // Nothing reached the provider whole, and nothing was billed.
    assert!(
        provider.complete_requests().is_empty(),
        "no upload reached the provider whole"
    );
    let ok = base().file("image", &png(10));
    assert_eq!(
        post_form(&gw, path, &ok.content_type(), ok.body())
            .await
            .status(),
        200
    );
    gw.usage_rows(1).await;
    assert_eq!(gw.spool_files(), 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn text_held_before_the_model_is_capped_and_the_spool_has_a_quota() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    // One key may take the whole spool here: a key's share is another test's.
    let config = test_config(&provider.base_url(), "[limits]\nmax_share_per_key = 1\n").replacen(
        "[server]\n",
        "[server]\nspool_max_bytes = 50000\n",
        1,
    );
    let gw = TestGateway::start(Db::Postgres, &config).await;
    let path = "/v1/images/edits";

    // Five text parts of 250 KB before `model`: each within its own limit, 1.25 MB in all
    // held in memory while the route is unknown.
    let texts = (0..5)
        .fold(Form::new(), |form, i| {
            form.text(&format!("note{i}"), "x".repeat(250_000))
        })
        .text("model", "gpt-image-1")
        .text("prompt", "p")
        .file("image", &png(10));
    let error = expect_error(
        post_form(&gw, path, &texts.content_type(), texts.body()).await,
        400,
    )
    .await;
    assert_eq!(error["param"], "note4", "{error}");
    assert_eq!(error["code"], "text_parts_too_large", "{error}");

    // An image before `model` waits in the spool: over the quota, 503 and nothing kept.
    let spooled = |size| {
        Form::new()
            .file("image", &png(size))
            .text("model", "gpt-image-1")
            .text("prompt", "p")
    };
    let big = spooled(60_000);
    let response = post_form(&gw, path, &big.content_type(), big.body()).await;
    let error = expect_error(response, 503).await;
    assert_eq!(error["code"], "spool_full", "{error}");
    assert_eq!(error["type"], "server_error", "{error}");
    assert!(provider.requests().is_empty(), "nothing was forwarded");
    assert_eq!(gw.spool_files(), 0, "the refused upload left no file");

    // Within the quota, one after the other: each upload gives its share back when it ends.
    for _ in 0..2 {
        let fits = spooled(30_000);
        let response = post_form(&gw, path, &fits.content_type(), fits.body()).await;
        assert_eq!(response.status(), 200);
        response.bytes().await.expect("body");
    }
    let rows = gw.usage_rows(2).await;
    assert!(rows.iter().all(|row| row.status == 200), "{rows:?}");
    assert_eq!(gw.spool_files(), 0);
    gw.shutdown().await;
}

/// A provider stand-in on raw TCP that never answers: it reports each read as it happens,
/// and an empty read when the connection closes.
async fn silent_provider() -> (String, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    #[expect(
        clippy::disallowed_methods,
        reason = "the stand-in lives until the test process ends"
    )]
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let tx = tx.clone();
            #[expect(
                clippy::disallowed_methods,
                reason = "one reader per stand-in connection"
            )]
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = socket.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let _ = tx.send(buf[..n].to_vec());
                }
                let _ = tx.send(Vec::new());
            });
        }
    });
    (format!("http://{addr}/v1"), rx)
}

/// Everything one provider connection received, once it has closed.
/// Posts `form` as an edit that sends its first `split` bytes, then holds the rest back
/// until the returned sender fires.
fn post_held_back<'a>(
    gw: &'a TestGateway,
    form: &Form,
    split: usize,
) -> (
    impl std::future::Future<Output = reqwest::Result<reqwest::Response>> + 'a,
    tokio::sync::oneshot::Sender<()>,
) {
    let body = form.body();
    let (first, rest) = body.split_at(split);
    let (first, rest) = (first.to_vec(), rest.to_vec());
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(first) }).chain(
        futures_util::stream::once(async move {
            let _ = release_rx.await;
            Ok(rest)
        }),
    );
    let request = gw
        .client
        .post(gw.url("/v1/images/edits"))
        .bearer_auth(&gw.key)
        .header("content-type", form.content_type())
        .body(reqwest::Body::wrap_stream(stream))
        .send();
    (request, release_tx)
}

/// What the provider's connection carries up to and including the image's PNG signature;
/// panics when that takes over 5 s or the connection closes first.
async fn until_image_starts(seen: &mut tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) -> Vec<u8> {
    let mut got = Vec::new();
    while !got.windows(8).any(|w| w == PNG_SIGNATURE) {
        let chunk = tokio::time::timeout(Duration::from_secs(5), seen.recv())
            .await
            .expect("image bytes reach the provider in time")
            .expect("stand-in running");
        assert!(!chunk.is_empty(), "the provider connection closed early");
        got.extend_from_slice(&chunk);
    }
    got
}

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

async fn until_closed(seen: &mut tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) -> Vec<u8> {
    let mut got = Vec::new();
    loop {
        let chunk = tokio::time::timeout(Duration::from_secs(5), seen.recv())
            .await
            .expect("the provider connection closes")
            .expect("stand-in running");
        if chunk.is_empty() {
            return got;
        }
        got.extend_from_slice(&chunk);
    }
}

#[tokio::test]
async fn an_image_over_the_limit_aborts_the_upstream_request_already_started() {
    let (provider, mut seen) = silent_provider().await;
    let gw = TestGateway::start(Db::Sqlite, &limited_config(&provider)).await;
    // model first: imagegate starts the provider request while the image is arriving.
    let form = Form::new()
        .text("model", "gpt-image-1")
        .text("prompt", "p")
        .file("image", &png(300_000));
    let image_at = form
        .body()
        .windows(8)
        .position(|w| w == PNG_SIGNATURE)
        .expect("image");
    let (request, release_tx) = post_held_back(&gw, &form, image_at + 50_000);
    let provider_side = async {
        let mut got = until_image_starts(&mut seen).await;
        // The provider request has started; now the client sends the part that crosses the limit.
        release_tx.send(()).expect("release");
        got.extend_from_slice(&until_closed(&mut seen).await);
        got
    };
    let (response, got) = tokio::join!(request, provider_side);
    expect_error(response.expect("response"), 413).await;
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("POST /v1/images/edits"),
        "the provider request had started"
    );
    assert!(
        !text.contains("--\r\n0\r\n\r\n"),
        "the body was never completed"
    );
    assert!(
        got.len() < 150_000,
        "the rest of the upload was not forwarded ({} bytes)",
        got.len()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(all_rows(&*gw.store).await.is_empty(), "nothing billed");
    assert_eq!(
        gw.unresolved_intents(),
        Vec::<String>::new(),
        "the abandoned call's intent is cancelled: no interrupted row at the next start"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_client_abort_cancels_the_upstream_request_and_leaves_no_spool_file() {
    let (provider, mut seen) = silent_provider().await;
    let gw = TestGateway::start(Db::Postgres, &test_config(&provider, "")).await;
    for model_first in [true, false] {
        let form = if model_first {
            Form::new()
                .text("model", "gpt-image-1")
                .text("prompt", "p")
                .file("image", &png(200_000))
        } else {
            Form::new()
                .text("prompt", "p")
                .file("image", &png(200_000))
                .text("model", "gpt-image-1")
        };
        let body = form.body();
        let mut socket = TcpStream::connect(gw.addr).await.expect("connect");
        let head = format!(
            "POST /v1/images/edits HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-type: {}\r\ncontent-length: {}\r\n\r\n",
            gw.key,
            form.content_type(),
            body.len()
        );
        socket.write_all(head.as_bytes()).await.expect("head");
        socket
            .write_all(&body[..150_000])
            .await
            .expect("half the body");
        // Wait until imagegate has the upload in hand (spooling, or streaming upstream).
        tokio::time::sleep(Duration::from_millis(300)).await;
        if !model_first {
            assert_eq!(
                gw.spool_files(),
                1,
                "image before model: the image waits on disk"
            );
        }
        drop(socket);
        if model_first {
            let got = until_closed(&mut seen).await;
            assert!(String::from_utf8_lossy(&got).starts_with("POST /v1/images/edits"));
            assert!(got.len() < 200_000);
        }
        let mut cleaned = false;
        for _ in 0..50 {
            if gw.spool_files() == 0 {
                cleaned = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(cleaned, "the spool file was removed");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        all_rows(&*gw.store).await.is_empty(),
        "no billed row for an aborted upload"
    );
    assert_eq!(
        gw.unresolved_intents(),
        Vec::<String>::new(),
        "the abandoned call's intent is cancelled: no interrupted row at the next start"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn model_first_streams_without_disk_and_the_provider_sees_bytes_before_the_upload_ends() {
    let (provider, mut seen) = silent_provider().await;
    let gw = TestGateway::start(Db::Sqlite, &test_config(&provider, "")).await;
    let form = Form::new()
        .text("model", "gpt-image-1")
        .text("prompt", "p")
        .file("image", &png(1_000_000));
    let (request, release_tx) = post_held_back(&gw, &form, 600_000);
    let watch = async {
        // While the client still holds back the end of its upload, the provider's
        // connection already carries the image's first bytes.
        until_image_starts(&mut seen).await;
        assert_eq!(gw.spool_files(), 0, "model first: nothing touches the disk");
        release_tx.send(()).expect("release");
    };
    // The silent provider never answers, so the request itself does not finish here.
    let (response, ()) = tokio::join!(
        tokio::time::timeout(Duration::from_millis(1500), request),
        watch
    );
    assert!(response.is_err());
    gw.shutdown().await;
}

#[tokio::test]
async fn spool_files_left_by_a_crash_are_removed_at_start() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = dir.path().join("spool");
    std::fs::create_dir_all(&spool).expect("mkdir");
    std::fs::write(spool.join("upload-crashed.part"), b"left over").expect("write");
    std::fs::write(spool.join("keep.txt"), b"not ours").expect("write");
    let config = test_config(&provider.base_url(), "").replacen(
        "[server]\n",
        &format!(
            "[server]\nspool_dir = \"{}\"\njournal_dir = \"{}\"\n",
            spool.display(),
            dir.path().join("journal").display()
        ),
        1,
    );
    let path = dir.path().join("imagegate.toml");
    let (_, url) = crate::support::db::fresh_postgres().await;
    let results = dir.path().join("results");
    std::fs::write(
        &path,
        format!(
            "{config}\n[results]\nurl = \"file://{}\"\n[database]\nurl = \"{url}\"\n",
            results.display()
        ),
    )
    .expect("write");
    let config = imagegate::config::Config::load(&path, &test_env()).expect("config");
    let gateway = imagegate::Gateway::start(config, test_env())
        .await
        .expect("start");
    let left: Vec<String> = std::fs::read_dir(&spool)
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name != "results")
        .collect();
    assert_eq!(left, ["keep.txt"]);
    drop(gateway);
}

#[tokio::test]
async fn fields_after_the_model_reach_the_usage_row_of_an_upload_streamed_through() {
    let provider =
        StandIn::start(|_| respond(200, "application/json", image_response(2, USAGE))).await;
    let gw = TestGateway::start(Db::Sqlite, &test_config(&provider.base_url(), "")).await;
    // `model` first: the rest streams through, and n, size and quality are read on the way
    // (the body pump hands them over when the upload ends).
    let form = Form::new()
        .text("model", "gpt-image-1")
        .file("image", &png(1_000))
        .text("prompt", "two of them")
        .text("n", "2")
        .text("size", "1536x1024")
        .text("quality", "high");
    let response = post_form(&gw, "/v1/images/edits", &form.content_type(), form.body()).await;
    assert_eq!(response.status(), 200);
    let rows = gw.usage_rows(1).await;
    let row = &rows[0];
    assert_eq!(
        (row.n, row.size.as_deref(), row.quality.as_deref()),
        (Some(2), Some("1536x1024"), Some("high"))
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn text_parts_reach_the_provider_with_their_own_headers_as_the_java_sdk_sends_them() {
    let provider =
        StandIn::start(|_| respond(200, "application/json", image_response(1, USAGE))).await;
    let gw = TestGateway::start(Db::Sqlite, &test_config(&provider.base_url(), "")).await;
    let prompt = "un renard roux, 狐狸, лиса";
    let text = |form: Form, name: &str, value: &str| {
        form.part(
            format!("form-data; name=\"{name}\"").as_bytes(),
            b"Content-Type: text/plain; charset=utf-8\r\n",
            value.as_bytes(),
        )
    };
    // The Java SDK's shape: every text part typed, the image without a filename. `model`
    // first (streamed through) and after the prompt (held until `model` arrives).
    for model_first in [true, false] {
        let mut form = Form::new();
        if model_first {
            form = text(form, "model", "gpt-image-2");
        }
        form = text(form, "prompt", prompt);
        if !model_first {
            form = text(form, "model", "gpt-image-2");
        }
        form = text(form, "n", "1");
        form = form.part(
            b"form-data; name=\"image\"",
            b"Content-Type: image/png\r\n",
            crate::support::forms::PNG,
        );
        let response = gw.post_form("/v1/images/edits", &form).await;
        assert_eq!(response.status(), 200, "model first: {model_first}");
        let got = provider
            .complete_requests()
            .pop()
            .expect("the provider got the edit");
        let content_type = got.headers["content-type"].to_str().expect("ascii");
        let parts = parse_parts(content_type, got.body.clone()).await;
        let typed = Some("text/plain; charset=utf-8".to_owned());
        let part = |name: &str| {
            parts
                .iter()
                .find(|p| p.name == name)
                .unwrap_or_else(|| panic!("no {name} part in {parts:#?}"))
        };
        assert_eq!(part("prompt").text.as_deref(), Some(prompt));
        assert_eq!(part("model").text.as_deref(), Some("upstream-gpt-image-2"));
        for name in ["prompt", "model", "n"] {
            assert_eq!(part(name).content_type, typed, "{name}: {parts:#?}");
        }
        let image = part("image");
        assert_eq!(
            (image.filename.as_deref(), image.size),
            (None, crate::support::forms::PNG.len())
        );
    }
    gw.shutdown().await;
}
