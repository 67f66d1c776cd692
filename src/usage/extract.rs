//! Reads token usage and image counts out of a provider's body while it streams past.
//!
//! Bodies carry megabytes of base64, so nothing here may hold a body: a byte-level
//! scanner keeps a few flags per chunk, copies out only the small `usage` value, and
//! passes every chunk on untouched (the same `Bytes`) unless it has to cut a
//! `data:...;base64,` prefix out of a `b64_json` string.

use bytes::{Bytes, BytesMut};
use memchr::{memchr2, memchr3};
#[cfg(test)]
use serde_json::Value;

use super::counts;

/// A `usage` value longer than this is no usage object we know; we stop copying it.
const USAGE_CAPTURE_CAP: usize = 64 * 1024;
/// SSE `type` values are short names; a longer one cannot end the way we look for.
const TYPE_CAPTURE_CAP: usize = 256;
/// Bound on the raw usage text kept across SSE events, so a stream of endless
/// `.completed` events cannot grow memory; tokens are still summed past it.
const RAW_USAGE_TOTAL_CAP: usize = 64 * 1024;
/// A data-URL prefix must end (its `;base64,` comma included) within this many bytes
/// of the string's start; it is also the most we ever hold back.
const PREFIX_WINDOW: usize = 100;
const DATA_SCHEME: &[u8] = b"data:";
const BASE64_MARK: &[u8] = b";base64,";
/// Longest SSE field name we tell apart (`event` plus a UTF-8 BOM).
const FIELD_NAME_CAP: usize = 8;
const EVENT_NAME_CAP: usize = 128;
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// What kind of body is streaming past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// `application/json`: one object, `usage` at its top level.
    Json,
    /// `text/event-stream`: one JSON object per event, usage on `.completed` events.
    Sse,
}

/// More tokens of one kind than one image call can use by orders of magnitude (gpt-image-1
/// bills a few thousand per image). A larger count is a provider's bug, not usage: it is
/// capped at this, and the row flagged, so that one bad answer cannot swamp every sum.
pub const MAX_TOKENS_PER_CALL: i64 = 100_000_000;

/// Token counts of one provider call. Numbers the provider left out are 0.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenUsage {
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub total_tokens: i64,
    pub text_input_tokens: i64,
    pub image_input_tokens: i64,
    pub cached_text_input_tokens: i64,
    pub cached_image_input_tokens: i64,
    /// Output tokens reported as text (`output_tokens_details.text_tokens`, at most
    /// `output_tokens`); the rest of the output is image output. 0 without details.
    pub text_output_tokens: i64,
}

impl TokenUsage {
    /// Reads an OpenAI image `usage` object; `None` when `v` is not an object. What
    /// [`counts::read`] reads from the text, kept as the reference its tests check it by.
    #[cfg(test)]
    pub fn from_json(v: &Value) -> Option<TokenUsage> {
        let obj = v.as_object()?;
        let input = count(obj.get("input_tokens"));
        let output = count(obj.get("output_tokens"));
        // An unusable total is treated like a missing one: 0 would undercount the call.
        let total = valid_count(obj.get("total_tokens")).unwrap_or(input.saturating_add(output));

        let details = obj.get("input_tokens_details").and_then(Value::as_object);
        // One provider sends no details; others send details without the split (only
        // `cached_tokens`). Either way the split is unknown, and text is the safe reading.
        let split =
            details.filter(|d| d.contains_key("text_tokens") || d.contains_key("image_tokens"));
        let (text, image) = match split {
            Some(d) => (count(d.get("text_tokens")), count(d.get("image_tokens"))),
            None => (input, 0),
        };

        let (cached_text, cached_image) = match details {
            None => (0, 0),
            Some(d) => match d.get("cached_tokens_details").and_then(Value::as_object) {
                Some(c) => (count(c.get("text_tokens")), count(c.get("image_tokens"))),
                None => {
                    let cached = count(d.get("cached_tokens"));
                    let cached_text = cached.min(text);
                    (cached_text, cached - cached_text)
                }
            },
        };

        let text_output = obj
            .get("output_tokens_details")
            .and_then(Value::as_object)
            .map_or(0, |d| count(d.get("text_tokens")).min(output));

        Some(TokenUsage {
            input_tokens: input,
            output_tokens: output,
            total_tokens: total,
            text_input_tokens: text,
            image_input_tokens: image,
            cached_text_input_tokens: cached_text,
            cached_image_input_tokens: cached_image,
            text_output_tokens: text_output,
        })
    }

    /// Every count capped at [`MAX_TOKENS_PER_CALL`]; true when one was above it.
    pub fn capped(&self) -> (TokenUsage, bool) {
        let fields = [
            self.input_tokens,
            self.output_tokens,
            self.total_tokens,
            self.text_input_tokens,
            self.image_input_tokens,
            self.cached_text_input_tokens,
            self.cached_image_input_tokens,
            self.text_output_tokens,
        ];
        let suspect = fields.iter().any(|&n| n > MAX_TOKENS_PER_CALL);
        let cap = |n: i64| n.min(MAX_TOKENS_PER_CALL);
        let capped = TokenUsage {
            input_tokens: cap(self.input_tokens),
            output_tokens: cap(self.output_tokens),
            total_tokens: cap(self.total_tokens),
            text_input_tokens: cap(self.text_input_tokens),
            image_input_tokens: cap(self.image_input_tokens),
            cached_text_input_tokens: cap(self.cached_text_input_tokens),
            cached_image_input_tokens: cap(self.cached_image_input_tokens),
            text_output_tokens: cap(self.text_output_tokens),
        };
        (capped, suspect)
    }

    fn add(&mut self, other: &TokenUsage) {
        self.input_tokens = self.input_tokens.saturating_add(other.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
        self.total_tokens = self.total_tokens.saturating_add(other.total_tokens);
        self.text_input_tokens = self
            .text_input_tokens
            .saturating_add(other.text_input_tokens);
        self.image_input_tokens = self
            .image_input_tokens
            .saturating_add(other.image_input_tokens);
        self.cached_text_input_tokens = self
            .cached_text_input_tokens
            .saturating_add(other.cached_text_input_tokens);
        self.cached_image_input_tokens = self
            .cached_image_input_tokens
            .saturating_add(other.cached_image_input_tokens);
        self.text_output_tokens = self
            .text_output_tokens
            .saturating_add(other.text_output_tokens);
    }
}

#[cfg(test)]
fn valid_count(v: Option<&Value>) -> Option<i64> {
    v.and_then(Value::as_i64).filter(|n| *n >= 0)
}

#[cfg(test)]
fn count(v: Option<&Value>) -> i64 {
    valid_count(v).unwrap_or(0)
}

/// What a body told us, so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extracted {
    /// Summed over all `.completed` events for SSE.
    pub usage: Option<TokenUsage>,
    /// The `usage` object as sent; for SSE with several usages, a JSON array of them.
    pub raw_usage: Option<String>,
    /// Elements of `data` (JSON) or `.completed` events (SSE).
    pub images: u32,
    pub saw_error: bool,
    /// The top-level `size` and `quality` the provider reported for the images it made (the
    /// last `.completed` event's, for SSE), when it did: what a per-image table is read with.
    pub size: Option<String>,
    pub quality: Option<String>,
}

/// Scans a body chunk by chunk; see the module docs.
pub struct Extractor {
    kind: BodyKind,
    json: JsonScanner,
    sse: SseState,
}

impl Extractor {
    pub fn new(kind: BodyKind, strip_data_url_prefix: bool) -> Self {
        Extractor {
            kind,
            json: JsonScanner::new(strip_data_url_prefix, kind == BodyKind::Sse),
            sse: SseState::default(),
        }
    }

    /// Scans one chunk and returns the bytes to send on: the same `Bytes` (no copy)
    /// when nothing in it changed.
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        if self.json.prefix.active {
            // The held bytes came before this chunk, whose first byte continues the string.
            self.json.prefix.carried = self.json.prefix.buf.len();
            self.json.prefix.start = 0;
        }
        let mut out = Out::default();
        match self.kind {
            BodyKind::Json => self.json.scan(&chunk, 0, chunk.len(), &mut out),
            BodyKind::Sse => self.sse.scan(&mut self.json, &chunk, &mut out),
        }
        let limit = if self.json.prefix.active {
            self.json.prefix.start
        } else {
            chunk.len()
        };
        out.finish(chunk, limit)
    }

    /// End of body: returns any bytes still held back (usually empty).
    pub fn finish(&mut self) -> Bytes {
        let held = if self.json.prefix.active {
            let held = Bytes::copy_from_slice(&self.json.prefix.buf);
            self.json.prefix.reset();
            held
        } else {
            Bytes::new()
        };
        match self.kind {
            BodyKind::Json => self.json.close_capture(),
            BodyKind::Sse => self.sse.finish(&mut self.json),
        }
        held
    }

    pub fn extracted(&self) -> Extracted {
        match self.kind {
            BodyKind::Json => Extracted {
                usage: self.json.usage.as_ref().map(|(u, _)| u.clone()),
                raw_usage: self.json.usage.as_ref().map(|(_, raw)| raw.clone()),
                images: self.json.images,
                saw_error: self.json.saw_error,
                size: self.json.size.clone(),
                quality: self.json.quality.clone(),
            },
            BodyKind::Sse => {
                let raw_usage = match self.sse.raws.as_slice() {
                    [] => None,
                    [one] => Some(one.clone()),
                    many => Some(format!("[{}]", many.join(","))),
                };
                Extracted {
                    usage: self.sse.usage.clone(),
                    raw_usage,
                    images: self.sse.images,
                    saw_error: self.sse.saw_error,
                    size: self.sse.size.clone(),
                    quality: self.sse.quality.clone(),
                }
            }
        }
    }
}

/// The output of one chunk: `buf` (if any) followed by `chunk[emitted..limit]`.
/// `buf` exists only once a cut or a release forces a copy.
#[derive(Default)]
struct Out {
    buf: Option<BytesMut>,
    emitted: usize,
}

impl Out {
    /// Leaves `chunk[from..to]` out of the output.
    fn skip(&mut self, chunk: &[u8], from: usize, to: usize) {
        if from > self.emitted {
            let kept = chunk.get(self.emitted..from).unwrap_or_default();
            self.buf
                .get_or_insert_with(|| BytesMut::with_capacity(chunk.len()))
                .extend_from_slice(kept);
        }
        self.emitted = self.emitted.max(to);
    }

    /// Puts bytes held from earlier chunks in front; they precede all of this chunk.
    fn release(&mut self, held: &[u8], chunk_len: usize) {
        let buf = self
            .buf
            .get_or_insert_with(|| BytesMut::with_capacity(held.len() + chunk_len));
        buf.extend_from_slice(held);
    }

    fn finish(self, chunk: Bytes, limit: usize) -> Bytes {
        let limit = limit.min(chunk.len());
        let from = self.emitted.min(limit);
        match self.buf {
            None if from == 0 && limit == chunk.len() => chunk,
            None => chunk.slice(from..limit),
            Some(mut buf) => {
                buf.extend_from_slice(chunk.get(from..limit).unwrap_or_default());
                buf.freeze()
            }
        }
    }
}

/// Object keys the scanner acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Other,
    Usage,
    Data,
    Error,
    Type,
    Size,
    Quality,
    B64Json,
}

impl Key {
    fn classify(raw: &[u8]) -> Key {
        match raw {
            b"usage" => Key::Usage,
            b"data" => Key::Data,
            b"error" => Key::Error,
            b"type" => Key::Type,
            b"size" => Key::Size,
            b"quality" => Key::Quality,
            b"b64_json" => Key::B64Json,
            _ => Key::Other,
        }
    }
}

/// Longest key we need to recognise (`b64_json`), so longer strings are never keys of ours.
const KEY_CAP: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Capture {
    None,
    Usage,
    Type,
    Size,
    Quality,
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Undecided,
    Keep,
    Strip,
}

/// The start of a `b64_json` string whose fate (keep or cut) is not known yet.
#[derive(Default)]
struct Prefix {
    active: bool,
    /// The string's content so far, at most `PREFIX_WINDOW` bytes.
    buf: Vec<u8>,
    /// How many bytes of `buf` came from earlier chunks and were held back.
    carried: usize,
    /// Where the string's content begins in the current chunk (0 when carried over).
    start: usize,
}

impl Prefix {
    fn reset(&mut self) {
        self.active = false;
        self.buf.clear();
        self.carried = 0;
        self.start = 0;
    }

    fn verdict(&self) -> Verdict {
        let p = self.buf.as_slice();
        if p.len() <= DATA_SCHEME.len() {
            if DATA_SCHEME.starts_with(p) {
                Verdict::Undecided
            } else {
                Verdict::Keep
            }
        } else if p.ends_with(BASE64_MARK) {
            Verdict::Strip
        } else if p.len() >= PREFIX_WINDOW {
            Verdict::Keep
        } else {
            Verdict::Undecided
        }
    }
}

/// A streaming JSON scanner that understands only as much structure as it needs:
/// depth, strings, keys, and a handful of top-level keys. It never recurses and never
/// rejects input; on broken JSON it simply finds less.
struct JsonScanner {
    strip: bool,
    capture_type: bool,

    // Nesting depth of the byte being read (the root object's keys are at 1).
    depth: u32,
    in_string: bool,
    escape: bool,
    /// First bytes of the current string, in case it turns out to be a key.
    key_buf: [u8; KEY_CAP],
    key_len: usize,
    key_over: bool,
    /// The string just closed, if nothing but whitespace followed it yet.
    last_closed: Option<Key>,
    /// A `:` was read and its value has not started.
    after_colon: bool,
    pending: Key,

    in_data: bool,
    elem_expected: bool,
    images: u32,

    capture: Capture,
    capture_from: usize,
    capture_buf: Vec<u8>,
    capture_over: bool,

    usage: Option<(TokenUsage, String)>,
    type_value: Option<String>,
    /// Top-level `size` and `quality` strings.
    size: Option<String>,
    quality: Option<String>,
    saw_error: bool,

    prefix: Prefix,
}

impl JsonScanner {
    fn new(strip: bool, capture_type: bool) -> Self {
        JsonScanner {
            strip,
            capture_type,
            depth: 0,
            in_string: false,
            escape: false,
            key_buf: [0; KEY_CAP],
            key_len: 0,
            key_over: false,
            last_closed: None,
            after_colon: false,
            pending: Key::Other,
            in_data: false,
            elem_expected: false,
            images: 0,
            capture: Capture::None,
            capture_from: 0,
            capture_buf: Vec::new(),
            capture_over: false,
            usage: None,
            type_value: None,
            size: None,
            quality: None,
            saw_error: false,
            prefix: Prefix::default(),
        }
    }

    /// Readies the scanner for the next SSE event, keeping its buffers' memory.
    /// Never called while a prefix is undecided: lines end it first.
    fn reset(&mut self) {
        let strip = self.strip;
        let capture_type = self.capture_type;
        let mut capture_buf = std::mem::take(&mut self.capture_buf);
        capture_buf.clear();
        let mut prefix_buf = std::mem::take(&mut self.prefix.buf);
        prefix_buf.clear();
        *self = JsonScanner::new(strip, capture_type);
        self.capture_buf = capture_buf;
        self.prefix.buf = prefix_buf;
    }

    /// Scans `chunk[from..to]`; indices handed to `out` are chunk offsets.
    fn scan(&mut self, chunk: &[u8], from: usize, to: usize, out: &mut Out) {
        let to = to.min(chunk.len());
        let mut i = from;
        if self.capture != Capture::None {
            self.capture_from = from;
        }
        while i < to {
            if self.in_string {
                i = self.scan_string(chunk, i, to, out);
                continue;
            }
            let b = chunk[i];
            if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
                i += 1;
                continue;
            }
            let closed = self.last_closed.take();
            match b {
                b'"' => {
                    let b64 = self.begin_value(b, i);
                    self.begin_string(i, b64);
                }
                b'{' | b'[' => {
                    self.begin_value(b, i);
                    self.depth = self.depth.saturating_add(1);
                }
                b'}' | b']' => {
                    self.end_capture_at(chunk, i);
                    self.after_colon = false;
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth < 2 {
                        self.in_data = false;
                    }
                }
                b',' => {
                    self.end_capture_at(chunk, i);
                    self.after_colon = false;
                    if self.in_data && self.depth == 2 {
                        self.elem_expected = true;
                    }
                }
                b':' => {
                    self.after_colon = true;
                    self.pending = match closed {
                        Some(Key::B64Json) => Key::B64Json,
                        Some(key) if self.depth == 1 => key,
                        _ => Key::Other,
                    };
                }
                _ => {
                    self.begin_value(b, i);
                }
            }
            i += 1;
        }
        if self.capture != Capture::None {
            let from = self.capture_from.min(to);
            self.capture_append(&chunk[from..to]);
        }
    }

    /// A value starts with byte `b` at `i`. Returns whether it is a `b64_json` string
    /// whose prefix must be checked.
    fn begin_value(&mut self, b: u8, i: usize) -> bool {
        if self.in_data && self.depth == 2 && self.elem_expected {
            self.images = self.images.saturating_add(1);
            self.elem_expected = false;
        }
        if !self.after_colon {
            return false;
        }
        self.after_colon = false;
        match std::mem::replace(&mut self.pending, Key::Other) {
            Key::Usage => self.start_capture(Capture::Usage, i),
            Key::Type if self.capture_type => self.start_capture(Capture::Type, i),
            Key::Size if b == b'"' => self.start_capture(Capture::Size, i),
            Key::Quality if b == b'"' => self.start_capture(Capture::Quality, i),
            Key::Data if b == b'[' => {
                // A repeated key replaces the earlier value, as in serde_json.
                self.in_data = true;
                self.elem_expected = true;
                self.images = 0;
            }
            Key::Error if b != b'n' => self.saw_error = true,
            Key::B64Json => return b == b'"' && self.strip,
            _ => {}
        }
        false
    }

    fn begin_string(&mut self, quote: usize, b64: bool) {
        self.in_string = true;
        self.escape = false;
        self.key_len = 0;
        self.key_over = b64;
        if b64 {
            self.prefix.reset();
            self.prefix.active = true;
            self.prefix.start = quote + 1;
        }
    }

    fn end_string(&mut self) {
        self.in_string = false;
        self.last_closed = Some(if self.key_over {
            Key::Other
        } else {
            Key::classify(&self.key_buf[..self.key_len])
        });
    }

    fn note_key(&mut self, bytes: &[u8]) {
        if self.key_over {
            return;
        }
        let end = self.key_len + bytes.len();
        if end > KEY_CAP {
            self.key_over = true;
        } else {
            self.key_buf[self.key_len..end].copy_from_slice(bytes);
            self.key_len = end;
        }
    }

    /// Reads string content from `i`; returns where to go on.
    fn scan_string(&mut self, chunk: &[u8], mut i: usize, to: usize, out: &mut Out) -> usize {
        if self.prefix.active {
            // Byte by byte, but over at most `PREFIX_WINDOW` bytes per string.
            while i < to {
                let b = chunk[i];
                if self.escape {
                    self.escape = false;
                } else if b == b'\\' {
                    self.escape = true;
                } else if b == b'"' {
                    self.keep_prefix(out, chunk.len());
                    self.end_string();
                    return i + 1;
                }
                self.prefix.buf.push(b);
                match self.prefix.verdict() {
                    Verdict::Undecided => i += 1,
                    Verdict::Keep => {
                        self.keep_prefix(out, chunk.len());
                        return i + 1;
                    }
                    Verdict::Strip => {
                        out.skip(chunk, self.prefix.start, i + 1);
                        self.prefix.reset();
                        return i + 1;
                    }
                }
            }
            return to;
        }
        if self.escape {
            self.escape = false;
            self.key_over = true;
            return i + 1;
        }
        let rest = &chunk[i..to];
        match memchr2(b'"', b'\\', rest) {
            None => {
                self.note_key(rest);
                to
            }
            Some(k) => {
                self.note_key(&rest[..k]);
                let j = i + k;
                if rest[k] == b'"' {
                    self.end_string();
                    j + 1
                } else {
                    // Our keys have no escapes, so an escaped string is none of them.
                    self.key_over = true;
                    if j + 1 < to {
                        j + 2
                    } else {
                        self.escape = true;
                        to
                    }
                }
            }
        }
    }

    /// The prefix stays: bytes held from earlier chunks go out ahead of this chunk.
    fn keep_prefix(&mut self, out: &mut Out, chunk_len: usize) {
        if self.prefix.active && self.prefix.carried > 0 {
            let carried = self.prefix.carried.min(self.prefix.buf.len());
            out.release(&self.prefix.buf[..carried], chunk_len);
        }
        self.prefix.reset();
    }

    /// An SSE data line ended. JSON text cannot continue a string across lines, so an
    /// undecided prefix is kept rather than held past the line.
    fn end_line(&mut self, out: &mut Out, chunk_len: usize) {
        if self.prefix.active {
            self.keep_prefix(out, chunk_len);
        }
        if self.capture != Capture::None {
            // The line break is JSON whitespace between the lines' tokens.
            self.capture_append(b"\n");
        }
    }

    fn start_capture(&mut self, what: Capture, at: usize) {
        self.capture = what;
        self.capture_from = at;
        self.capture_buf.clear();
        self.capture_over = false;
    }

    fn capture_append(&mut self, bytes: &[u8]) {
        if self.capture_over {
            return;
        }
        let cap = match self.capture {
            Capture::Usage => USAGE_CAPTURE_CAP,
            _ => TYPE_CAPTURE_CAP,
        };
        if self.capture_buf.len() + bytes.len() > cap {
            self.capture_over = true;
            self.capture_buf.clear();
        } else {
            self.capture_buf.extend_from_slice(bytes);
        }
    }

    /// A `,` or closing bracket at `i`: ends a top-level capture when at depth 1.
    fn end_capture_at(&mut self, chunk: &[u8], i: usize) {
        if self.capture == Capture::None || self.depth != 1 {
            return;
        }
        let from = self.capture_from.min(i);
        self.capture_append(&chunk[from..i]);
        self.close_capture();
    }

    /// Parses what was captured; at the end of a body this also tries an unterminated
    /// capture, which parses if the body broke off right after the value.
    fn close_capture(&mut self) {
        let what = std::mem::replace(&mut self.capture, Capture::None);
        if what == Capture::None || self.capture_over {
            self.capture_buf.clear();
            self.capture_over = false;
            return;
        }
        let text = self.capture_buf.trim_ascii();
        match what {
            Capture::Usage => {
                if let (Some(usage), Ok(raw)) = (counts::read(text), std::str::from_utf8(text)) {
                    self.usage = Some((usage, raw.to_owned()));
                }
            }
            Capture::Type => self.type_value = serde_json::from_slice::<String>(text).ok(),
            Capture::Size => self.size = serde_json::from_slice::<String>(text).ok(),
            Capture::Quality => self.quality = serde_json::from_slice::<String>(text).ok(),
            Capture::None => {}
        }
        self.capture_buf.clear();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Data,
    Event,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// At the first byte of a line.
    Start,
    /// Reading a field name.
    Name,
    /// Reading a field's value.
    Value(Field),
    /// Comment, unknown field or overlong name: nothing to read until the line ends.
    Skip,
}

/// Line and event state of an SSE stream; each event's data goes through the
/// shared `JsonScanner`, reset between events.
struct SseState {
    line: Line,
    /// A `\r` ended the last line; a `\n` right after it belongs to that ending.
    skip_lf: bool,
    /// At the first byte of a field's value, where one space is not part of it.
    value_start: bool,
    first_line: bool,
    name_buf: [u8; FIELD_NAME_CAP],
    name_len: usize,
    name_over: bool,
    event_name: Vec<u8>,
    has_data: bool,

    images: u32,
    saw_error: bool,
    usage: Option<TokenUsage>,
    size: Option<String>,
    quality: Option<String>,
    raws: Vec<String>,
    raw_total: usize,
}

impl Default for SseState {
    fn default() -> Self {
        SseState {
            line: Line::Start,
            skip_lf: false,
            value_start: false,
            first_line: true,
            name_buf: [0; FIELD_NAME_CAP],
            name_len: 0,
            name_over: false,
            event_name: Vec::new(),
            has_data: false,
            images: 0,
            saw_error: false,
            usage: None,
            size: None,
            quality: None,
            raws: Vec::new(),
            raw_total: 0,
        }
    }
}

impl SseState {
    fn scan(&mut self, json: &mut JsonScanner, chunk: &[u8], out: &mut Out) {
        let len = chunk.len();
        let mut i = 0;
        while i < len {
            if self.skip_lf {
                self.skip_lf = false;
                if chunk[i] == b'\n' {
                    i += 1;
                    continue;
                }
            }
            match self.line {
                Line::Start => i = self.start_line(json, chunk[i], i),
                Line::Name => i = self.read_name(json, chunk, i, out),
                Line::Value(field) => i = self.read_value(json, chunk, i, field, out),
                Line::Skip => match memchr2(b'\r', b'\n', &chunk[i..]) {
                    None => i = len,
                    Some(k) => {
                        self.end_line(chunk[i + k]);
                        i += k + 1;
                    }
                },
            }
        }
    }

    /// At the first byte `b` (at `i`) of a line: a blank line ends the event, a colon
    /// starts a comment, anything else a field name. Returns where to go on.
    fn start_line(&mut self, json: &mut JsonScanner, b: u8, i: usize) -> usize {
        if b == b'\n' || b == b'\r' {
            self.dispatch(json);
            self.end_line(b);
            i + 1
        } else if b == b':' {
            self.line = Line::Skip;
            i + 1
        } else {
            self.line = Line::Name;
            self.name_len = 0;
            self.name_over = false;
            i
        }
    }

    /// Reads a field name from `i` up to its colon or line end. Returns where to go on.
    fn read_name(
        &mut self,
        json: &mut JsonScanner,
        chunk: &[u8],
        i: usize,
        out: &mut Out,
    ) -> usize {
        let len = chunk.len();
        let rest = &chunk[i..];
        let Some(k) = memchr3(b':', b'\r', b'\n', rest) else {
            self.note_name(rest);
            return len;
        };
        self.note_name(&rest[..k]);
        let field = self.field();
        self.begin_field(field);
        if rest[k] == b':' {
            self.line = Line::Value(field);
            self.value_start = true;
        } else {
            // A name alone is the field with an empty value.
            if field == Field::Data {
                json.end_line(out, len);
            }
            self.end_line(rest[k]);
        }
        i + k + 1
    }

    /// Reads `field`'s value from `i` up to its line end: data goes through `json`, an
    /// event name is kept (up to its cap). Returns where to go on.
    fn read_value(
        &mut self,
        json: &mut JsonScanner,
        chunk: &[u8],
        i: usize,
        field: Field,
        out: &mut Out,
    ) -> usize {
        let len = chunk.len();
        if self.value_start {
            self.value_start = false;
            if chunk[i] == b' ' {
                return i + 1;
            }
        }
        let end = memchr2(b'\r', b'\n', &chunk[i..]).map_or(len, |k| i + k);
        match field {
            Field::Data => json.scan(chunk, i, end, out),
            Field::Event => {
                let room = EVENT_NAME_CAP.saturating_sub(self.event_name.len());
                let take = (end - i).min(room);
                self.event_name.extend_from_slice(&chunk[i..i + take]);
            }
            Field::Other => {}
        }
        if end == len {
            return end;
        }
        if field == Field::Data {
            json.end_line(out, len);
        }
        self.end_line(chunk[end]);
        end + 1
    }

    fn note_name(&mut self, bytes: &[u8]) {
        if self.name_over {
            return;
        }
        let end = self.name_len + bytes.len();
        if end > FIELD_NAME_CAP {
            self.name_over = true;
        } else {
            self.name_buf[self.name_len..end].copy_from_slice(bytes);
            self.name_len = end;
        }
    }

    fn field(&self) -> Field {
        if self.name_over {
            return Field::Other;
        }
        let mut name = &self.name_buf[..self.name_len];
        if self.first_line {
            name = name.strip_prefix(BOM).unwrap_or(name);
        }
        match name {
            b"data" => Field::Data,
            b"event" => Field::Event,
            _ => Field::Other,
        }
    }

    fn begin_field(&mut self, field: Field) {
        match field {
            Field::Data => self.has_data = true,
            Field::Event => self.event_name.clear(),
            Field::Other => {}
        }
    }

    fn end_line(&mut self, terminator: u8) {
        self.line = Line::Start;
        self.skip_lf = terminator == b'\r';
        self.first_line = false;
    }

    /// A blank line ends an event. As in the SSE spec, an event without data is
    /// not dispatched, so the SDKs never see it and neither do we.
    fn dispatch(&mut self, json: &mut JsonScanner) {
        if self.has_data {
            json.close_capture();
            let name = self.event_name.trim_ascii();
            let completed = name.ends_with(b".completed")
                || json
                    .type_value
                    .as_deref()
                    .is_some_and(|t| t.ends_with(".completed"));
            if name == b"error" || json.saw_error {
                self.saw_error = true;
            }
            if completed {
                self.images = self.images.saturating_add(1);
                if let Some(size) = json.size.take() {
                    self.size = Some(size);
                }
                if let Some(quality) = json.quality.take() {
                    self.quality = Some(quality);
                }
                if let Some((usage, raw)) = json.usage.take() {
                    self.usage
                        .get_or_insert_with(TokenUsage::default)
                        .add(&usage);
                    if self.raw_total + raw.len() <= RAW_USAGE_TOTAL_CAP {
                        self.raw_total += raw.len();
                        self.raws.push(raw);
                    }
                }
            }
        }
        self.has_data = false;
        self.event_name.clear();
        json.reset();
    }

    /// End of stream. An event cut off before its blank line is still counted: the
    /// provider billed it and its image has gone to the client.
    fn finish(&mut self, json: &mut JsonScanner) {
        self.line = Line::Start;
        self.dispatch(json);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";
    const USAGE: &str = r#"{"input_tokens": 50, "input_tokens_details": {"image_tokens": 40, "text_tokens": 10}, "output_tokens": 50, "total_tokens": 100}"#;

    fn usage(input: i64, output: i64, total: i64, text: i64, image: i64) -> TokenUsage {
        TokenUsage {
            input_tokens: input,
            output_tokens: output,
            total_tokens: total,
            text_input_tokens: text,
            image_input_tokens: image,
            ..TokenUsage::default()
        }
    }

    fn usage_50_50() -> TokenUsage {
        usage(50, 50, 100, 10, 40)
    }

    fn run(kind: BodyKind, strip: bool, parts: &[&[u8]]) -> (Vec<u8>, Extracted) {
        let mut ex = Extractor::new(kind, strip);
        let mut out = Vec::new();
        for part in parts {
            out.extend_from_slice(&ex.feed(Bytes::copy_from_slice(part)));
        }
        out.extend_from_slice(&ex.finish());
        (out, ex.extracted())
    }

    /// Feeds `body` whole, split at every boundary, and one byte at a time; every way
    /// must give `want_out` and `want`, and a failure names the case. The reported size
    /// and quality are compared only when `want` expects some (their own cases below).
    fn check(
        name: &str,
        kind: BodyKind,
        strip: bool,
        body: &[u8],
        want_out: &[u8],
        want: &Extracted,
    ) {
        let sized = want.size.is_some() || want.quality.is_some();
        let run = |kind, strip, parts: &[&[u8]]| {
            let (out, got) = run(kind, strip, parts);
            let got = if sized {
                got
            } else {
                Extracted {
                    size: None,
                    quality: None,
                    ..got
                }
            };
            (out, got)
        };
        let (out, got) = run(kind, strip, &[body]);
        assert_eq!(
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(want_out),
            "{name}: whole"
        );
        assert_eq!(&got, want, "{name}: whole");
        for k in 0..=body.len() {
            let (out, got) = run(kind, strip, &[&body[..k], &body[k..]]);
            assert_eq!(out, want_out, "{name}: split at {k}");
            assert_eq!(&got, want, "{name}: split at {k}");
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        let (out, got) = run(kind, strip, &bytes);
        assert_eq!(out, want_out, "{name}: byte by byte");
        assert_eq!(&got, want, "{name}: byte by byte");
    }

    fn json_body(n: usize, b64: &str, usage_first: bool) -> String {
        let data =
            vec![format!(r#"{{"b64_json": "{b64}", "revised_prompt": "a cat"}}"#); n].join(", ");
        if usage_first {
            format!(
                r#"{{"created": 1795251252, "usage": {USAGE}, "data": [{data}], "size": "1024x1024"}}"#
            )
        } else {
            format!(
                r#"{{"created": 1795251252, "background": "opaque", "data": [{data}], "output_format": "png", "quality": "low", "size": "1024x1024", "usage": {USAGE}}}"#
            )
        }
    }

    fn want(
        usage: Option<TokenUsage>,
        raw: Option<&str>,
        images: u32,
        saw_error: bool,
    ) -> Extracted {
        Extracted {
            usage,
            raw_usage: raw.map(str::to_owned),
            images,
            saw_error,
            ..Extracted::default()
        }
    }

    fn want_images(images: u32) -> Extracted {
        want(None, None, images, false)
    }

    fn sse_event(name: &str, data: &str, eol: &str) -> String {
        format!("event: {name}{eol}data: {data}{eol}{eol}")
    }

    fn sse_body(prefix: &str, n: usize, b64: &str, eol: &str) -> String {
        let mut body = String::new();
        for index in 0..2 {
            let data = format!(
                r#"{{"type": "{prefix}.partial_image", "b64_json": "{b64}", "created_at": 1795251252, "size": "1024x1024", "partial_image_index": {index}}}"#
            );
            body.push_str(&sse_event(&format!("{prefix}.partial_image"), &data, eol));
        }
        for _ in 0..n {
            let data = format!(
                r#"{{"type": "{prefix}.completed", "b64_json": "{b64}", "created_at": 1795251252, "output_format": "png", "usage": {USAGE}}}"#
            );
            body.push_str(&sse_event(&format!("{prefix}.completed"), &data, eol));
        }
        body
    }

    const DATA_URL: &str = "data:image/png;base64,";

    /// One body for `check`, run under each of its `strip` settings: it must come out as
    /// `out` (unchanged where `None`) and give `want`.
    struct Case {
        name: String,
        kind: BodyKind,
        strip: &'static [bool],
        body: String,
        out: Option<String>,
        want: Extracted,
    }

    const KEEP: &[bool] = &[false];
    const CUT: &[bool] = &[true];
    const BOTH: &[bool] = &[false, true];

    fn case(
        name: impl Into<String>,
        kind: BodyKind,
        strip: &'static [bool],
        body: impl Into<String>,
        want: Extracted,
    ) -> Case {
        Case {
            name: name.into(),
            kind,
            strip,
            body: body.into(),
            out: None,
            want,
        }
    }

    /// Runs `check` on every case under each of its strip settings, each failure naming
    /// its case.
    fn check_all(cases: &[Case]) {
        let mut names = std::collections::HashSet::new();
        for c in cases {
            assert!(names.insert(&c.name), "two cases named {}", c.name);
            let out = c.out.as_deref().unwrap_or(&c.body);
            for &strip in c.strip {
                let name = format!("{} (strip {strip})", c.name);
                check(
                    &name,
                    c.kind,
                    strip,
                    c.body.as_bytes(),
                    out.as_bytes(),
                    &c.want,
                );
            }
        }
    }

    fn with_size(size: &str, quality: &str, want: Extracted) -> Extracted {
        Extracted {
            size: Some(size.into()),
            quality: Some(quality.into()),
            ..want
        }
    }

    fn json_cases() -> Vec<Case> {
        use BodyKind::Json;
        let full = || want(Some(usage_50_50()), Some(USAGE), 1, false);
        let cached_nested = r#"{"input_tokens":300,"input_tokens_details":{"text_tokens":100,"image_tokens":200,"cached_tokens_details":{"text_tokens":60,"image_tokens":150},"cached_tokens":210},"output_tokens":4160,"output_tokens_details":{"image_tokens":4000,"text_tokens":160},"total_tokens":4460}"#;
        let cached_flat = r#"{"input_tokens":300,"input_tokens_details":{"text_tokens":100,"image_tokens":200,"cached_tokens":130},"output_tokens":10}"#;
        let no_details = r#"{"input_tokens": 17, "output_tokens": 1056, "total_tokens": 1073}"#;
        vec![
            case(
                "json_usage_after_data_one_image",
                Json,
                BOTH,
                json_body(1, PNG, false),
                full(),
            ),
            case(
                "json_usage_after_data_three_images",
                Json,
                KEEP,
                json_body(3, PNG, false),
                want(Some(usage_50_50()), Some(USAGE), 3, false),
            ),
            case(
                "json_usage_before_data",
                Json,
                KEEP,
                json_body(2, PNG, true),
                want(Some(usage_50_50()), Some(USAGE), 2, false),
            ),
            case(
                "json_without_usage",
                Json,
                CUT,
                format!(
                    r#"{{"created": 1, "data": [{{"url": "https://x/y.png"}}, {{"b64_json": "{PNG}"}}]}}"#
                ),
                want_images(2),
            ),
            case(
                "the_reported_size_and_quality_are_read_at_the_top_level_only",
                Json,
                KEEP,
                format!(
                    r#"{{"created": 1, "data": [{{"b64_json": "{PNG}", "size": "9x9", "quality": "no"}}], "quality": "high", "usage": {USAGE}, "size": "1536x1024"}}"#
                ),
                with_size("1536x1024", "high", full()),
            ),
            case(
                "json_usage_with_nested_details_and_cached_tokens",
                Json,
                KEEP,
                format!(
                    "{{\"data\":[{{\"b64_json\":\"{PNG}\"}}],\n  \"usage\" : {cached_nested}\n}}\n"
                ),
                want(
                    Some(TokenUsage {
                        cached_text_input_tokens: 60,
                        cached_image_input_tokens: 150,
                        text_output_tokens: 160,
                        ..usage(300, 4160, 4460, 100, 200)
                    }),
                    Some(cached_nested),
                    1,
                    false,
                ),
            ),
            case(
                "json_usage_cached_tokens_without_split",
                Json,
                KEEP,
                format!(r#"{{"usage":{cached_flat},"data":[]}}"#),
                want(
                    Some(TokenUsage {
                        cached_text_input_tokens: 100,
                        cached_image_input_tokens: 30,
                        ..usage(300, 10, 310, 100, 200)
                    }),
                    Some(cached_flat),
                    0,
                    false,
                ),
            ),
            case(
                "json_usage_without_input_details",
                Json,
                KEEP,
                format!(
                    r#"{{"created": 1, "data": [{{"b64_json": "{PNG}"}}], "usage": {no_details}}}"#
                ),
                want(
                    Some(usage(17, 1056, 1073, 17, 0)),
                    Some(no_details),
                    1,
                    false,
                ),
            ),
            case(
                "json_nested_usage_and_data_are_not_top_level",
                Json,
                KEEP,
                format!(
                    r#"{{"meta": {{"usage": {USAGE}, "data": [1, 2, 3], "error": {{"code": 1}}}}, "data": [{{"b64_json": "{PNG}"}}]}}"#
                ),
                want_images(1),
            ),
            case(
                "json_repeated_data_key_counts_the_last",
                Json,
                KEEP,
                format!(r#"{{"data": [{{}}, {{}}, {{}}], "data": [{{"b64_json": "{PNG}"}}]}}"#),
                want_images(1),
            ),
            case(
                "json_error_body",
                Json,
                KEEP,
                r#"{"error": {"message": "Your request was rejected", "type": "invalid_request_error", "param": null, "code": "moderation_blocked"}}"#,
                want(None, None, 0, true),
            ),
            case(
                "json_error_null_is_no_error",
                Json,
                KEEP,
                format!(r#"{{"error": null, "data": [{{"b64_json": "{PNG}"}}]}}"#),
                want_images(1),
            ),
            case(
                "escaped_quotes_inside_strings",
                Json,
                CUT,
                format!(
                    r#"{{"data":[{{"b64_json":"{PNG}","revised_prompt":"a \"usage\": {{\"input_tokens\": 9}}, \\"}}],"note":"\\\"data\":[","usage":{USAGE}}}"#
                ),
                full(),
            ),
        ]
    }

    fn sse_cases() -> Vec<Case> {
        use BodyKind::Sse;
        let full = || want(Some(usage_50_50()), Some(USAGE), 1, false);
        let partial = format!(
            r#"{{"type": "image_generation.partial_image", "b64_json": "{PNG}", "size": "1024x1024", "quality": "low"}}"#
        );
        let completed = format!(
            r#"{{"type": "image_generation.completed", "b64_json": "{PNG}", "size": "1024x1536", "quality": "medium", "usage": {USAGE}}}"#
        );
        let mut truncated = sse_body("image_generation", 1, PNG, "\n");
        truncated.truncate(truncated.len() - 2);
        let second = r#"{"input_tokens":7,"output_tokens":3}"#;
        let second_data = format!(
            r#"{{"type":"image_generation.completed","b64_json":"{PNG}","usage":{second}}}"#
        );
        let error =
            r#"{"error": {"message": "upstream timed out", "type": "server_error", "code": null}}"#;
        vec![
            // The completed event's size and quality, not a partial image's.
            case(
                "the_reported_size_and_quality_are_read_from_the_completed_event",
                Sse,
                KEEP,
                sse_event("image_generation.partial_image", &partial, "\n")
                    + &sse_event("image_generation.completed", &completed, "\n"),
                with_size("1024x1536", "medium", full()),
            ),
            case(
                "sse_generation_partial_and_completed",
                Sse,
                BOTH,
                sse_body("image_generation", 1, PNG, "\n"),
                full(),
            ),
            case(
                "sse_edit_partial_and_completed",
                Sse,
                KEEP,
                sse_body("image_edit", 1, PNG, "\n"),
                full(),
            ),
            case(
                "sse_crlf_and_comments",
                Sse,
                KEEP,
                format!(
                    ": keep-alive\r\n\r\n{}",
                    sse_body("image_generation", 1, PNG, "\r\n")
                ),
                full(),
            ),
            case(
                "sse_cr_only",
                Sse,
                KEEP,
                sse_body("image_generation", 1, PNG, "\r"),
                full(),
            ),
            // Only the event name says completed: a CRLF read as two line ends would split
            // the event from its data.
            case(
                "sse_crlf_event_name_alone_says_completed",
                Sse,
                KEEP,
                format!("event: image_edit.completed\r\ndata: {{\"usage\": {USAGE}}}\r\n\r\n"),
                full(),
            ),
            case(
                "sse_multiline_data_joins_with_newlines",
                Sse,
                KEEP,
                "event: image_generation.completed\ndata: {\"usage\": {\"input_tokens\": 5,\ndata:  \"output_tokens\": 7}}\n\n",
                want(
                    Some(usage(5, 7, 12, 5, 0)),
                    Some("{\"input_tokens\": 5,\n \"output_tokens\": 7}"),
                    1,
                    false,
                ),
            ),
            // Joined by the line break, `1` and `2` are two tokens, not `12`: not JSON.
            case(
                "sse_multiline_data_split_number_is_not_json",
                Sse,
                KEEP,
                "data: {\"type\": \"image_generation.completed\", \"usage\": {\"input_tokens\": 1\ndata: 2}}\n\n",
                want_images(1),
            ),
            case(
                "sse_leading_bom_is_ignored",
                Sse,
                KEEP,
                format!(
                    "\u{feff}event: image_generation.completed\ndata: {{\"usage\": {USAGE}}}\n\n"
                ),
                full(),
            ),
            case(
                "sse_type_alone_marks_completed_and_data_needs_no_space",
                Sse,
                KEEP,
                format!(
                    "data:{{\"type\":\"image_generation.completed\",\"b64_json\":\"{PNG}\",\"usage\":{USAGE}}}\n\n"
                ),
                full(),
            ),
            case(
                "sse_two_completed_events_are_summed",
                Sse,
                KEEP,
                sse_body("image_generation", 1, PNG, "\n")
                    + &sse_event("image_generation.completed", &second_data, "\n"),
                want(
                    Some(usage(57, 53, 110, 17, 40)),
                    Some(&format!("[{USAGE},{second}]")),
                    2,
                    false,
                ),
            ),
            case(
                "sse_last_event_without_blank_line_counts",
                Sse,
                KEEP,
                truncated,
                full(),
            ),
            case(
                "sse_error_event",
                Sse,
                KEEP,
                sse_body("image_generation", 0, PNG, "\n") + &sse_event("error", error, "\n"),
                want(None, None, 0, true),
            ),
            // No `event:` line, only an `error` key in the data.
            case(
                "sse_error_key_in_data",
                Sse,
                KEEP,
                "data: {\"error\": {\"message\": \"boom\"}}\n\n",
                want(None, None, 0, true),
            ),
        ]
    }

    fn strip_cases() -> Vec<Case> {
        use BodyKind::{Json, Sse};
        let prefixed = format!("{DATA_URL}{PNG}");
        let mut cases = vec![
            Case {
                out: Some(json_body(3, PNG, false)),
                ..case(
                    "strip_on_json_removes_prefix_only",
                    Json,
                    CUT,
                    json_body(3, &prefixed, false),
                    want(Some(usage_50_50()), Some(USAGE), 3, false),
                )
            },
            Case {
                out: Some(format!(
                    r#"{{"data":[{{"b64_json":"{PNG}"}}],"x":{{"y":[{{"b64_json" : ""}}]}}}}"#
                )),
                ..case(
                    "strip_on_json_nested_and_escaped_slash",
                    Json,
                    CUT,
                    format!(
                        r#"{{"data":[{{"b64_json":"data:image\/webp;base64,{PNG}"}}],"x":{{"y":[{{"b64_json" : "{DATA_URL}"}}]}}}}"#
                    ),
                    want_images(1),
                )
            },
            Case {
                out: Some(sse_body("image_generation", 2, PNG, "\r\n")),
                ..case(
                    "strip_on_sse_removes_prefix_only",
                    Sse,
                    CUT,
                    sse_body("image_generation", 2, &prefixed, "\r\n"),
                    want(
                        Some(usage(100, 100, 200, 20, 80)),
                        Some(&format!("[{USAGE},{USAGE}]")),
                        2,
                        false,
                    ),
                )
            },
            case(
                "strip_on_leaves_other_keys_alone",
                Json,
                CUT,
                format!(r#"{{"url":"{DATA_URL}{PNG}","data":[{{"b64_jsonx":"{DATA_URL}"}}]}}"#),
                want_images(1),
            ),
            case(
                "strip_off_keeps_prefix_json",
                Json,
                KEEP,
                json_body(1, &prefixed, false),
                want(Some(usage_50_50()), Some(USAGE), 1, false),
            ),
            case(
                "strip_off_keeps_prefix_sse",
                Sse,
                KEEP,
                sse_body("image_generation", 1, &prefixed, "\n"),
                want(Some(usage_50_50()), Some(USAGE), 1, false),
            ),
        ];
        // Strings that start like a data URL but are not one must come out whole.
        let lookalikes = [
            PNG.to_owned(),
            "data".to_owned(),
            "data:".to_owned(),
            "data:text/plain,hello".to_owned(),
            format!("data:{};base64,{PNG}", "x".repeat(PREFIX_WINDOW)),
            format!("data:\\\"{PNG}"),
        ];
        for (i, b64) in lookalikes.iter().enumerate() {
            let want = want(Some(usage_50_50()), Some(USAGE), 2, false);
            cases.push(case(
                format!("strip_on_without_prefix_changes_nothing json #{i}"),
                Json,
                CUT,
                json_body(2, b64, false),
                want.clone(),
            ));
            cases.push(case(
                format!("strip_on_without_prefix_changes_nothing sse #{i}"),
                Sse,
                CUT,
                sse_body("image_edit", 1, b64, "\n"),
                Extracted { images: 1, ..want },
            ));
        }
        cases
    }

    #[test]
    fn json_bodies_give_their_usage_images_and_errors() {
        check_all(&json_cases());
    }

    #[test]
    fn sse_bodies_give_their_usage_images_and_errors() {
        check_all(&sse_cases());
    }

    #[test]
    fn strip_cuts_the_data_url_prefix_and_nothing_else() {
        check_all(&strip_cases());
    }

    #[test]
    fn unchanged_chunk_is_the_same_buffer() {
        let body = Bytes::from(json_body(1, PNG, false));
        let mut ex = Extractor::new(BodyKind::Json, true);
        let half = body.slice(..body.len() / 2);
        let out = ex.feed(half.clone());
        assert_eq!(out.as_ptr(), half.as_ptr());
        assert_eq!(out.len(), half.len());
        let rest = body.slice(body.len() / 2..);
        let out = ex.feed(rest.clone());
        assert_eq!(out.as_ptr(), rest.as_ptr());
        assert!(ex.finish().is_empty());

        let sse = Bytes::from(sse_body("image_generation", 1, PNG, "\n"));
        let mut ex = Extractor::new(BodyKind::Sse, true);
        let out = ex.feed(sse.clone());
        assert_eq!(out.as_ptr(), sse.as_ptr());
        assert_eq!(out.len(), sse.len());
    }

    #[test]
    fn prefix_split_across_chunks_is_held_then_cut_without_copy() {
        let body = Bytes::from(json_body(1, &format!("{DATA_URL}{PNG}"), false));
        let at = body.windows(5).position(|w| w == b"data:").unwrap() + 8;
        let mut ex = Extractor::new(BodyKind::Json, true);
        let first = ex.feed(body.slice(..at));
        assert_eq!(first.len(), at - 8, "only the undecided prefix is held");
        let rest = body.slice(at..);
        let second = ex.feed(rest.clone());
        let cut = DATA_URL.len() - 8;
        assert_eq!(
            second.as_ptr(),
            rest[cut..].as_ptr(),
            "the cut is a slice, not a copy"
        );
    }

    #[test]
    fn usage_too_long_is_dropped() {
        let pad = "1".repeat(USAGE_CAPTURE_CAP);
        let body = format!(r#"{{"usage":{{"input_tokens":5,"pad":{pad}}},"data":[{{}}]}}"#);
        let (out, got) = run(BodyKind::Json, false, &[body.as_bytes()]);
        assert_eq!(out, body.as_bytes());
        assert_eq!(got, want_images(1));
    }

    #[test]
    fn from_json_rules() {
        let v: Value = serde_json::from_str(
            r#"{"input_tokens":-5,"output_tokens":2.5,"input_tokens_details":{"text_tokens":"3","image_tokens":4}}"#,
        )
        .unwrap();
        assert_eq!(TokenUsage::from_json(&v), Some(usage(0, 0, 0, 0, 4)));
        let v: Value = serde_json::from_str(
            r#"{"input_tokens":9,"input_tokens_details":{"cached_tokens":4}}"#,
        )
        .unwrap();
        let want_usage = TokenUsage {
            cached_text_input_tokens: 4,
            ..usage(9, 0, 9, 9, 0)
        };
        assert_eq!(TokenUsage::from_json(&v), Some(want_usage));
        assert_eq!(TokenUsage::from_json(&Value::Null), None);
        assert_eq!(TokenUsage::from_json(&serde_json::json!([1])), None);
    }

    /// Small deterministic generator, so failures replay.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }

        fn below(&mut self, n: usize) -> usize {
            usize::try_from(self.next()).unwrap_or(0) % n.max(1)
        }
    }

    #[test]
    fn garbage_does_not_panic_and_never_depends_on_chunking() {
        let seeds: Vec<Vec<u8>> = vec![
            json_body(2, &format!("{DATA_URL}{PNG}"), false).into_bytes(),
            sse_body("image_edit", 2, &format!("{DATA_URL}{PNG}"), "\r\n").into_bytes(),
            b"{{{{[[[[\"\\".repeat(1000),
            b"}}]]]]\"\":::,,,".repeat(100),
            vec![0xff, 0xfe, b'"', b'\\', 0x80, b'\r', b'\n', b'{', b':'],
            b"data: {\"usage\":{\"input_tokens\":1}\r\r\n\n\n:x\nevent\ndata\n\n".to_vec(),
        ];
        let alphabet = b"{}[]\":,\\ \r\nusagedatab64_json:;base64,errortype.completed0123-\xff";
        let mut rng = Lcg(7);
        for round in 0..400 {
            let mut body = seeds[round % seeds.len()].clone();
            for _ in 0..rng.below(8) {
                let at = rng.below(body.len() + 1);
                match rng.below(3) {
                    0 if at < body.len() => {
                        body.remove(at);
                    }
                    1 => body.insert(at, alphabet[rng.below(alphabet.len())]),
                    _ => {
                        let mut junk = vec![0u8; rng.below(40)];
                        junk.iter_mut()
                            .for_each(|b| *b = u8::try_from(rng.below(256)).unwrap_or(0));
                        body.splice(at..at, junk);
                    }
                }
            }
            for kind in [BodyKind::Json, BodyKind::Sse] {
                for strip in [false, true] {
                    let (whole_out, whole) = run(kind, strip, &[&body]);
                    if !strip || !body.windows(BASE64_MARK.len()).any(|w| w == BASE64_MARK) {
                        assert_eq!(
                            whole_out, body,
                            "nothing to cut, so the body passes unchanged"
                        );
                    }
                    assert!(whole_out.len() <= body.len());
                    let mut parts = Vec::new();
                    let mut rest = body.as_slice();
                    while !rest.is_empty() {
                        let (part, tail) = rest.split_at(rng.below(rest.len().min(64)) + 1);
                        parts.push(part);
                        rest = tail;
                    }
                    let (out, got) = run(kind, strip, &parts);
                    assert_eq!(out, whole_out, "round {round}");
                    assert_eq!(got, whole, "round {round}");
                }
            }
        }
        // Depth far beyond anything tracked, then truncated.
        let deep = "[".repeat(1 << 20);
        let (out, _) = run(BodyKind::Json, true, &[deep.as_bytes()]);
        assert_eq!(out.len(), deep.len());
    }
}
