//! Parameters are the provider's to judge: values and fields no OpenAI model took when
//! imagegate was written, and model names it has never heard of, reach the provider as the
//! client sent them, in a generation and in a multipart edit.

use crate::support::forms::{BOUNDARY, Form};
use crate::support::*;

/// New model names are only configuration: a dated snapshot routed like any model.
fn config(provider: &str) -> String {
    test_config(
        provider,
        r#"
[models."gpt-image-2.5-2026-05-12"]
aliases = ["gpt-image-2.5"]
routes = [{ provider = "piapi" }]
[pricing.piapi."gpt-image-2.5-2026-05-12"]
per_image = 0.05
"#,
    )
}

#[tokio::test]
async fn new_values_and_fields_reach_the_provider_byte_for_byte() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = TestGateway::start(Db::Sqlite, &config(&provider.base_url())).await;

    let body = r#"{"model":"gpt-image-2.5-2026-05-12","prompt":"a fox","quality":"xhigh","size":"2880x1616","output_format":"gif","background":"blurred","moderation":"strict","style":"isometric","output_compression":150,"complexity":"max","frame_count":12,"frame_duration_ms":80,"safety_identifier":"user-7f3a","partial_images":5}"#;
    let response = gw.post_json("/v1/images/generations", body).await;
    assert_eq!(response.status(), 200);
    response.bytes().await.expect("body");
    assert_eq!(
        String::from_utf8_lossy(&provider.requests()[0].body),
        body,
        "the generation, byte for byte"
    );

    let fields = [
        ("model", "gpt-image-2.5-2026-05-12"),
        ("prompt", "a fox"),
        ("quality", "max"),
        ("size", "1920x1088"),
        ("output_format", "svg"),
        ("svg[model]", "vector-1"),
        ("complexity", "high"),
        ("frame_count", "24"),
        ("safety_identifier", "user-7f3a"),
        ("input_fidelity", "ultra"),
    ];
    let form = fields
        .iter()
        .fold(Form::new(), |form, (name, value)| form.text(name, value))
        .image();
    let response = gw.post_form("/v1/images/edits", &form).await;
    assert_eq!(response.status(), 200);
    response.bytes().await.expect("body");
    let got = &provider.requests()[1];
    let upstream_type = got.headers["content-type"].to_str().expect("ct");
    let boundary = multer::parse_boundary(upstream_type).expect("boundary");
    assert_eq!(
        String::from_utf8_lossy(&got.body).replace(&boundary, BOUNDARY),
        String::from_utf8_lossy(&form.body()),
        "the edit, part for part and byte for byte (only the boundary is imagegate's)"
    );

    // The alias of the snapshot goes the same way, and each call is priced by its route.
    let alias = body.replace("gpt-image-2.5-2026-05-12", "gpt-image-2.5");
    let response = gw.post_json("/v1/images/generations", &alias).await;
    assert_eq!(response.status(), 200);
    response.bytes().await.expect("body");
    assert_eq!(
        String::from_utf8_lossy(&provider.requests()[2].body),
        body,
        "the alias is rewritten to the route's model"
    );
    let rows = gw.usage_rows(3).await;
    for row in &rows {
        assert_eq!(
            (row.model.as_str(), row.status, row.cost_nanousd),
            ("gpt-image-2.5-2026-05-12", 200, Some(50_000_000))
        );
    }
    assert_eq!(rows[0].quality.as_deref(), Some("xhigh"));
    assert_eq!(rows[0].size.as_deref(), Some("2880x1616"));
    assert_eq!(rows[1].quality.as_deref(), Some("max"));
    gw.shutdown().await;
}
