//! Fuzzes a client's multipart upload through imagegate's parser and re-encoder: the body
//! goes through `Upload::read_until_model`, then `prepare` and its pump, with a consumer
//! draining the provider-bound body the way reqwest would.
//!
//! Input: a flags byte (bit 0: edits or variations; bit 1: send Content-Length; bit 2:
//! the provider wants `image[]`; bits 3-4: the body ends, ends with a read error, or
//! stalls; bits 5-7: chunk size), a byte whose low five bits give a boundary length
//! (0: the fixed boundary `xB`), that many boundary bytes, then the body. Checked:
//! - nothing panics, and nothing hangs (a stalled body meets the idle timeout);
//! - every failure is a client error (4xx), never a 500, and is never sent on as a
//!   complete body;
//! - a success sends the provider a well-formed form: parts with no headers but
//!   Content-Disposition and Content-Type, names and filenames as quoted strings without
//!   quotes, backslashes or line breaks, exactly one `model` with the route's model, forced and dropped parameters
//!   applied, one to `max_images` images, and a prompt for edits;
//! - the spool directory is empty afterwards.

#![no_main]

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, HeaderValue, header};
use imagegate::config::{ParamPolicy, Price, Provider, ProviderKind, Route, UploadLimits};
use imagegate::error::ApiError;
use imagegate::multipart::Upload;
use imagegate::routing::{CostGuard, Prepared};
use imagegate::upstream::{Endpoint, UpstreamBody};
use libfuzzer_sys::fuzz_target;

const FIXED_BOUNDARY: &[u8] = b"xB";
const CHUNK_SIZES: [usize; 8] = [1, 2, 3, 7, 16, 64, 512, usize::MAX];
const LIMITS: UploadLimits = UploadLimits {
    max_images: 3,
    max_image_bytes: 2048,
    max_mask_bytes: 512,
    max_body_bytes: 16 * 1024,
};
const UPSTREAM_MODEL: &str = "upstream-model";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Ending {
    Clean,
    ReadError,
    Stall,
}

fuzz_target!(|data: &[u8]| {
    let [flags, boundary_len, rest @ ..] = data else {
        return;
    };
    let endpoint = if flags & 1 == 0 {
        Endpoint::Edits
    } else {
        Endpoint::Variations
    };
    let send_length = flags & 2 != 0;
    let image_field = flags & 4 != 0;
    let ending = match (flags >> 3) & 3 {
        0 | 1 => Ending::Clean,
        2 => Ending::ReadError,
        _ => Ending::Stall,
    };
    let chunk = CHUNK_SIZES[usize::from(flags >> 5)];
    let boundary_len = usize::from(boundary_len & 0x1f).min(rest.len());
    let (boundary, body) = match boundary_len {
        0 => (FIXED_BOUNDARY, rest),
        n => rest.split_at(n),
    };
    let mut content_type = b"multipart/form-data; boundary=".to_vec();
    content_type.extend_from_slice(boundary);
    let Ok(content_type) = HeaderValue::from_bytes(&content_type) else {
        return;
    };
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, content_type);
    if send_length {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }

    let body = Bytes::copy_from_slice(body);
    let route = route(image_field);
    let spool = spool_dir();
    runtime().block_on(async {
        let outcome = tokio::time::timeout(
            Duration::from_secs(10),
            drive(
                &headers,
                client_body(body, chunk, ending),
                endpoint,
                &route,
                spool,
            ),
        )
        .await
        .expect("the upload never hangs");
        if let Err(err) = outcome {
            assert!(
                err.status().is_client_error(),
                "a client's upload fails with a client error, not {}: {err:?}",
                err.status()
            );
        }
    });
    let left = std::fs::read_dir(spool).map_or(0, |d| d.count());
    assert_eq!(left, 0, "spool files left behind");
});

/// What `Call::forward` does with an upload, minus the provider: read to `model`, prepare,
/// and pump while a consumer drains the provider's body.
async fn drive(
    headers: &HeaderMap,
    body: Body,
    endpoint: Endpoint,
    route: &Route,
    spool: &Path,
) -> Result<(), ApiError> {
    let mut upload = Upload::new(headers, body, endpoint, LIMITS)?;
    upload.read_until_model(spool).await?;
    let Prepared { request, pump } = upload.prepare(route, CostGuard::default())?;
    let UpstreamBody::Stream(mut upstream) = request.body else {
        panic!("an upload streams to the provider");
    };
    let pump = pump.expect("an upload has a pump");
    let drain = async move {
        let mut sent = Vec::new();
        while let Some(chunk) = upstream.next().await {
            sent.extend_from_slice(&chunk.ok()?);
        }
        Some(sent)
    };
    let (pumped, sent) = tokio::join!(pump, drain);
    match (pumped, sent) {
        (Ok(()), Some(sent)) => {
            let content_type = request.content_type.to_str().expect("ASCII content type");
            check_form(content_type, Bytes::from(sent), endpoint, route).await;
            Ok(())
        }
        (Ok(()), None) => panic!("the pump succeeded but the provider's body broke off"),
        (Err(err), Some(_)) => panic!("the upload failed ({err:?}) but its body looked complete"),
        (Err(err), None) => Err(err),
    }
}

/// What the provider must receive after a successful upload.
async fn check_form(content_type: &str, sent: Bytes, endpoint: Endpoint, route: &Route) {
    let boundary = multer::parse_boundary(content_type).expect("our boundary parses");
    let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(sent) });
    let mut form = multer::Multipart::new(stream, boundary);
    let (mut models, mut images, mut prompts) = (0, 0, 0);
    while let Some(field) = form
        .next_field()
        .await
        .expect("the provider gets a valid form")
    {
        for (name, _) in field.headers() {
            assert!(
                name == header::CONTENT_DISPOSITION || name == header::CONTENT_TYPE,
                "unexpected part header {name}"
            );
        }
        let disposition = field
            .headers()
            .get(header::CONTENT_DISPOSITION)
            .expect("every part has a Content-Disposition")
            .as_bytes();
        let disposition = std::str::from_utf8(disposition).expect("UTF-8 Content-Disposition");
        check_disposition(disposition);
        let name = field.name().expect("every part has a name").to_owned();
        let filename = field.file_name().map(str::to_owned);
        let value = field.bytes().await.expect("part data");
        assert!(
            !route.policy.drop.contains(&name),
            "dropped {name} was sent"
        );
        let is_image = name == "image" || name.starts_with("image[");
        match name.as_str() {
            "model" => {
                models += 1;
                assert_eq!(value, UPSTREAM_MODEL, "model is the route's");
            }
            "prompt" => prompts += 1,
            "moderation" if filename.is_none() => assert_eq!(value, "low", "forced"),
            _ if is_image => images += 1,
            _ => {}
        }
    }
    assert_eq!(models, 1, "exactly one model part");
    assert!((1..=LIMITS.max_images).contains(&images), "{images} images");
    if endpoint == Endpoint::Variations {
        assert_eq!(images, 1, "a variation has one image");
    } else {
        assert!(prompts >= 1, "an edit has a prompt");
    }
}

/// imagegate writes `form-data; name="..."` and maybe `; filename="..."`, each value a
/// quoted string that no parser can end early or extend: no quote, no backslash (which
/// strict parsers read as an escape), no line break.
fn check_disposition(disposition: &str) {
    let quoted = |rest: &str| -> usize {
        let inner = rest.strip_prefix('"').expect("a quoted value");
        let end = inner.find('"').expect("a closing quote");
        assert!(
            !inner[..end].contains(['\\', '\r', '\n']),
            "a value a parser can misread: {disposition:?}"
        );
        end + 2
    };
    let rest = disposition
        .strip_prefix("form-data; name=")
        .unwrap_or_else(|| panic!("unexpected disposition {disposition:?}"));
    let rest = &rest[quoted(rest)..];
    if !rest.is_empty() {
        let rest = rest
            .strip_prefix("; filename=")
            .unwrap_or_else(|| panic!("unexpected parameter in {disposition:?}"));
        assert_eq!(quoted(rest), rest.len(), "trailing text in {disposition:?}");
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

/// The client's body in chunks of `size`, then its ending. A stalled body gets a short
/// idle timeout, as the server gives every upload.
fn client_body(body: Bytes, size: usize, ending: Ending) -> Body {
    let chunks: Vec<Result<Bytes, std::io::Error>> = (0..body.len())
        .step_by(size.min(body.len()).max(1))
        .map(|start| Ok(body.slice(start..body.len().min(start.saturating_add(size)))))
        .collect();
    let chunks: ChunkStream = Box::pin(futures_util::stream::iter(chunks));
    let stream: ChunkStream = match ending {
        Ending::Clean => chunks,
        Ending::ReadError => Box::pin(chunks.chain(futures_util::stream::once(async {
            Err(std::io::Error::other("connection reset"))
        }))),
        Ending::Stall => Box::pin(chunks.chain(futures_util::stream::pending())),
    };
    let body = Body::from_stream(stream);
    if ending == Ending::Stall {
        imagegate::body_timeout::idle_timeout(body, Duration::from_millis(1))
    } else {
        body
    }
}

fn route(image_field: bool) -> Route {
    let json = |text: &str| serde_json::from_str(text).expect("policy JSON");
    Route {
        provider: Arc::new(Provider {
            name: "fuzz".into(),
            kind: ProviderKind::Mock {
                delay: Duration::ZERO,
            },
            image_field: image_field.then(|| "image[]".to_owned()),
            connect_timeout: Duration::from_secs(1),
            first_byte_timeout: Duration::from_secs(1),
            total_timeout: Duration::from_secs(1),
            breaker: imagegate::config::BreakerConfig {
                failures: 5,
                cooldown: Duration::from_secs(1),
            },
        }),
        upstream_model: UPSTREAM_MODEL.into(),
        policy: ParamPolicy {
            defaults: json(r#"{"quality":"standard"}"#),
            force: json(r#"{"moderation":"low"}"#),
            drop: vec!["input_fidelity".into()],
        },
        strip_b64_prefix: false,
        price: Price::PerImage(1),
    }
}

fn spool_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("imagegate-fuzz-spool-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("spool dir");
        dir
    })
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}
