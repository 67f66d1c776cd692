//! Connections end: a body that trickles in for too long, a connection that sends nothing
//! or part of an HTTP/2 preface, a cap on open connections, and many silent connections
//! that leave the server answering.

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::helpers::*;
use crate::hostile::{RawForm, closes, connect, content_type, read_response};

/// The test configuration with these lines added to `[server]`.
fn server_config(provider: &str, lines: &str) -> String {
    test_config(provider, "").replacen("[server]\n", &format!("[server]\n{lines}\n"), 1)
}

#[tokio::test]
async fn a_body_that_keeps_trickling_past_the_total_deadline_gets_408() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = TestGateway::start(
        Db::Sqlite,
        &server_config(
            &provider.base_url(),
            "request_body_idle_timeout = \"400ms\"\nrequest_body_timeout = \"1500ms\"",
        ),
    )
    .await;
    // Model first: the provider call has begun while the client trickles the image.
    let edit = RawForm::default()
        .text("model", b"gpt-image-1")
        .text("prompt", b"p")
        .part(
            b"form-data; name=\"image\"; filename=\"a.png\"",
            b"Content-Type: image/png\r\n",
            &[7u8; 100_000],
        )
        .done();
    let json = br#"{"model":"gpt-image-1","prompt":"a fox in the snow, slowly"}"#.to_vec();
    for (what, path, ct, body, at_once) in [
        ("edit", "/v1/images/edits", content_type(), edit, 50_000),
        (
            "generation",
            "/v1/images/generations",
            "application/json".to_owned(),
            json,
            20,
        ),
    ] {
        let mut socket = connect(gw.addr).await;
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-type: {ct}\r\ncontent-length: {}\r\n\r\n",
            gw.key,
            body.len()
        );
        socket.write_all(head.as_bytes()).await.expect("head");
        socket
            .write_all(&body[..at_once])
            .await
            .expect("body's start");
        let started = Instant::now();
        let (mut reader, mut writer) = socket.split();
        // A byte every 100 ms: never idle for 400 ms, never done within the test.
        let trickle = async {
            for byte in body[at_once..].chunks(1) {
                if writer.write_all(byte).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            std::future::pending::<()>().await;
        };
        let response = tokio::select! {
            response = read_response(&mut reader, Duration::from_secs(10)) => response,
            () = trickle => unreachable!("the trickle never ends"),
        };
        let took = started.elapsed();
        assert_eq!(response.status, 408, "{what}: {}", response.head);
        assert!(took >= Duration::from_millis(1500), "{what}: {took:?}");
        assert!(took < Duration::from_secs(5), "{what}: {took:?}");
        let error = response.error();
        assert_eq!(error["code"], "request_timeout", "{what}");
        assert!(
            error["message"]
                .as_str()
                .unwrap_or_default()
                .contains("took too long"),
            "{what}: {error}"
        );
        assert!(
            closes(&mut reader, Duration::from_secs(2)).await,
            "{what}: the connection is closed"
        );
        assert_eq!(gw.spool_files(), 0, "{what}: no spool file left");
    }
    // The provider call the edit had begun was ended: the stand-in saw its upload break off.
    let mut broken_off = false;
    for _ in 0..100 {
        if provider.requests().len() == 1 {
            broken_off = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(broken_off, "the provider call that had begun was ended");
    assert!(provider.complete_requests().is_empty());
    crate::hostile::healthy(&gw).await;
    gw.shutdown().await;
}
