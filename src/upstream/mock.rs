//! The `mock` provider kind: answers inside imagegate, after a delay, as a provider would:
//! it reads the request body it is sent (JSON, or the multipart upload, whose files it
//! skips), and answers with `n` real PNGs of the requested `size` (one colour, so a small
//! file), the `partial_images` events of a stream, and the usage a real provider reports.
//! imagegate thus runs end to end without an account, and clients can be tried against it.

mod png;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde_json::{Value, json};

use super::{Endpoint, UpstreamBody, UpstreamRequest, UpstreamResponse};
use crate::openai::size_dimensions;

/// The largest side the mock renders; a provider refuses larger sizes too.
const MAX_SIDE: u32 = 16_384;
/// OpenAI's limit on partial images per image.
const MAX_PARTIAL_IMAGES: i64 = 3;
/// The longest text field read from an upload.
const MAX_TEXT_BYTES: usize = 256 * 1024;

/// What the mock reads of a request, from its body as a provider does.
#[derive(Debug, Default, PartialEq)]
struct Params {
    n: Option<i64>,
    size: Option<String>,
    quality: Option<String>,
    stream: bool,
    partial_images: Option<i64>,
    prompt_chars: usize,
}

/// A refused request: OpenAI's 400, naming the parameter.
struct Refusal {
    message: String,
    param: Option<&'static str>,
}

impl Refusal {
    fn new(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Refusal {
            message: message.into(),
            param,
        }
    }
}

/// What a mock answer reports, worked out from the request.
struct Answer {
    n: i64,
    partial_images: i64,
    text_tokens: i64,
    image_tokens: i64,
    out: i64,
    created: u64,
    size: String,
    quality: String,
    b64_png: String,
}

pub(super) async fn answer(delay: Duration, request: UpstreamRequest) -> UpstreamResponse {
    let endpoint = request.endpoint;
    let params = read_params(&request.content_type, request.body).await;
    tokio::time::sleep(delay).await;
    match params.and_then(|params| Answer::new(endpoint, &params).map(|a| (a, params.stream))) {
        Ok((answer, true)) => {
            let prefix = if endpoint == Endpoint::Generations {
                "image_generation"
            } else {
                "image_edit"
            };
            respond(StatusCode::OK, "text/event-stream", answer.events(prefix))
        }
        Ok((answer, false)) => respond(StatusCode::OK, "application/json", answer.json()),
        Err(refusal) => {
            let body = json!({ "error": {
                "message": refusal.message, "type": "invalid_request_error",
                "param": refusal.param, "code": null,
            }});
            respond(
                StatusCode::BAD_REQUEST,
                "application/json",
                body.to_string(),
            )
        }
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> UpstreamResponse {
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    UpstreamResponse {
        status,
        headers,
        body: futures_util::stream::once(async move { Ok(Bytes::from(body)) }).boxed(),
    }
}

/// The parameters in a request body: a JSON object, or a multipart form read to its end
/// (its text fields kept, its files passed over as they arrive).
async fn read_params(content_type: &HeaderValue, body: UpstreamBody) -> Result<Params, Refusal> {
    match body {
        UpstreamBody::Full(bytes) => json_params(&bytes),
        UpstreamBody::Stream(rx) => {
            let boundary = multer::parse_boundary(content_type.to_str().unwrap_or_default())
                .map_err(|_| Refusal::new("The multipart body has no boundary.", None))?;
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.next().await.map(|chunk| (chunk, rx))
            });
            form_params(multer::Multipart::new(stream, boundary)).await
        }
    }
}

fn json_params(bytes: &[u8]) -> Result<Params, Refusal> {
    let body: serde_json::Map<String, Value> = serde_json::from_slice(bytes)
        .map_err(|_| Refusal::new("The body must be a JSON object.", None))?;
    let field = |name: &str| body.get(name).filter(|v| !v.is_null());
    let text = |name: &str| field(name).and_then(Value::as_str).map(str::to_owned);
    let int = |name: &'static str| match field(name) {
        None => Ok(None),
        Some(v) => v.as_i64().map(Some).ok_or_else(|| not_an_integer(name)),
    };
    if field("size").is_some_and(|v| !v.is_string()) {
        return Err(Refusal::new("'size' must be a string.", Some("size")));
    }
    Ok(Params {
        n: int("n")?,
        size: text("size"),
        quality: text("quality"),
        stream: field("stream").and_then(Value::as_bool).unwrap_or(false),
        partial_images: int("partial_images")?,
        prompt_chars: text("prompt").map_or(0, |p| p.chars().count()),
    })
}

fn not_an_integer(name: &'static str) -> Refusal {
    Refusal::new(format!("'{name}' must be an integer."), Some(name))
}

/// The text fields of a multipart form; file parts are read through and dropped.
async fn form_params(mut form: multer::Multipart<'_>) -> Result<Params, Refusal> {
    let unreadable = |err: multer::Error| {
        Refusal::new(format!("The multipart body could not be read: {err}"), None)
    };
    let mut params = Params::default();
    while let Some(mut field) = form.next_field().await.map_err(unreadable)? {
        let name = field.name().unwrap_or_default().to_owned();
        let is_file = field.file_name().is_some() || name == "mask" || name.starts_with("image");
        let mut text = Vec::new();
        while let Some(chunk) = field.chunk().await.map_err(unreadable)? {
            if !is_file && text.len() + chunk.len() <= MAX_TEXT_BYTES {
                text.extend_from_slice(&chunk);
            }
        }
        if is_file {
            continue;
        }
        let text = String::from_utf8_lossy(&text);
        let int = |name: &'static str| {
            text.trim()
                .parse::<i64>()
                .map(Some)
                .map_err(|_| not_an_integer(name))
        };
        match name.as_str() {
            "n" => params.n = int("n")?,
            "partial_images" => params.partial_images = int("partial_images")?,
            "size" => params.size = Some(text.into_owned()),
            "quality" => params.quality = Some(text.into_owned()),
            "stream" => params.stream = text.trim().eq_ignore_ascii_case("true"),
            "prompt" => params.prompt_chars = text.chars().count(),
            _ => {}
        }
    }
    Ok(params)
}

/// A size as `WxH` (blanks and an upper-case X allowed), `auto` or none for 1024x1024.
fn parse_size(size: Option<&str>) -> Result<(u32, u32), Refusal> {
    let Some(size) = size
        .map(str::trim)
        .filter(|s| !s.eq_ignore_ascii_case("auto"))
    else {
        return Ok((1024, 1024));
    };
    let side = |n: i64| u32::try_from(n).ok().filter(|v| (1..=MAX_SIDE).contains(v));
    size_dimensions(size)
        .and_then(|(w, h)| Some((side(w)?, side(h)?)))
        .ok_or_else(|| {
            Refusal::new(
                format!(
                    "Invalid 'size': {size:?}. The mock takes 'auto' or WIDTHxHEIGHT, each side from 1 to {MAX_SIDE}."
                ),
                Some("size"),
            )
        })
}

/// Output tokens per image: OpenAI's gpt-image-1 table at 1024x1024 by quality (unknown
/// qualities as medium, the ones above high as high), scaled by the image's area, as the
/// table's larger sizes are.
fn output_tokens(width: u32, height: u32, quality: Option<&str>) -> i64 {
    let square = match quality {
        Some("low") => 272,
        Some("high" | "hd" | "xhigh" | "max") => 4160,
        _ => 1056,
    };
    let area = i64::from(width) * i64::from(height);
    (square * area + 1024 * 1024 / 2) / (1024 * 1024)
}

impl Answer {
    fn new(endpoint: Endpoint, params: &Params) -> Result<Self, Refusal> {
        let (width, height) = parse_size(params.size.as_deref())?;
        let n = params.n.unwrap_or(1);
        if !(1..=10).contains(&n) {
            return Err(Refusal::new("'n' must be between 1 and 10.", Some("n")));
        }
        let partial_images = params.partial_images.unwrap_or(0);
        if !(0..=MAX_PARTIAL_IMAGES).contains(&partial_images) {
            return Err(Refusal::new(
                format!("'partial_images' must be between 0 and {MAX_PARTIAL_IMAGES}."),
                Some("partial_images"),
            ));
        }
        let prompt_tokens = params.prompt_chars.div_ceil(4).max(1);
        Ok(Answer {
            n,
            partial_images,
            text_tokens: i64::try_from(prompt_tokens).unwrap_or(i64::MAX),
            image_tokens: if endpoint == Endpoint::Generations {
                0
            } else {
                323
            },
            out: output_tokens(width, height, params.quality.as_deref()) * n,
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            size: format!("{width}x{height}"),
            quality: params.quality.clone().unwrap_or_else(|| "medium".into()),
            b64_png: base64::engine::general_purpose::STANDARD.encode(png::solid(width, height)),
        })
    }

    /// One JSON body with every image and the whole usage.
    fn json(&self) -> String {
        let (text_tokens, image_tokens, out) = (self.text_tokens, self.image_tokens, self.out);
        let usage = json!({
            "total_tokens": text_tokens + image_tokens + out,
            "input_tokens": text_tokens + image_tokens,
            "output_tokens": out,
            "input_tokens_details": { "text_tokens": text_tokens, "image_tokens": image_tokens },
        });
        let data: Vec<_> = (0..self.n)
            .map(|_| json!({ "b64_json": self.b64_png }))
            .collect();
        let body = json!({
            "created": self.created, "background": "opaque", "data": data, "output_format": "png",
            "quality": self.quality, "size": self.size, "usage": usage,
        });
        body.to_string()
    }

    /// For each image, its partial images, then its completed event with its share of the
    /// usage, as a real stream reports them.
    fn events(&self, prefix: &str) -> String {
        let (n, text_tokens, image_tokens, out) =
            (self.n, self.text_tokens, self.image_tokens, self.out);
        let mut text = String::new();
        for i in 0..n {
            for index in 0..self.partial_images {
                let event = json!({
                    "type": format!("{prefix}.partial_image"), "b64_json": self.b64_png,
                    "created_at": self.created, "size": self.size, "quality": self.quality,
                    "background": "opaque", "output_format": "png", "partial_image_index": index,
                });
                text.push_str(&format!("event: {prefix}.partial_image\ndata: {event}\n\n"));
            }
            let share = |total: i64| total / n + i64::from(i < total % n);
            let event = json!({
                "type": format!("{prefix}.completed"), "b64_json": self.b64_png, "created_at": self.created,
                "size": self.size, "quality": self.quality, "background": "opaque", "output_format": "png",
                "usage": {
                    "total_tokens": share(text_tokens + image_tokens + out),
                    "input_tokens": share(text_tokens + image_tokens),
                    "output_tokens": share(out),
                    "input_tokens_details": { "text_tokens": share(text_tokens), "image_tokens": share(image_tokens) },
                },
            });
            text.push_str(&format!("event: {prefix}.completed\ndata: {event}\n\n"));
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_read_leniently() {
        let ok = |s: Option<&str>| parse_size(s).ok();
        assert_eq!(ok(None), Some((1024, 1024)));
        assert_eq!(ok(Some("auto")), Some((1024, 1024)));
        assert_eq!(ok(Some("1536x1024")), Some((1536, 1024)));
        assert_eq!(ok(Some(" 640 X 480 ")), Some((640, 480)));
        for bad in ["", "big", "1024", "0x10", "10x", "-1x5", "99999x1", "1.5x2"] {
            assert!(parse_size(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn output_tokens_follow_the_table_and_scale_with_area() {
        assert_eq!(output_tokens(1024, 1024, Some("low")), 272);
        assert_eq!(output_tokens(1536, 1024, Some("low")), 408);
        assert_eq!(output_tokens(1024, 1536, None), 1584);
        assert_eq!(output_tokens(1536, 1024, Some("xhigh")), 6240);
    }

    #[test]
    fn json_bodies_are_read_as_sent() {
        let params = json_params(
            br#"{"prompt":"abcdefgh","n":2,"size":"64x32","quality":"low","stream":true,"partial_images":2}"#,
        )
        .ok();
        assert_eq!(
            params,
            Some(Params {
                n: Some(2),
                size: Some("64x32".into()),
                quality: Some("low".into()),
                stream: true,
                partial_images: Some(2),
                prompt_chars: 8,
            })
        );
    }
}
