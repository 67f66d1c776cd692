//! The mock provider (`kind = "mock"`, what `imagegate demo` serves) behind a real
//! imagegate: it reads each request's body as a provider would, and answers with `n` real
//! PNGs of the requested size and the partial images a stream asks for.

use base64::Engine;
use serde_json::{Value, json};

use crate::generations::expect_error;
use crate::support::forms::Form;
use crate::support::*;

fn config() -> String {
    test_config(
        &dead_url(),
        r#"
[providers.mock]
kind = "mock"
delay = "10ms"
[models.mocked]
routes = [{ provider = "mock", model = "mock-image" }]
[pricing.mock.mock-image]
per_image = 0.01
"#,
    )
}

/// The width and height in a PNG's header (the file must be a PNG).
fn png_size(b64: &Value) -> (u32, u32) {
    let png = base64::engine::general_purpose::STANDARD
        .decode(b64.as_str().expect("b64_json"))
        .expect("base64");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"), "a PNG");
    let be = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().expect("4 bytes"));
    assert!(png.len() < 16 * 1024, "a small file: {} bytes", png.len());
    (be(16), be(20))
}

/// The `data:` JSON of each event of a stream, in order.
fn events(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .map(|data| serde_json::from_str(data).expect("event JSON"))
        .collect()
}

#[tokio::test]
async fn the_mock_honours_size_n_and_partial_images() {
    let gw = TestGateway::start(Db::Sqlite, &config()).await;
    let path = "/v1/images/generations";

    let body =
        json!({"model": "mocked", "prompt": "a fox", "size": "640x480", "n": 3, "quality": "low"});
    let response = gw.post_json(path, &body.to_string()).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.expect("json");
    let data = answer["data"].as_array().expect("data");
    assert_eq!(data.len(), 3, "n images");
    for image in data {
        assert_eq!(png_size(&image["b64_json"]), (640, 480));
    }
    assert_eq!(answer["size"], "640x480");
    // 272 tokens per 1024x1024 at low quality, by area: 79.7 -> 80 each.
    assert_eq!(answer["usage"]["output_tokens"], 3 * 80);

    // No size, or auto: 1024x1024; sizes are read leniently.
    for (size, expected) in [
        (None, (1024, 1024)),
        (Some("auto"), (1024, 1024)),
        (Some(" 96 X 64"), (96, 64)),
    ] {
        let body = json!({"model": "mocked", "prompt": "a fox", "size": size});
        let answer: Value = gw
            .post_json(path, &body.to_string())
            .await
            .json()
            .await
            .expect("json");
        assert_eq!(
            png_size(&answer["data"][0]["b64_json"]),
            expected,
            "{size:?}"
        );
    }

    // A stream with partial images: that many partial events, then the completed one.
    let body = json!({"model": "mocked", "prompt": "a fox", "size": "320x200", "stream": true, "partial_images": 2});
    let response = gw.post_json(path, &body.to_string()).await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .expect("ct")
            .starts_with("text/event-stream")
    );
    let sent = events(&response.text().await.expect("body"));
    let types: Vec<_> = sent
        .iter()
        .map(|e| e["type"].as_str().expect("type"))
        .collect();
    assert_eq!(
        types,
        [
            "image_generation.partial_image",
            "image_generation.partial_image",
            "image_generation.completed"
        ]
    );
    for (i, event) in sent.iter().enumerate() {
        assert_eq!(png_size(&event["b64_json"]), (320, 200));
        for field in [
            "created_at",
            "size",
            "quality",
            "background",
            "output_format",
        ] {
            assert!(event.get(field).is_some(), "{field} in {event}");
        }
        if i < 2 {
            assert_eq!(event["partial_image_index"], i);
        }
    }
    assert!(sent[2]["usage"]["output_tokens"].as_i64().is_some());

    // A size the mock cannot read, or too many partial images: its 400, as a provider's.
    for (body, param) in [
        (
            json!({"model": "mocked", "prompt": "a fox", "size": "big"}),
            "size",
        ),
        (
            json!({"model": "mocked", "prompt": "a fox", "stream": true, "partial_images": 4}),
            "partial_images",
        ),
    ] {
        let response = gw.post_json(path, &body.to_string()).await;
        assert_eq!(response.headers()["x-imagegate-provider"], "mock");
        let error = expect_error(response, 400).await;
        assert_eq!(error["param"], param);
    }
    let rows = gw.usage_rows(7).await;
    let statuses: Vec<_> = rows.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 400, 400]);
    assert_eq!((rows[0].images, rows[0].output_tokens), (3, 240));
    gw.shutdown().await;
}

#[tokio::test]
async fn the_mock_reads_multipart_and_json_edits_from_their_bodies() {
    let gw = TestGateway::start(Db::Sqlite, &config()).await;
    // A multipart edit: its fields come after the image, as Node sends them.
    let form = Form::new()
        .image()
        .text("model", "mocked")
        .text("prompt", "a fox in the snow")
        .text("size", "200x120")
        .text("n", "2")
        .text("stream", "true")
        .text("partial_images", "1");
    let response = gw.post_form("/v1/images/edits", &form).await;
    assert_eq!(response.status(), 200);
    let sent = events(&response.text().await.expect("body"));
    let types: Vec<_> = sent
        .iter()
        .map(|e| e["type"].as_str().expect("type"))
        .collect();
    assert_eq!(
        types,
        [
            "image_edit.partial_image",
            "image_edit.completed",
            "image_edit.partial_image",
            "image_edit.completed"
        ],
        "each of the n images: its partial images, then itself"
    );
    for event in &sent {
        assert_eq!(png_size(&event["b64_json"]), (200, 120));
    }

    // A JSON edit: images by reference.
    let body = json!({"model": "mocked", "prompt": "a fox", "images": [{"file_id": "file-1"}], "size": "48x48", "n": 2});
    let response = gw.post_json("/v1/images/edits", &body.to_string()).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.expect("json");
    assert_eq!(answer["data"].as_array().expect("data").len(), 2);
    assert_eq!(png_size(&answer["data"][1]["b64_json"]), (48, 48));

    let rows = gw.usage_rows(2).await;
    assert_eq!(
        rows.iter()
            .map(|r| (r.endpoint.as_str(), r.images, r.streamed))
            .collect::<Vec<_>>(),
        [("edits", 2, true), ("edits", 2, false)]
    );
    gw.shutdown().await;
}
