//! OpenTelemetry traces as a collector receives them: `imagegate serve` with the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` sends OTLP/HTTP protobuf to a receiver of the test's own.
//! A generation that came with a W3C `traceparent` is one server span continuing that
//! trace, with a client span per provider attempt under it carrying the GenAI semantic
//! conventions' attributes; the provider's request carries the same trace id and the
//! attempt's span id. Spans still buffered are sent at shutdown.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;

use crate::support::*;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// An OTLP/HTTP receiver on port 0: every export request it decoded, with the
/// `service.name` of each batch.
struct Receiver {
    endpoint: String,
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let spans: Arc<Mutex<Vec<(String, Span)>>> = Arc::default();
        let got = Arc::clone(&spans);
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: Bytes| {
                let got = Arc::clone(&got);
                async move {
                    let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                    for batch in request.resource_spans {
                        let service = batch
                            .resource
                            .iter()
                            .flat_map(|r| &r.attributes)
                            .find(|a| a.key == "service.name")
                            .and_then(|a| text(a.value.as_ref()?.value.as_ref()?))
                            .unwrap_or_default();
                        for span in batch.scope_spans.into_iter().flat_map(|s| s.spans) {
                            got.lock().expect("lock").push((service.clone(), span));
                        }
                    }
                    (
                        [("content-type", "application/x-protobuf")],
                        ExportTraceServiceResponse::default().encode_to_vec(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        #[expect(
            clippy::disallowed_methods,
            reason = "the test's receiver lives until the process ends"
        )]
        tokio::spawn(async move { axum::serve(listener, app).await.expect("serve receiver") });
        Receiver { endpoint, spans }
    }
}

fn text(value: &Any) -> Option<String> {
    match value {
        Any::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

/// A span's attributes as JSON-ish values: strings and integers.
fn attributes(span: &Span) -> HashMap<String, serde_json::Value> {
    span.attributes
        .iter()
        .filter_map(|a| {
            let value = match a.value.as_ref()?.value.as_ref()? {
                Any::StringValue(s) => serde_json::Value::from(s.clone()),
                Any::IntValue(i) => serde_json::Value::from(*i),
                Any::BoolValue(b) => serde_json::Value::from(*b),
                Any::DoubleValue(d) => serde_json::Value::from(*d),
                _ => return None,
            };
            Some((a.key.clone(), value))
        })
        .collect()
}

/// `imagegate serve` in front of `provider`, on a fresh Postgres database, with a client
/// key named `key` in it; the command is left for the test to add its environment to. The
/// folder holds the configuration: keep it for the test's length.
async fn serve_command(
    provider: &StandIn,
    key: &str,
) -> (tempfile::TempDir, std::process::Command, String) {
    let dir = tempfile::tempdir().expect("dir");
    let (store, url) = crate::support::db::fresh_postgres().await;
    let config = crate::support::gateway::write_config(
        dir.path(),
        &url,
        &test_config(&provider.base_url(), ""),
    );
    let mut command = crate::support::binary::command(&config);
    command.arg("serve").env("TEST_PIAPI_KEY", PROVIDER_KEY);
    let issued = imagegate::auth::issue_key(key);
    store.create_key(issued.new).await.expect("create key");
    (dir, command, issued.key)
}

#[tokio::test]
async fn a_generation_is_a_server_span_with_a_genai_client_span_per_attempt_in_the_callers_trace() {
    let receiver = Receiver::start().await;
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let (_dir, mut command, key) = serve_command(&provider, "traced").await;
    command
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint)
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .env_remove("OTEL_SERVICE_NAME")
        .env_remove("OTEL_TRACES_SAMPLER")
        // Long enough that only the shutdown's flush sends the spans.
        .env("OTEL_BSP_SCHEDULE_DELAY", "600000");
    let (mut child, addr, log) = crate::support::binary::serve(command).await.into_parts();

    let response = reqwest::Client::new()
        .post(format!("http://{addr}/v1/images/generations"))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01"))
        .header("tracestate", "vendor=opaque-7")
        .body(r#"{"model":"gpt-image-1","prompt":"fox"}"#)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    response.bytes().await.expect("body");

    // The provider continued the caller's trace, from the attempt's span.
    let sent = provider.requests();
    assert_eq!(sent.len(), 1);
    let traceparent = sent[0].headers["traceparent"].to_str().expect("ascii");
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    assert_eq!((parts[0], parts[1], parts[3]), ("00", TRACE_ID, "01"));
    assert_ne!(parts[2], CALLER_SPAN, "the attempt's own span id");
    assert_eq!(sent[0].headers["tracestate"], "vendor=opaque-7");

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        receiver.spans.lock().expect("lock").is_empty(),
        "spans wait for the batch (or the shutdown)"
    );
    let status = crate::support::binary::terminate(&mut child, Duration::from_secs(20)).await;
    assert!(status.success());
    let log = log.await.expect("log");

    let spans = receiver.spans.lock().expect("lock").clone();
    let trace_id = hex::decode(TRACE_ID).expect("hex");
    let of_kind = |kind: SpanKind| -> Vec<&(String, Span)> {
        spans
            .iter()
            .filter(|(_, s)| s.kind == kind as i32 && s.trace_id == trace_id)
            .collect()
    };
    let servers = of_kind(SpanKind::Server);
    let clients = of_kind(SpanKind::Client);
    assert_eq!(servers.len(), 1, "{spans:#?}\n{log}");
    assert_eq!(clients.len(), 1, "{spans:#?}\n{log}");
    let (service, server) = servers[0];
    let (_, client) = clients[0];
    assert_eq!(service, "imagegate");
    assert_eq!(hex::encode(&server.parent_span_id), CALLER_SPAN);
    assert_eq!(
        client.parent_span_id, server.span_id,
        "the attempt is the request's child"
    );
    assert_eq!(
        hex::encode(&client.span_id),
        parts[2],
        "the span the provider was told"
    );
    assert!(client.end_time_unix_nano >= client.start_time_unix_nano);

    let server_attributes = attributes(server);
    assert_eq!(server.name, "POST /v1/images/generations");
    assert_eq!(server_attributes["http.response.status_code"], 200);
    assert_eq!(server_attributes["http.request.method"], "POST");
    assert_eq!(server_attributes["http.route"], "/v1/images/generations");
    assert_eq!(server_attributes["gen_ai.request.model"], "gpt-image-1");
    assert_eq!(server_attributes["gen_ai.provider.name"], "piapi");

    let client_attributes = attributes(client);
    assert_eq!(client.name, "generate_content gpt-image-1");
    for (name, value) in [
        (
            "gen_ai.operation.name",
            serde_json::json!("generate_content"),
        ),
        ("gen_ai.provider.name", serde_json::json!("piapi")),
        ("gen_ai.request.model", serde_json::json!("gpt-image-1")),
        ("gen_ai.usage.input_tokens", serde_json::json!(1124)),
        ("gen_ai.usage.output_tokens", serde_json::json!(765)),
        ("http.response.status_code", serde_json::json!(200)),
        ("attempt", serde_json::json!(1)),
    ] {
        assert_eq!(
            client_attributes.get(name),
            Some(&value),
            "{name}: {client_attributes:#?}"
        );
    }
    // No secret in any attribute.
    let all = format!("{spans:?}");
    assert!(!all.contains(PROVIDER_KEY) && !all.contains(&key));
}

#[tokio::test]
async fn without_otlp_a_provider_still_gets_a_traceparent_and_a_new_trace_when_none_came() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let (_dir, mut command, key) = serve_command(&provider, "untraced").await;
    command
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    let (mut child, addr, _log) = crate::support::binary::serve(command).await.into_parts();
    let client = reqwest::Client::new();
    let post = |traceparent: Option<String>| {
        let mut request = client
            .post(format!("http://{addr}/v1/images/generations"))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(r#"{"model":"gpt-image-1","prompt":"fox"}"#);
        if let Some(traceparent) = traceparent {
            request = request
                .header("traceparent", traceparent)
                .header("tracestate", "caller=t61rcWkgMzE");
        }
        request.send()
    };
    let continued = post(Some(format!("00-{TRACE_ID}-{CALLER_SPAN}-01")))
        .await
        .expect("send");
    assert_eq!(continued.status(), 200);
    continued.bytes().await.expect("body");
    let fresh = post(None).await.expect("send");
    assert_eq!(fresh.status(), 200);
    fresh.bytes().await.expect("body");
    let malformed = post(Some("00-zz-not-a-trace".into())).await.expect("send");
    assert_eq!(malformed.status(), 200);
    malformed.bytes().await.expect("body");

    let sent: Vec<String> = provider
        .requests()
        .iter()
        .map(|r| r.headers["traceparent"].to_str().expect("ascii").to_owned())
        .collect();
    assert_eq!(sent.len(), 3);
    // The caller's tracestate goes on with its trace, and nowhere else.
    let states: Vec<Option<String>> = provider
        .requests()
        .iter()
        .map(|r| {
            r.headers
                .get("tracestate")
                .map(|v| v.to_str().expect("ascii").to_owned())
        })
        .collect();
    assert_eq!(
        states,
        [Some("caller=t61rcWkgMzE".to_owned()), None, None],
        "{sent:?}"
    );
    // The caller's trace and its sampling decision, with the attempt's span id.
    assert!(
        sent[0].starts_with(&format!("00-{TRACE_ID}-")),
        "{}",
        sent[0]
    );
    assert!(sent[0].ends_with("-01"), "{}", sent[0]);
    // No trace (or a malformed one) came: a new trace, not sampled by imagegate.
    for new in &sent[1..] {
        let parts: Vec<&str> = new.split('-').collect();
        assert_eq!(parts.len(), 4, "{new}");
        assert_eq!((parts[0], parts[3]), ("00", "00"), "{new}");
        assert_ne!(parts[1], TRACE_ID);
        assert_eq!(parts[1].len(), 32, "{new}");
        assert_ne!(parts[1], "0".repeat(32));
    }
    assert_ne!(sent[1], sent[2]);
    crate::support::binary::terminate(&mut child, Duration::from_secs(20)).await;
}
