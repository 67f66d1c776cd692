//! Fuzzes the streaming usage extractor with provider bodies cut at fuzzer-chosen points.
//!
//! Input: one flags byte (bit 0: JSON or SSE; bits 1..=4: how many chunk-length bytes
//! follow), the chunk lengths (cycled), then the body. Every body runs four times: whole
//! and split, with prefix stripping off and on. Checked:
//! - nothing panics;
//! - stripping off, the output is the input, byte for byte;
//! - stripping on, the output is the input with only data-URL prefixes cut out of strings
//!   (`"data:` up to the first `;base64,` within the prefix window), and the same however
//!   the body was split;
//! - what was extracted does not depend on the split;
//! - for a plain JSON object, the usage, image count and error flag agree with serde_json.

#![no_main]

use std::collections::HashSet;

use bytes::Bytes;
use imagegate::usage::extract::{BodyKind, Extracted, Extractor, TokenUsage};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

/// The extractor's `PREFIX_WINDOW`: a prefix must end within this many bytes.
const PREFIX_WINDOW: usize = 100;
const MARK: &[u8] = b";base64,";

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let kind = if flags & 1 == 0 {
        BodyKind::Json
    } else {
        BodyKind::Sse
    };
    let (lens, body) = rest.split_at(usize::from((flags >> 1) & 0x0f).min(rest.len()));
    let body = Bytes::copy_from_slice(body);

    let plain_whole = run(kind, false, &body, &[]);
    let plain_split = run(kind, false, &body, lens);
    assert_eq!(plain_whole.0, body, "stripping off: output is the input");
    assert_eq!(
        plain_split.0, body,
        "stripping off, split: output is the input"
    );
    assert_eq!(
        plain_whole.1, plain_split.1,
        "extracted depends on the split"
    );

    let strip_whole = run(kind, true, &body, &[]);
    let strip_split = run(kind, true, &body, lens);
    assert_eq!(
        strip_whole.0, strip_split.0,
        "stripped output depends on the split"
    );
    assert_eq!(
        strip_whole.1, strip_split.1,
        "extracted (stripping) depends on the split"
    );
    assert!(
        only_prefixes_removed(&body, &strip_whole.0, kind == BodyKind::Sse),
        "stripping removed more than data-URL prefixes:\n in: {:?}\nout: {:?}",
        String::from_utf8_lossy(&body),
        String::from_utf8_lossy(&strip_whole.0)
    );

    if kind == BodyKind::Json {
        if let Some(expected) = oracle(&body) {
            assert_eq!(plain_whole.1.usage, expected.usage, "usage vs serde_json");
            assert_eq!(
                plain_whole.1.images, expected.images,
                "images vs serde_json"
            );
            assert_eq!(
                plain_whole.1.saw_error, expected.saw_error,
                "error vs serde_json"
            );
            assert_eq!(
                strip_whole.1, plain_whole.1,
                "stripping changed what was extracted"
            );
        }
    }
});

/// Feeds `body` in chunks whose lengths cycle through `lens` (the whole body when empty).
/// A zero length feeds an empty chunk, then one byte.
fn run(kind: BodyKind, strip: bool, body: &Bytes, lens: &[u8]) -> (Bytes, Extracted) {
    let mut extractor = Extractor::new(kind, strip);
    let mut out = Vec::with_capacity(body.len());
    let mut pos = 0;
    let mut k = 0;
    while pos < body.len() {
        let mut len = lens
            .get(k % lens.len().max(1))
            .map_or(body.len(), |&l| usize::from(l));
        k += 1;
        if len == 0 {
            out.extend_from_slice(&extractor.feed(Bytes::new()));
            len = 1;
        }
        let end = (pos + len).min(body.len());
        out.extend_from_slice(&extractor.feed(body.slice(pos..end)));
        pos = end;
    }
    out.extend_from_slice(&extractor.finish());
    (Bytes::from(out), extractor.extracted())
}

/// Whether `output` is `input` with zero or more data-URL prefixes cut out, each right
/// after a `"`, ending at the first `;base64,` within the window, with no unescaped `"`
/// (and, in SSE, no line break) inside. A search over the places a cut may begin.
fn only_prefixes_removed(input: &[u8], output: &[u8], sse: bool) -> bool {
    let mut tried = HashSet::new();
    let mut todo = vec![(0usize, 0usize)];
    while let Some((mut i, mut j)) = todo.pop() {
        loop {
            if let Some(end) = prefix_end(input, i, sse) {
                if tried.insert((i, j)) {
                    todo.push((end, j));
                } else {
                    break;
                }
            }
            if i == input.len() {
                if j == output.len() {
                    return true;
                }
                break;
            }
            if j < output.len() && input[i] == output[j] {
                i += 1;
                j += 1;
            } else {
                break;
            }
        }
    }
    false
}

fn prefix_end(input: &[u8], i: usize, sse: bool) -> Option<usize> {
    if i == 0 || input[i - 1] != b'"' || !input[i..].starts_with(b"data:") {
        return None;
    }
    let window = &input[i..input.len().min(i + PREFIX_WINDOW)];
    let k = window.windows(MARK.len()).position(|w| w == MARK)?;
    let cut = &window[..k + MARK.len()];
    let mut escape = false;
    for &b in cut {
        if sse && (b == b'\r' || b == b'\n') {
            return None;
        }
        if escape {
            escape = false;
        } else if b == b'\\' {
            escape = true;
        } else if b == b'"' {
            return None;
        }
    }
    Some(i + cut.len())
}

/// What serde_json reads from a body, when the body is one the extractor is meant to read
/// the same way: a JSON object without escapes and without repeated keys of interest.
fn oracle(body: &[u8]) -> Option<Extracted> {
    if body.contains(&b'\\') {
        return None;
    }
    for key in [&b"\"usage\""[..], b"\"data\"", b"\"error\""] {
        if body.windows(key.len()).filter(|w| *w == key).count() > 1 {
            return None;
        }
    }
    let object: Map<String, Value> = serde_json::from_slice(body).ok()?;
    Some(Extracted {
        usage: object.get("usage").and_then(TokenUsage::from_json),
        raw_usage: None,
        images: object
            .get("data")
            .and_then(Value::as_array)
            .map_or(0, |a| u32::try_from(a.len()).unwrap_or(u32::MAX)),
        saw_error: object.get("error").is_some_and(|e| !e.is_null()),
    })
}
