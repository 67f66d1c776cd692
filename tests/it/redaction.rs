//! A provider that echoes imagegate's provider key in an error, in whatever form (as sent,
//! another letter case, JSON-escaped, URL-encoded, as HTML references), never hands it to
//! a client, a job record or the log.

use std::time::Duration;

use serde_json::Value;

use crate::jobs::{accepted, wait_finished};
use crate::support::binary::{self, terminate, write_one_model_config};
use crate::support::*;

const GEN: &str = "/v1/images/generations";
const BODY: &str = r#"{"model":"gpt-image-1","prompt":"fox"}"#;

/// The provider key as a provider might echo it: what the form is, and the text.
fn key_forms() -> Vec<(&'static str, String)> {
    let key = PROVIDER_KEY;
    let each = |f: &dyn Fn(char) -> String| key.chars().map(f).collect::<String>();
    let mixed: String = key
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if i % 2 == 0 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect();
    vec![
        ("as sent", key.to_owned()),
        ("upper case", key.to_uppercase()),
        ("mixed case", mixed),
        ("\\u002d", key.replace('-', "\\u002d")),
        (
            "every character \\uXXXX",
            each(&|c| format!("\\u{:04X}", u32::from(c))),
        ),
        (
            "every character %XX",
            each(&|c| format!("%{:02x}", u32::from(c))),
        ),
        ("%2D", key.replace('-', "%2D")),
        ("%2D, upper case", key.to_uppercase().replace('-', "%2D")),
        ("%252D (encoded twice)", key.replace('-', "%252D")),
        ("&#45;", key.replace('-', "&#45;")),
    ]
}

/// Error bodies echoing `form`: JSON (the form inside a JSON string, so `\u` escapes are
/// the JSON's own), plain text, and HTML with the key in a URL's query.
fn echoing_bodies(form: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "application/json",
            format!(
                r#"{{"error":{{"message":"Incorrect API key provided: {form}.","type":"invalid_request_error","param":null,"code":"invalid_api_key","key":"{form}"}}}}"#
            ),
        ),
        ("text/plain", format!("bad key {form}")),
        (
            "text/html",
            format!("<a href=\"https://provider.example/keys?key={form}\">check your key</a>"),
        ),
    ]
}

/// `%XX` sequences as the bytes they stand for (`+` as a space).
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `\uXXXX` escapes and HTML character references (`&#45;`, `&#x2d;`) as their characters.
fn unescaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        let escape = if let Some(hex) = rest.strip_prefix("\\u").and_then(|r| r.get(..4)) {
            u32::from_str_radix(hex, 16).ok().map(|n| (n, 6))
        } else if let Some(r) = rest.strip_prefix("&#") {
            let (radix, digits) = match r.strip_prefix(['x', 'X']) {
                Some(hex) => (16, hex),
                None => (10, r),
            };
            digits.split_once(';').and_then(|(n, _)| {
                let taken = rest.len() - digits.len() + n.len() + 1;
                u32::from_str_radix(n, radix).ok().map(|n| (n, taken))
            })
        } else {
            None
        };
        match escape.and_then(|(n, taken)| char::from_u32(n).map(|c| (c, taken))) {
            Some((decoded, taken)) => {
                out.push(decoded);
                rest = &rest[taken..];
            }
            None => {
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    out
}

/// Where `text` holds the provider key in a form a reader can decode: as it is, in any
/// letter case, in a JSON string once parsed, percent-decoded, unescaped, or several of
/// these in turn. None when it does not.
fn key_in(text: &str) -> Option<String> {
    let key = PROVIDER_KEY.to_lowercase();
    let mut texts = vec![text.to_owned()];
    if let Ok(json) = serde_json::from_str::<Value>(text) {
        let mut stack = vec![json];
        while let Some(value) = stack.pop() {
            match value {
                Value::String(s) => texts.push(s),
                Value::Array(items) => stack.extend(items),
                Value::Object(members) => {
                    texts.extend(members.keys().cloned());
                    stack.extend(members.into_iter().map(|(_, v)| v));
                }
                _ => {}
            }
        }
    }
    for text in texts {
        let mut decoded = text;
        for _ in 0..4 {
            if decoded.to_lowercase().contains(&key) {
                return Some(decoded);
            }
            decoded = unescaped(&percent_decoded(&decoded));
        }
    }
    None
}

#[test]
fn the_checks_own_decoding_finds_every_form() {
    for (what, form) in key_forms() {
        for (content_type, body) in echoing_bodies(&form) {
            assert!(key_in(&body).is_some(), "{what} in {content_type}: {body}");
        }
    }
    assert_eq!(key_in("[redacted] %2D \\u0041 &#65;"), None);
}

/// Every form, in every kind of body, at a status the client sees the provider's error
/// for (400), one imagegate turns into 502 with the provider's message (500), and one it
/// keeps to its log (401): the clients' bodies, an async job's stored row and what a poll
/// of it returns, and the log never hold the key in any form.
#[tokio::test]
async fn a_provider_key_echoed_in_any_form_reaches_no_client_no_job_record_and_no_log() {
    let provider = StandIn::json(200, "{}").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let database_url = format!("sqlite:{}", dir.path().join("imagegate.db").display());
    let config = write_one_model_config(
        dir.path(),
        &database_url,
        "5s",
        (
            "standin",
            &format!(
                "base_url = \"{}\"\napi_key_env = \"TEST_PIAPI_KEY\"",
                provider.base_url()
            ),
        ),
        "",
    );
    let key = binary::create_key(&config, "svc");
    let store = imagegate::store::connect(&database_url)
        .await
        .expect("store");
    let mut serve = binary::command(&config);
    serve
        .arg("serve")
        .env("TEST_PIAPI_KEY", PROVIDER_KEY)
        .env("RUST_LOG", "imagegate=debug,info");
    let (mut child, addr, log) = binary::serve(serve).await.into_parts();
    let base = format!("http://{addr}");
    let client = reqwest::Client::new();
    let post = |job: bool| {
        let mut request = client
            .post(format!("{base}{GEN}"))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(BODY);
        if job {
            request = request.header("prefer", "respond-async");
        }
        request.send()
    };

    let mut leaks = Vec::new();
    for (what, form) in key_forms() {
        for (content_type, body) in echoing_bodies(&form) {
            for status in [400, 401, 500] {
                let body = body.clone();
                provider.set_handler(move |_| respond(status, content_type, body.clone()));
                let response = post(false).await.expect("send");
                let got = response.status().as_u16();
                let text = response.text().await.expect("body");
                assert_eq!(got, if status == 400 { 400 } else { 502 }, "{text}");
                if let Some(found) = key_in(&text) {
                    leaks.push(format!(
                        "{what}, {content_type} {status}: client got {found}"
                    ));
                } else if (status, content_type) == (400, "application/json") {
                    // What is left still says what happened.
                    let error: Value = serde_json::from_str(&text).expect("json");
                    assert_eq!(
                        error["error"]["message"], "Incorrect API key provided: [redacted].",
                        "{what}"
                    );
                    assert_eq!(error["error"]["code"], "invalid_api_key");
                }
            }
            // The same error as an async job: its record on disk and what a poll returns.
            let body = body.clone();
            provider.set_handler(move |_| respond(400, content_type, body.clone()));
            let (id, _) = accepted(post(true).await.expect("send")).await;
            let (job, polled) = wait_finished(&client, &base, &key, &id).await;
            assert_eq!(job["status"], "failed", "{job}");
            let record = finished_record(&*store, &id).await;
            for (place, text) in [("poll", &polled), ("record", &record)] {
                if let Some(found) = key_in(text) {
                    leaks.push(format!("{what}, {content_type} job {place}: {found}"));
                }
            }
        }
    }
    assert!(
        terminate(&mut child, Duration::from_secs(10))
            .await
            .success()
    );
    let log = log.await.expect("log");
    assert!(log.contains("refused imagegate's credentials"), "{log}");
    for line in log.lines() {
        if let Some(found) = key_in(line) {
            leaks.push(format!("log: {found}"));
        }
    }
    assert!(
        leaks.is_empty(),
        "{} leaks:\n{}",
        leaks.len(),
        leaks.join("\n")
    );
}

/// The job's stored row once it says the job failed (a poll may see that first), as text.
async fn finished_record(store: &dyn imagegate::store::Store, id: &str) -> String {
    for _ in 0..100 {
        let record = stored_job(store, id).await.expect("the job's row");
        if record.status == imagegate::store::JobStatus::Failed {
            return format!("{record:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("job {id}'s row never said it failed");
}
