//! The usage extractor as a table: each provider body shape, and what imagegate reads from
//! it (tokens, the raw usage it keeps, images counted, an error seen, counts capped), the
//! same whole, byte by byte, and in odd-sized chunks, with the body passed on unchanged.

use bytes::Bytes;
use imagegate::usage::extract::{BodyKind, Extracted, Extractor, MAX_TOKENS_PER_CALL, TokenUsage};

use crate::support::{PNG_B64, USAGE};

/// input, output, total, text input, image input, cached text input, cached image input.
fn tokens(t: [i64; 7]) -> TokenUsage {
    let [input, output, total, text, image, cached_text, cached_image] = t;
    TokenUsage {
        input_tokens: input,
        output_tokens: output,
        total_tokens: total,
        text_input_tokens: text,
        image_input_tokens: image,
        cached_text_input_tokens: cached_text,
        cached_image_input_tokens: cached_image,
        text_output_tokens: 0,
    }
}

fn json_body(images: usize, usage: Option<&str>) -> String {
    let data: Vec<String> = (0..images)
        .map(|_| format!(r#"{{"b64_json":"{PNG_B64}"}}"#))
        .collect();
    let usage = usage.map_or(String::new(), |u| format!(r#","usage":{u}"#));
    format!(
        r#"{{"created":1795251252,"data":[{}],"output_format":"png"{usage}}}"#,
        data.join(",")
    )
}

fn sse_event(name: &str, data: &str) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

/// Two partial images, then one `.completed` event per usage.
fn sse_body(prefix: &str, usages: &[&str]) -> String {
    let mut body = String::new();
    for index in 0..2 {
        body.push_str(&sse_event(
            &format!("{prefix}.partial_image"),
            &format!(
                r#"{{"type":"{prefix}.partial_image","b64_json":"{PNG_B64}","partial_image_index":{index}}}"#
            ),
        ));
    }
    for usage in usages {
        body.push_str(&sse_event(
            &format!("{prefix}.completed"),
            &format!(r#"{{"type":"{prefix}.completed","b64_json":"{PNG_B64}","usage":{usage}}}"#),
        ));
    }
    body
}

struct Case {
    name: &'static str,
    kind: BodyKind,
    body: String,
    usage: Option<TokenUsage>,
    raw_usage: Option<String>,
    images: u32,
    saw_error: bool,
    /// Some count was past [`MAX_TOKENS_PER_CALL`]: capped, and the row flagged.
    suspect: bool,
}

fn cases() -> Vec<Case> {
    let json = |name, body: String, usage: Option<[i64; 7]>, raw: Option<&str>, images| Case {
        name,
        kind: BodyKind::Json,
        body,
        usage: usage.map(tokens),
        raw_usage: raw.map(str::to_owned),
        images,
        saw_error: false,
        suspect: false,
    };
    // One image with this usage, kept raw as it came.
    let one_image =
        |name, usage: &str, tokens| json(name, json_body(1, Some(usage)), tokens, Some(usage), 1);
    let absurd = r#"{"input_tokens":100000000000,"output_tokens":765,"total_tokens":100000000765}"#;
    let mut cases = vec![
        one_image(
            "full usage with the text/image split",
            USAGE,
            Some([1124, 765, 1889, 19, 1105, 0, 0]),
        ),
        json(
            "usage before data, three images",
            format!(r#"{{"usage":{USAGE},"data":[{{}},{{}},{{}}]}}"#),
            Some([1124, 765, 1889, 19, 1105, 0, 0]),
            Some(USAGE),
            3,
        ),
        json("no usage", json_body(2, None), None, None, 2),
        one_image(
            "no input_tokens_details: all input is text",
            r#"{"input_tokens":50,"output_tokens":100,"total_tokens":150}"#,
            Some([50, 100, 150, 50, 0, 0, 0]),
        ),
        one_image(
            "no total: input plus output",
            r#"{"input_tokens":50,"output_tokens":100}"#,
            Some([50, 100, 150, 50, 0, 0, 0]),
        ),
        one_image(
            "details with cached_tokens only: cached text first",
            r#"{"input_tokens":9,"input_tokens_details":{"cached_tokens":4}}"#,
            Some([9, 0, 9, 9, 0, 4, 0]),
        ),
        one_image(
            "cached_tokens past the text tokens: the rest is cached image",
            r#"{"input_tokens":15,"input_tokens_details":{"text_tokens":5,"image_tokens":10,"cached_tokens":8}}"#,
            Some([15, 0, 15, 5, 10, 5, 3]),
        ),
        one_image(
            "cached_tokens_details split as sent",
            r#"{"input_tokens":15,"input_tokens_details":{"text_tokens":5,"image_tokens":10,"cached_tokens":8,"cached_tokens_details":{"text_tokens":2,"image_tokens":6}}}"#,
            Some([15, 0, 15, 5, 10, 2, 6]),
        ),
        one_image(
            "negative, fractional and quoted counts read as 0",
            r#"{"input_tokens":-5,"output_tokens":2.5,"total_tokens":-1,"input_tokens_details":{"text_tokens":"3","image_tokens":4}}"#,
            Some([0, 0, 0, 0, 4, 0, 0]),
        ),
        json(
            "a usage key inside data is not the call's usage",
            format!(r#"{{"data":[{{"usage":{USAGE},"b64_json":"{PNG_B64}"}}]}}"#),
            None,
            None,
            1,
        ),
        Case {
            suspect: true,
            ..one_image(
                "absurd counts are capped and flagged",
                absurd,
                Some([100_000_000_000, 765, 100_000_000_765, 100_000_000_000, 0, 0, 0]),
            )
        },
        Case {
            saw_error: true,
            ..json(
                "an error body",
                r#"{"error":{"message":"Invalid prompt","type":"invalid_request_error","param":null,"code":null}}"#.to_owned(),
                None,
                None,
                0,
            )
        },
    ];
    let sse = |name, body: String, usage: Option<[i64; 7]>, raw: Option<String>, images| Case {
        kind: BodyKind::Sse,
        raw_usage: raw,
        ..json(name, body, usage, None, images)
    };
    let second = r#"{"input_tokens":7,"output_tokens":3}"#;
    cases.extend([
        sse(
            "SSE generation: partial images, then the completed event's usage",
            sse_body("image_generation", &[USAGE]),
            Some([1124, 765, 1889, 19, 1105, 0, 0]),
            Some(USAGE.to_owned()),
            1,
        ),
        sse(
            "SSE edit: completed event",
            sse_body("image_edit", &[USAGE]),
            Some([1124, 765, 1889, 19, 1105, 0, 0]),
            Some(USAGE.to_owned()),
            1,
        ),
        sse(
            "SSE two completed events: summed, raw usage kept as an array",
            sse_body("image_generation", &[USAGE, second]),
            Some([1131, 768, 1899, 26, 1105, 0, 0]),
            Some(format!("[{USAGE},{second}]")),
            2,
        ),
        sse(
            "SSE partial images only: no usage, no image",
            sse_body("image_generation", &[]),
            None,
            None,
            0,
        ),
        Case {
            saw_error: true,
            ..sse(
                "SSE error event",
                format!(
                    "{}{}",
                    sse_body("image_generation", &[]),
                    sse_event(
                        "error",
                        r#"{"error":{"message":"upstream timed out","type":"server_error"}}"#
                    )
                ),
                None,
                None,
                0,
            )
        },
    ]);
    cases
}

/// Feeds `body` in chunks of `size` bytes; returns what was passed on and what was read.
fn extract(kind: BodyKind, body: &[u8], size: usize) -> (Vec<u8>, Extracted) {
    let mut extractor = Extractor::new(kind, false);
    let mut out = Vec::with_capacity(body.len());
    for chunk in body.chunks(size) {
        out.extend_from_slice(&extractor.feed(Bytes::copy_from_slice(chunk)));
    }
    out.extend_from_slice(&extractor.finish());
    (out, extractor.extracted())
}

#[test]
fn usage_extractor_reads_each_provider_shape() {
    for case in cases() {
        let body = case.body.as_bytes();
        for size in [body.len(), 1, 13] {
            let (out, got) = extract(case.kind, body, size);
            assert!(out == body, "{}: the body passes unchanged", case.name);
            assert_eq!(
                got,
                Extracted {
                    usage: case.usage.clone(),
                    raw_usage: case.raw_usage.clone(),
                    images: case.images,
                    saw_error: case.saw_error,
                    // The reported size and quality: the unit tests' subject.
                    size: got.size.clone(),
                    quality: got.quality.clone(),
                },
                "{} (chunks of {size})",
                case.name
            );
        }
        let capped = case.usage.as_ref().map(TokenUsage::capped);
        assert_eq!(
            capped.as_ref().is_some_and(|(_, suspect)| *suspect),
            case.suspect,
            "{}: flagged",
            case.name
        );
        if let Some((capped, _)) = capped {
            assert!(
                capped.input_tokens <= MAX_TOKENS_PER_CALL
                    && capped.total_tokens <= MAX_TOKENS_PER_CALL,
                "{}: capped {capped:?}",
                case.name
            );
        }
    }
}
