//! The router alone, driven with `oneshot` on an in-memory SQLite: no socket, no provider.
//! Every refusal a client can meet before a provider is called answers in OpenAI's error
//! shape, with the status, type, param and code the server gives, and tells the SDK not to
//! retry.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use imagegate::Gateway;
use imagegate::config::Config;
use serde_json::Value;
use tower::ServiceExt;

use crate::support::gateway::{start_with_key, write_config};
use crate::support::{test_config, test_env};

/// The app's router over a started gateway (kept alive with it) on `sqlite::memory:`, and a
/// valid key. No provider is listening at the configured address: none may be called.
struct App {
    router: Router,
    key: String,
    _gateway: Gateway,
    _dir: tempfile::TempDir,
}

async fn app() -> App {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(
        dir.path(),
        "sqlite::memory:",
        &test_config("http://127.0.0.1:9/v1", ""),
    );
    let config = Config::load(&path, &test_env()).expect("valid test config");
    let (gateway, key) = start_with_key(config, "svc-router").await;
    App {
        router: imagegate::app::router(Arc::clone(&gateway.state)),
        key,
        _gateway: gateway,
        _dir: dir,
    }
}

struct Case {
    name: &'static str,
    method: Method,
    path: &'static str,
    content_type: Option<&'static str>,
    authorized: bool,
    body: Vec<u8>,
    status: StatusCode,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

fn cases() -> Vec<Case> {
    let generation = |name, content_type, body: Vec<u8>| Case {
        name,
        method: Method::POST,
        path: "/v1/images/generations",
        content_type,
        authorized: true,
        body,
        status: StatusCode::BAD_REQUEST,
        kind: "invalid_request_error",
        param: None,
        code: None,
    };
    vec![
        Case {
            name: "unknown route",
            method: Method::GET,
            path: "/v1/nothing",
            content_type: None,
            status: StatusCode::NOT_FOUND,
            code: Some("not_found"),
            ..generation("", None, Vec::new())
        },
        Case {
            name: "unknown route outside /v1",
            method: Method::GET,
            path: "/nothing",
            content_type: None,
            authorized: false,
            status: StatusCode::NOT_FOUND,
            code: Some("not_found"),
            ..generation("", None, Vec::new())
        },
        Case {
            name: "wrong method",
            status: StatusCode::METHOD_NOT_ALLOWED,
            code: Some("method_not_allowed"),
            method: Method::GET,
            content_type: None,
            ..generation("", None, Vec::new())
        },
        Case {
            name: "wrong method on a public route",
            status: StatusCode::METHOD_NOT_ALLOWED,
            code: Some("method_not_allowed"),
            method: Method::POST,
            path: "/healthz",
            content_type: None,
            authorized: false,
            ..generation("", None, Vec::new())
        },
        Case {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: Some("payload_too_large"),
            // The test config's max_json_body_bytes is 65536.
            ..generation(
                "JSON over max_json_body_bytes",
                Some("application/json"),
                format!(r#"{{"prompt":"{}"}}"#, "x".repeat(70_000)).into_bytes(),
            )
        },
        Case {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code: Some("unsupported_media_type"),
            ..generation(
                "JSON endpoint sent text/plain",
                Some("text/plain"),
                br#"{"prompt":"p"}"#.to_vec(),
            )
        },
        generation(
            "malformed JSON",
            Some("application/json"),
            b"{not json".to_vec(),
        ),
        generation(
            "JSON that is not an object",
            Some("application/json"),
            b"[1,2]".to_vec(),
        ),
        Case {
            param: Some("prompt"),
            ..generation(
                "a field of the wrong type",
                Some("application/json"),
                br#"{"prompt":42}"#.to_vec(),
            )
        },
        Case {
            authorized: false,
            status: StatusCode::UNAUTHORIZED,
            code: Some("invalid_api_key"),
            ..generation(
                "no key",
                Some("application/json"),
                br#"{"prompt":"p"}"#.to_vec(),
            )
        },
        Case {
            name: "no key on the models list",
            method: Method::GET,
            path: "/v1/models",
            content_type: None,
            authorized: false,
            status: StatusCode::UNAUTHORIZED,
            code: Some("invalid_api_key"),
            ..generation("", None, Vec::new())
        },
    ]
}

#[tokio::test]
async fn refusals_answer_in_openai_error_shape() {
    let app = app().await;
    for case in cases() {
        let mut request = Request::builder().method(case.method).uri(case.path);
        if let Some(content_type) = case.content_type {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        if case.authorized {
            request = request.header(header::AUTHORIZATION, format!("Bearer {}", app.key));
        }
        let request = request.body(Body::from(case.body)).expect("request");
        let response = app
            .router
            .clone()
            .oneshot(request)
            .await
            .expect("the router answers");
        let name = case.name;
        assert_eq!(response.status(), case.status, "{name}");
        let headers = response.headers().clone();
        assert!(
            headers[header::CONTENT_TYPE]
                .to_str()
                .is_ok_and(|ct| ct.starts_with("application/json")),
            "{name}: {headers:?}"
        );
        assert_eq!(
            headers.get("x-should-retry").map(|v| v.as_bytes()),
            Some(&b"false"[..]),
            "{name}"
        );
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let body: Value = serde_json::from_slice(&body).expect("error body is JSON");
        let error = &body["error"];
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}: {body}"
        );
        assert_eq!(error["type"], case.kind, "{name}: {body}");
        for (field, want) in [("param", case.param), ("code", case.code)] {
            assert!(error.get(field).is_some(), "{name}: no {field} in {body}");
            assert_eq!(error[field].as_str(), want, "{name}: {field} in {body}");
        }
    }
}
