//! The fault suite: providers that reset, hang, fail, throttle or crawl, for generations and
//! edits. Every request must get the right status, and the usage rows must match the
//! provider calls exactly: none lost, none counted twice.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

use crate::support::forms::Form;
use crate::support::*;

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Accepts, reads a little, resets the connection.
    Reset,
    /// Accepts and never answers.
    Hang,
    Status500,
    Status429,
    /// Answers 200 with a body that trickles in, within the time limit.
    SlowBody,
    /// Answers 200, then the body stalls past the provider's total timeout.
    StalledBody,
}

/// A provider on raw TCP for the faults HTTP servers will not produce; counts connections.
async fn raw_provider(fault: Fault) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    #[expect(
        clippy::disallowed_methods,
        reason = "the stand-in lives until the test process ends"
    )]
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            #[expect(
                clippy::disallowed_methods,
                reason = "one task per stand-in connection"
            )]
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let _ = socket.read(&mut buf).await;
                match fault {
                    Fault::Reset => {
                        let _ = socket.set_zero_linger();
                        drop(socket);
                    }
                    _ => {
                        // Hang: keep reading until the caller gives up.
                        while let Ok(n) = socket.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    (format!("http://{addr}/v1"), calls)
}

/// An HTTP stand-in for the faults that are answers.
async fn http_provider(fault: Fault) -> StandIn {
    StandIn::start(move |_| match fault {
        Fault::Status500 => respond(500, "text/plain", "internal error"),
        Fault::Status429 => {
            let mut r = respond(429, "application/json", r#"{"error":{"message":"slow down","type":"rate_limit_error","param":null,"code":null}}"#);
            r.headers_mut().insert("retry-after", "3".parse().expect("header"));
            r
        }
        Fault::SlowBody | Fault::StalledBody => {
            let body = image_response(1, USAGE);
            let pause = if matches!(fault, Fault::SlowBody) { 50 } else { 3000 };
            let chunks: Vec<Bytes> = body.as_bytes().chunks(body.len() / 4 + 1).map(Bytes::copy_from_slice).collect();
            let stream = futures_util::stream::iter(chunks).then(move |chunk| async move {
                tokio::time::sleep(Duration::from_millis(pause)).await;
                Ok::<_, std::io::Error>(chunk)
            });
            let mut r = respond(200, "application/json", "");
            *r.body_mut() = Body::from_stream(stream);
            r
        }
        Fault::Reset | Fault::Hang => unreachable!("raw TCP faults"),
    })
    .await
}

fn fault_config(base_url: &str) -> String {
    let extra = format!(
        r#"
[providers.faulty]
base_url = "{base_url}"
api_key_env = "TEST_PIAPI_KEY"
first_byte_timeout = "1s"
total_timeout = "2s"
breaker_failures = 1000
[models.faulty]
routes = [{{ provider = "faulty", model = "m" }}]
[pricing.faulty.m]
text_input = 5.0
cached_text_input = 1.25
image_input = 10.0
cached_image_input = 1.25
image_output = 40.0
"#
    );
    test_config(base_url, &extra)
}

fn edit_form() -> (String, Vec<u8>) {
    let form = Form::edit("faulty", "p");
    (form.content_type(), form.body())
}

/// Sends `n` generations and `n` edits; returns each response's status and whether its
/// body arrived whole.
async fn send_both(gw: &TestGateway, n: usize) -> Vec<(u16, bool, Option<String>)> {
    let mut out = Vec::new();
    for i in 0..n {
        let prompt = format!(r#"{{"model":"faulty","prompt":"p{i}"}}"#);
        let generation = gw.post_json("/v1/images/generations", &prompt);
        let (ct, body) = edit_form();
        let edit = gw
            .client
            .post(gw.url("/v1/images/edits"))
            .bearer_auth(&gw.key)
            .header("content-type", ct)
            .body(body)
            .send();
        let (generation, edit) = tokio::join!(generation, async { edit.await.expect("edit") });
        for response in [generation, edit] {
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap_or_default().to_owned());
            let whole = response.bytes().await.is_ok();
            out.push((status, whole, retry_after));
        }
    }
    out
}

#[tokio::test]
async fn every_fault_gets_its_status_and_exactly_one_row_per_provider_call() {
    const N: usize = 3;
    let mut report = Vec::new();
    for fault in [
        Fault::Reset,
        Fault::Hang,
        Fault::Status500,
        Fault::Status429,
        Fault::SlowBody,
        Fault::StalledBody,
    ] {
        let (base_url, raw_calls, standin) = match fault {
            Fault::Reset | Fault::Hang => {
                let (url, calls) = raw_provider(fault).await;
                (url, Some(calls), None)
            }
            _ => {
                let s = http_provider(fault).await;
                (s.base_url(), None, Some(s))
            }
        };
        let gw = TestGateway::start(Db::Postgres, &fault_config(&base_url)).await;
        let answers = send_both(&gw, N).await;
        let (expected_status, expected_whole) = match fault {
            Fault::Reset => (502, true),
            Fault::Hang => (504, true),
            Fault::Status500 => (502, true),
            Fault::Status429 => (429, true),
            Fault::SlowBody => (200, true),
            // The status was already sent; the body breaks off when the total timeout hits.
            Fault::StalledBody => (200, false),
        };
        for (status, whole, retry_after) in &answers {
            assert_eq!(
                (*status, *whole),
                (expected_status, expected_whole),
                "{fault:?}"
            );
            if matches!(fault, Fault::Status429) {
                assert_eq!(
                    retry_after.as_deref(),
                    Some("3"),
                    "{fault:?}: retry-after passed on"
                );
            }
        }
        let calls = match (&raw_calls, &standin) {
            (Some(calls), _) => calls.load(Ordering::SeqCst),
            (_, Some(s)) => s.requests().len(),
            _ => unreachable!(),
        };
        let rows = gw.usage_rows(calls).await;
        let ids: HashSet<&str> = rows.iter().map(|r| r.request_id.as_str()).collect();
        assert_eq!(ids.len(), rows.len(), "{fault:?}: no duplicate rows");
        assert_eq!(calls, 2 * N, "{fault:?}: one provider call per request");
        let billed: i64 = rows.iter().filter_map(|r| r.cost_nanousd).sum();
        match fault {
            Fault::SlowBody => assert_eq!(billed, 2 * N as i64 * gpt_image_1_cost(19, 1105, 765)),
            _ => assert_eq!(billed, 0, "{fault:?}: nothing billed without usage"),
        }
        report.push(format!(
            "{fault:?}: requests {}, provider calls {calls}, rows {}, duplicates {}, lost {}",
            answers.len(),
            rows.len(),
            rows.len() - ids.len(),
            calls - rows.len()
        ));
        gw.shutdown().await;
    }
    // The counts, for the record (shown with --nocapture).
    println!("{}", report.join("\n"));
}
