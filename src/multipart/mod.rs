//! Multipart edits and variations, streamed: the client's form is parsed part by part and
//! re-encoded for the provider as it arrives. Parts that come before `model` wait in a
//! spool file on disk (never in memory) until the route is known.

mod encode;
mod guard;

use std::sync::Arc;

use axum::body::Body;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use http::{HeaderMap, HeaderValue, header};

use crate::body_timeout::declared_length;
use crate::config::{Route, UploadLimits};
use crate::error::ApiError;
use crate::routing::{CostGuard, Prepared, Pump, RequestSource};
use crate::upstream::{BodySender, Endpoint, RequestSummary, UpstreamRequest, body_channel};

pub use crate::spool::{Spool, SpoolArea, clean_spool_dir};
pub use encode::Encoder;

/// The longest text field accepted (a prompt of 32,000 characters fits).
const MAX_TEXT_BYTES: usize = 256 * 1024;
/// The most text an upload may hold in memory at once (the parts before `model`, or the
/// whole upload's text when it is kept for failover): 64 parts of [`MAX_TEXT_BYTES`] would
/// otherwise hold 16 MiB per request.
const MAX_HELD_TEXT_BYTES: usize = 1024 * 1024;
/// Chunks in flight between the client's upload and the provider's request.
///
/// Memory per upload in flight is bounded by this times [`PIECE_BYTES`], plus the server's
/// read buffer that the pieces are cut from: the client is read no faster than the
/// provider takes it.
const CHANNEL_CHUNKS: usize = 2;
/// The largest piece handed to the provider's body at once. The server reads client bodies
/// in pieces of up to ~400 KiB; passing them on whole would let eight uploads hold tens of
/// MiB between the two sockets.
const PIECE_BYTES: usize = 64 * 1024;
/// Parts other than images (text fields, masks, unknown files). OpenAI's edit takes about
/// fifteen; text parts before `model` are held in memory, so their number is bounded.
const MAX_OTHER_PARTS: usize = 64;

/// What a part is, by its name. Only images and masks are files: any other part is read
/// as text even when it comes with a filename, so that `model` or `n` sent as a file is
/// still rewritten, forced or dropped like the text field it is to the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Image,
    Mask,
    Text,
}

fn role(name: &str) -> Role {
    let indexed = name
        .strip_prefix("image[")
        .and_then(|rest| rest.strip_suffix(']'))
        .is_some_and(|inner| inner.bytes().all(|b| b.is_ascii_digit()));
    match name {
        "image" | "image[]" => Role::Image,
        _ if indexed => Role::Image,
        "mask" => Role::Mask,
        _ => Role::Text,
    }
}

/// A part read before `model`: text kept in memory (it is small), files in the spool.
enum Held {
    Text {
        name: String,
        /// Its headers besides Content-Disposition, as they go on (see [`part_headers`]).
        headers: Bytes,
        value: Bytes,
    },
    File {
        header: FileHeader,
        offset: u64,
        len: u64,
    },
}

#[derive(Debug, Clone)]
struct FileHeader {
    name: String,
    filename: Option<String>,
    content_type: String,
    role: Role,
}

/// A client's multipart upload being read.
pub struct Upload {
    multipart: multer::Multipart<'static>,
    endpoint: Endpoint,
    limits: UploadLimits,
    images: usize,
    others: usize,
    saw_prompt: bool,
    /// The text parts' names so far: each may come once.
    texts: std::collections::HashSet<String>,
    summary: RequestSummary,
    held: Vec<Held>,
    /// Bytes of the text parts in `held`.
    held_text: usize,
    spool: Option<Spool>,
    /// The body ended before `model` was seen.
    ended: bool,
    model: Option<String>,
}

impl Upload {
    /// Checks the headers: a multipart body with a boundary, within the size limit.
    pub fn new(
        headers: &HeaderMap,
        body: Body,
        endpoint: Endpoint,
        limits: UploadLimits,
    ) -> Result<Upload, ApiError> {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !content_type
            .to_ascii_lowercase()
            .starts_with("multipart/form-data")
        {
            return Err(ApiError::UnsupportedMediaType {
                expected: match endpoint {
                    Endpoint::Edits => "multipart/form-data or application/json",
                    _ => "multipart/form-data",
                },
            });
        }
        let boundary = multer::parse_boundary(content_type).map_err(|_| {
            ApiError::invalid(
                "The multipart Content-Type has no usable boundary parameter.",
                None,
            )
        })?;
        let declared = declared_length(headers);
        if declared.is_some_and(|len| len > limits.max_body_bytes) {
            return Err(body_too_large(limits.max_body_bytes));
        }
        let constraints = multer::Constraints::new().size_limit(
            multer::SizeLimit::new()
                .whole_stream(limits.max_body_bytes)
                // The finer limits (image, mask, text) are checked part by part below.
                .per_field(limits.max_image_bytes.max(limits.max_mask_bytes) + 1),
        );
        let mut guard = guard::HeaderGuard::new(&boundary);
        let stream = body
            .into_data_stream()
            .map_err(std::io::Error::other)
            .map(move |chunk| {
                let chunk = chunk?;
                guard.check(&chunk).map_err(std::io::Error::other)?;
                Ok::<_, std::io::Error>(chunk)
            });
        Ok(Upload {
            multipart: multer::Multipart::with_constraints(stream, boundary, constraints),
            endpoint,
            limits,
            images: 0,
            others: 0,
            saw_prompt: false,
            texts: std::collections::HashSet::new(),
            summary: RequestSummary::default(),
            held: Vec::new(),
            held_text: 0,
            spool: None,
            ended: false,
            model: None,
        })
    }

    /// Reads parts until `model` (or the end of the body), holding what comes before it.
    /// Returns the model named, if any.
    pub async fn read_until_model(
        &mut self,
        spool: &SpoolArea,
    ) -> Result<Option<String>, ApiError> {
        while !self.ended {
            if let Some(model) = self.hold_next(spool).await? {
                return Ok(Some(model));
            }
        }
        Ok(None)
    }

    /// Holds one more part (text in memory, a file in the spool); returns the model when
    /// that part was `model`.
    async fn hold_next(&mut self, area: &SpoolArea) -> Result<Option<String>, ApiError> {
        let Some(mut field) = self.multipart.next_field().await.map_err(multipart_error)? else {
            self.ended = true;
            return Ok(None);
        };
        let name = part_name(&field)?;
        match role(&name) {
            Role::Text => {
                let headers = part_headers(&field);
                let value = read_text(&mut field, &name).await?;
                self.note_text(&name, &value)?;
                self.held_text += value.len();
                if self.held_text > MAX_HELD_TEXT_BYTES {
                    return Err(ApiError::InvalidRequest {
                        message: format!(
                            "The text parts of this upload (up to '{name}') are larger than the limit of {MAX_HELD_TEXT_BYTES} bytes in all; send 'model' first, or less text."
                        ),
                        param: Some(name),
                        code: Some("text_parts_too_large"),
                    });
                }
                let model = if name == "model" {
                    let model = String::from_utf8(value.to_vec()).map_err(|_| {
                        ApiError::invalid("'model' must be UTF-8 text.", Some("model"))
                    })?;
                    self.model = Some(model.clone());
                    Some(model)
                } else {
                    None
                };
                self.held.push(Held::Text {
                    name,
                    headers,
                    value,
                });
                Ok(model)
            }
            file_role => {
                self.note_file(file_role)?;
                let spool = match &mut self.spool {
                    Some(spool) => spool,
                    None => self.spool.insert(Spool::create(area).await?),
                };
                let offset = spool.written();
                let mut sniffer =
                    Sniffer::new(field.content_type().map(|m| m.essence_str().to_owned()));
                let mut len = 0u64;
                while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
                    len += chunk.len() as u64;
                    check_file_size(&self.limits, file_role, &name, len)?;
                    sniffer.feed(&chunk);
                    spool.write(&chunk).await?;
                }
                let header = FileHeader {
                    name,
                    filename: field.file_name().map(str::to_owned),
                    content_type: sniffer.content_type(),
                    role: file_role,
                };
                self.held.push(Held::File {
                    header,
                    offset,
                    len,
                });
                Ok(None)
            }
        }
    }

    /// Turns the upload into what the provider calls are made from. With one attempt the
    /// rest of the upload streams through as it arrives; with failover it is read to the
    /// spool first, so that every attempt sends the same bytes without holding them in
    /// memory.
    pub async fn into_source(
        self,
        spool: &SpoolArea,
        attempts: usize,
    ) -> Result<UploadSource, ApiError> {
        if attempts <= 1 {
            return Ok(UploadSource::Live(Some(Box::new(self))));
        }
        self.into_recorded(spool).await
    }

    /// Reads the rest of the upload into the spool (within its quota) and checks that it is
    /// complete: for calls that need the whole request before they start (failover's
    /// replays, async jobs answered before their call is sent).
    pub async fn into_recorded(mut self, spool: &SpoolArea) -> Result<UploadSource, ApiError> {
        while !self.ended {
            self.hold_next(spool).await?;
        }
        self.check_complete()?;
        if let Some(spool) = &mut self.spool {
            spool.flush().await?;
        }
        Ok(UploadSource::Replay(Arc::new(Recorded {
            held: self.held,
            spool: self.spool,
            endpoint: self.endpoint,
            summary: self.summary,
        })))
    }

    /// The provider request for `route`, and the pump that feeds it: held parts first (from
    /// memory and the spool), then the rest of the upload as it arrives. The request carries
    /// the summary of the parts read so far; the pump returns the whole one when it ends.
    /// Each text part read after the hold is covered by `cost` before it is sent on.
    pub fn prepare(self, route: &Route, cost: CostGuard) -> Result<Prepared, ApiError> {
        let encoder = Encoder::new(route, self.endpoint);
        let content_type =
            HeaderValue::from_str(&encoder.content_type()).map_err(ApiError::internal)?;
        let (endpoint, summary) = (self.endpoint, self.summary.clone());
        Ok(streamed(endpoint, content_type, summary, |tx| {
            Box::pin(self.pump(encoder, tx, cost))
        }))
    }

    async fn pump(
        mut self,
        mut encoder: Encoder,
        tx: BodySender,
        cost: CostGuard,
    ) -> Result<RequestSummary, ApiError> {
        let out = Out { tx };
        if let Some(spool) = &mut self.spool {
            spool.flush().await?;
        }
        emit_held(&self.held, self.spool.as_ref(), &mut encoder, &out).await?;
        // The spool is no longer needed: the rest streams straight through.
        self.spool = None;
        if !self.ended {
            while let Some(mut field) =
                self.multipart.next_field().await.map_err(multipart_error)?
            {
                let name = part_name(&field)?;
                match role(&name) {
                    Role::Text => {
                        let headers = part_headers(&field);
                        let value = read_text(&mut field, &name).await?;
                        self.note_text(&name, &value)?;
                        // Before the part goes on: a field that raised the worst case past
                        // what the budget holds stops the call while its body is unfinished.
                        cost.cover(&self.summary).await?;
                        if let Some(part) = encoder.text(&name, &headers, &value) {
                            out.send(part).await?;
                        }
                    }
                    file_role if !encoder.keeps(&name) => {
                        self.note_file(file_role)?;
                        self.skip_file(&mut field, &name, file_role).await?;
                    }
                    file_role => {
                        self.note_file(file_role)?;
                        self.stream_file(&encoder, &out, &mut field, &name, file_role)
                            .await?;
                    }
                }
            }
        }
        self.check_complete()?;
        out.send(encoder.finish()).await?;
        out.tx.finish();
        Ok(self.summary)
    }

    /// Reads a file part this provider does not take to its end, sending nothing, while
    /// still holding it to its size limit.
    async fn skip_file(
        &self,
        field: &mut multer::Field<'static>,
        name: &str,
        file_role: Role,
    ) -> Result<(), ApiError> {
        let mut len = 0u64;
        while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
            len += chunk.len() as u64;
            check_file_size(&self.limits, file_role, name, len)?;
        }
        Ok(())
    }

    /// Sends a file part to the provider as it arrives: its header once its type is known,
    /// then its bytes, then the part's end.
    async fn stream_file(
        &self,
        encoder: &Encoder,
        out: &Out,
        field: &mut multer::Field<'static>,
        name: &str,
        file_role: Role,
    ) -> Result<(), ApiError> {
        let mut sniffer = Sniffer::new(field.content_type().map(|m| m.essence_str().to_owned()));
        let filename = field.file_name().map(str::to_owned);
        let mut pending = Vec::new();
        let mut len = 0u64;
        let mut started = false;
        loop {
            let chunk = field.chunk().await.map_err(multipart_error)?;
            if let Some(chunk) = &chunk {
                len += chunk.len() as u64;
                check_file_size(&self.limits, file_role, name, len)?;
            }
            if started {
                match chunk {
                    Some(chunk) => out.send(chunk).await?,
                    None => break,
                }
                continue;
            }
            // The part's type may have to be read from its first bytes, so
            // its header waits for them (or for its end).
            let ended = chunk.is_none();
            if let Some(chunk) = chunk {
                sniffer.feed(&chunk);
                pending.push(chunk);
            }
            if sniffer.decided() || ended {
                started = true;
                out.send(encoder.file_header(
                    name,
                    file_role == Role::Image,
                    filename.as_deref(),
                    &sniffer.content_type(),
                ))
                .await?;
                for chunk in pending.drain(..) {
                    out.send(chunk).await?;
                }
            }
            if ended {
                break;
            }
        }
        out.send(Encoder::part_end()).await?;
        Ok(())
    }

    /// Checks a text field and records what the usage row needs of it.
    fn note_text(&mut self, name: &str, value: &[u8]) -> Result<(), ApiError> {
        self.note_other()?;
        // A provider reads one value of each field, which need not be the one imagegate
        // routed, checked and priced: a repeated field is refused, not guessed at.
        if !self.texts.insert(name.to_owned()) {
            return Err(ApiError::InvalidRequest {
                message: format!(
                    "The field '{name}' was sent more than once; send each field once."
                ),
                param: Some(name.to_owned()),
                code: Some("duplicate_parameter"),
            });
        }
        let text = std::str::from_utf8(value)
            .map_err(|_| ApiError::invalid(format!("'{name}' must be UTF-8 text."), Some(name)))?;
        let summary = &mut self.summary;
        match name {
            "prompt" => {
                if text.trim().is_empty() {
                    return Err(ApiError::invalid(
                        "Invalid 'prompt': it must not be empty.",
                        Some("prompt"),
                    ));
                }
                self.saw_prompt = true;
                summary.prompt_chars = text.chars().count();
            }
            "n" => {
                let n: i32 = text
                    .trim()
                    .parse()
                    .ok()
                    .filter(|n| (1..=10).contains(n))
                    .ok_or_else(|| {
                        ApiError::invalid(
                            format!(
                                "Invalid 'n': {text:?}; it must be an integer between 1 and 10."
                            ),
                            Some("n"),
                        )
                    })?;
                summary.n = Some(n);
            }
            "stream" => summary.stream = text.trim().eq_ignore_ascii_case("true"),
            "size" => summary.size = Some(text.to_owned()),
            "quality" => summary.quality = Some(text.to_owned()),
            "partial_images" => summary.partial_images = text.trim().parse().ok(),
            _ => {}
        }
        Ok(())
    }

    fn note_other(&mut self) -> Result<(), ApiError> {
        self.others += 1;
        if self.others > MAX_OTHER_PARTS {
            return Err(ApiError::invalid(
                format!(
                    "Too many parts: at most {MAX_OTHER_PARTS} besides the images are accepted."
                ),
                None,
            ));
        }
        Ok(())
    }

    fn note_file(&mut self, role: Role) -> Result<(), ApiError> {
        if role == Role::Image {
            self.images += 1;
            if self.images > self.limits.max_images {
                return Err(ApiError::invalid(
                    format!(
                        "Too many images: at most {} are accepted.",
                        self.limits.max_images
                    ),
                    Some("image"),
                ));
            }
            if self.endpoint == Endpoint::Variations && self.images > 1 {
                return Err(ApiError::invalid(
                    "A variation takes exactly one image.",
                    Some("image"),
                ));
            }
        } else {
            self.note_other()?;
        }
        Ok(())
    }

    fn check_complete(&self) -> Result<(), ApiError> {
        if self.images == 0 {
            return Err(ApiError::invalid(
                "Missing required parameter: 'image'.",
                Some("image"),
            ));
        }
        if self.endpoint == Endpoint::Edits && !self.saw_prompt {
            return Err(ApiError::invalid(
                "Missing required parameter: 'prompt'.",
                Some("prompt"),
            ));
        }
        Ok(())
    }
}

impl UploadSource {
    /// Whether the upload asks for a streamed answer (known for a recorded upload only).
    pub fn streamed(&self) -> bool {
        match self {
            UploadSource::Live(_) => false,
            UploadSource::Replay(recorded) => recorded.summary.stream,
        }
    }
}

/// What the provider calls of one edit are made from.
pub enum UploadSource {
    /// One attempt: the upload streams through while it arrives.
    Live(Option<Box<Upload>>),
    /// Several attempts: the whole upload is in the spool, replayed for each.
    Replay(Arc<Recorded>),
}

#[async_trait::async_trait]
impl RequestSource for UploadSource {
    /// A recorded upload is whole: its hold is made on all of its fields.
    fn fields_arrive_late(&self) -> bool {
        matches!(self, UploadSource::Live(Some(_)))
    }

    async fn prepare(
        &mut self,
        route: &Route,
        _attempt: usize,
        cost: CostGuard,
    ) -> Result<Prepared, ApiError> {
        match self {
            UploadSource::Live(upload) => upload
                .take()
                .ok_or_else(|| ApiError::internal("a streamed upload can be sent once"))?
                .prepare(route, cost),
            UploadSource::Replay(recorded) => Ok(Arc::clone(recorded).prepare(route)),
        }
    }
}

/// A whole upload, held in the spool (files) and in memory (its small text fields).
pub struct Recorded {
    held: Vec<Held>,
    spool: Option<Spool>,
    endpoint: Endpoint,
    summary: RequestSummary,
}

impl Recorded {
    fn prepare(self: Arc<Self>, route: &Route) -> Prepared {
        let mut encoder = Encoder::new(route, self.endpoint);
        let content_type = HeaderValue::from_str(&encoder.content_type())
            .unwrap_or_else(|_| HeaderValue::from_static("multipart/form-data"));
        let (endpoint, summary) = (self.endpoint, self.summary.clone());
        streamed(endpoint, content_type, summary, |tx| {
            Box::pin(async move {
                let out = Out { tx };
                emit_held(&self.held, self.spool.as_ref(), &mut encoder, &out).await?;
                out.send(encoder.finish()).await?;
                out.tx.finish();
                Ok(self.summary.clone())
            })
        })
    }
}

/// A provider request whose body `pump` streams, given the sending half of its channel.
fn streamed(
    endpoint: Endpoint,
    content_type: HeaderValue,
    summary: RequestSummary,
    pump: impl FnOnce(BodySender) -> Pump,
) -> Prepared {
    let (tx, body) = body_channel(CHANNEL_CHUNKS);
    Prepared {
        request: UpstreamRequest {
            endpoint,
            content_type,
            body,
            summary,
        },
        pump: Some(pump(tx)),
    }
}

/// Sends the held parts: text from memory, files from the spool.
async fn emit_held(
    held: &[Held],
    spool: Option<&Spool>,
    encoder: &mut Encoder,
    out: &Out,
) -> Result<(), ApiError> {
    for part in held {
        match part {
            Held::Text {
                name,
                headers,
                value,
            } => {
                if let Some(part) = encoder.text(name, headers, value) {
                    out.send(part).await?;
                }
            }
            Held::File { header, .. } if !encoder.keeps(&header.name) => {}
            Held::File {
                header,
                offset,
                len,
            } => {
                out.send(encoder.file_header(
                    &header.name,
                    header.role == Role::Image,
                    header.filename.as_deref(),
                    &header.content_type,
                ))
                .await?;
                let spool = spool.ok_or_else(|| ApiError::internal("spool missing"))?;
                let mut reader = spool.reader(*offset, *len).await?;
                while let Some(chunk) = reader.next_chunk().await? {
                    out.send(chunk).await?;
                }
                out.send(Encoder::part_end()).await?;
            }
        }
    }
    Ok(())
}

/// The sending half of the provider's body; a closed channel means the call is gone.
struct Out {
    tx: BodySender,
}

impl Out {
    async fn send(&self, mut chunk: Bytes) -> Result<(), ApiError> {
        while !chunk.is_empty() {
            // Cutting shares the buffer: no copy.
            let piece = chunk.split_to(chunk.len().min(PIECE_BYTES));
            self.tx
                .send(piece)
                .await
                .map_err(|_| ApiError::UpstreamClosedBody)?;
        }
        Ok(())
    }
}

/// A part's name. Its Content-Disposition must be UTF-8 text: multer passes an unreadable
/// name or filename on as a missing one, which would change what the part is.
fn part_name(field: &multer::Field<'static>) -> Result<String, ApiError> {
    let disposition = field.headers().get(header::CONTENT_DISPOSITION);
    if disposition.is_some_and(|d| std::str::from_utf8(d.as_bytes()).is_err()) {
        return Err(ApiError::invalid(
            "A part's name and filename must be UTF-8 text.",
            None,
        ));
    }
    let name = field.name().unwrap_or_default().to_owned();
    // `image[x]` is no image to imagegate, but a provider that reads PHP-style arrays would
    // take it for one: an edit or variation could reach it with more images than counted.
    if name.starts_with("image[") && role(&name) != Role::Image {
        return Err(ApiError::invalid(
            format!("Unknown part '{name}': images are sent as 'image', 'image[]' or 'image[N]'."),
            Some("image"),
        ));
    }
    Ok(name)
}

/// A text part's own headers but its Content-Disposition (which is written anew, with the
/// name quoted safely), as header lines: the Java SDK sends `Content-Type: text/plain;
/// charset=utf-8` on every text part, and a provider may read the charset from it.
fn part_headers(field: &multer::Field<'static>) -> Bytes {
    let mut lines = Vec::new();
    for (name, value) in field.headers() {
        if name == header::CONTENT_DISPOSITION {
            continue;
        }
        lines.extend_from_slice(header_case(name.as_str()).as_bytes());
        lines.extend_from_slice(b": ");
        lines.extend_from_slice(value.as_bytes());
        lines.extend_from_slice(b"\r\n");
    }
    Bytes::from(lines)
}

/// `content-type` as `Content-Type`: how clients write part headers (their names are
/// case-insensitive, but not every provider's parser knows it).
fn header_case(name: &str) -> String {
    name.split('-')
        .map(|word| {
            let mut chars = word.chars();
            chars.next().map_or_else(String::new, |first| {
                first.to_ascii_uppercase().to_string() + chars.as_str()
            })
        })
        .collect::<Vec<_>>()
        .join("-")
}

async fn read_text(field: &mut multer::Field<'static>, name: &str) -> Result<Bytes, ApiError> {
    let mut value = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
        if value.len() + chunk.len() > MAX_TEXT_BYTES {
            return Err(ApiError::PartTooLarge(format!(
                "The field '{name}' is larger than the limit of {MAX_TEXT_BYTES} bytes."
            )));
        }
        value.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(value))
}

fn check_file_size(
    limits: &UploadLimits,
    role: Role,
    name: &str,
    len: u64,
) -> Result<(), ApiError> {
    let (limit, what) = match role {
        Role::Mask => (limits.max_mask_bytes, "mask"),
        _ => (limits.max_image_bytes, "image"),
    };
    if len > limit {
        return Err(ApiError::PartTooLarge(format!(
            "The {what} part '{name}' is larger than the limit of {limit} bytes."
        )));
    }
    Ok(())
}

fn body_too_large(limit: u64) -> ApiError {
    ApiError::PartTooLarge(format!(
        "The upload is larger than the limit of {limit} bytes."
    ))
}

fn multipart_error(err: multer::Error) -> ApiError {
    match err {
        multer::Error::StreamSizeExceeded { limit } => body_too_large(limit),
        multer::Error::FieldSizeExceeded { limit, field_name } => ApiError::PartTooLarge(format!(
            "The part '{}' is larger than the limit of {limit} bytes.",
            field_name.unwrap_or_default()
        )),
        multer::Error::StreamReadFailed(err) => match crate::body_timeout::timeout_in(&*err) {
            Some(timeout) => ApiError::RequestTimeout(timeout),
            None if headers_too_long(&*err) => ApiError::invalid(
                format!(
                    "A part's headers are longer than the limit of {} bytes.",
                    guard::MAX_PART_HEADER_BYTES
                ),
                None,
            ),
            None => ApiError::invalid(format!("The upload could not be read: {err}"), None),
        },
        other => ApiError::invalid(format!("Malformed multipart body: {other}."), None),
    }
}

fn headers_too_long(err: &(dyn std::error::Error + 'static)) -> bool {
    err.downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
        .is_some_and(|inner| inner.is::<guard::PartHeadersTooLong>())
}

/// Reads a file part's real type from its first bytes when it is labelled
/// `application/octet-stream` (or not at all), as Node streams and raw Python bytes are.
struct Sniffer {
    declared: Option<String>,
    head: Vec<u8>,
}

const SNIFF_BYTES: usize = 12;

impl Sniffer {
    fn new(declared: Option<String>) -> Self {
        Sniffer {
            declared,
            head: Vec::with_capacity(SNIFF_BYTES),
        }
    }

    fn needs_sniffing(&self) -> bool {
        self.declared
            .as_deref()
            .is_none_or(|d| d == "application/octet-stream")
    }

    fn feed(&mut self, chunk: &[u8]) {
        let room = SNIFF_BYTES.saturating_sub(self.head.len());
        self.head.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }

    fn decided(&self) -> bool {
        !self.needs_sniffing() || self.head.len() >= SNIFF_BYTES
    }

    fn content_type(&self) -> String {
        if !self.needs_sniffing() {
            return self.declared.clone().unwrap_or_default();
        }
        sniff(&self.head)
            .map(str::to_owned)
            .unwrap_or_else(|| "application/octet-stream".to_owned())
    }
}

/// PNG, JPEG and WEBP by their magic bytes.
pub fn sniff(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if head.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some("image/jpeg")
    } else if head.len() >= 12 && &head[..4] == b"RIFF" && &head[8..12] == b"WEBP" {
        Some("image/webp")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ParamPolicy, Price, Provider, ProviderKind};
    use std::sync::Arc;
    use std::time::Duration;

    const LIMITS: UploadLimits = UploadLimits {
        max_images: 3,
        max_image_bytes: 2048,
        max_mask_bytes: 512,
        max_body_bytes: 16 * 1024,
    };

    /// The route of the fuzz target (`fuzz/fuzz_targets/multipart.rs`).
    fn route() -> Route {
        let json = |text: &str| serde_json::from_str(text).expect("policy JSON");
        Route {
            provider: Arc::new(Provider {
                name: "fuzz".into(),
                kind: ProviderKind::Mock {
                    delay: Duration::ZERO,
                },
                image_field: None,
                connect_timeout: Duration::from_secs(1),
                first_byte_timeout: Duration::from_secs(1),
                total_timeout: Duration::from_secs(1),
                breaker: crate::config::BreakerConfig {
                    failures: 5,
                    cooldown: Duration::from_secs(1),
                },
            }),
            upstream_model: "upstream-model".into(),
            policy: ParamPolicy {
                defaults: json(r#"{"quality":"standard"}"#),
                force: json(r#"{"moderation":"low"}"#),
                drop: vec!["input_fidelity".into()],
            },
            strip_b64_prefix: false,
            price: Price::PerImage(1),
            price_source: None,
            endpoints: crate::config::Endpoint::ALL.to_vec(),
        }
    }

    /// A part as the provider receives it: Content-Disposition, name, value.
    type Sent = (String, String, Bytes);

    fn area(dir: &std::path::Path) -> SpoolArea {
        SpoolArea {
            dir: dir.to_owned(),
            limit: crate::limits::QuotaLimit {
                total: u64::MAX,
                per_key: u64::MAX,
            },
            usage: Default::default(),
            key_id: 1,
        }
    }

    /// The request headers of an upload with boundary `xB`.
    fn form_headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("multipart/form-data; boundary=xB"),
        );
        headers
    }

    /// Runs an upload (boundary `xB`) the way `Call::forward` does, draining the provider's
    /// body, and returns the parts the provider would receive.
    async fn upstream_parts(
        body: &'static [u8],
        endpoint: Endpoint,
    ) -> Result<Vec<Sent>, ApiError> {
        let spool = tempfile::tempdir().expect("spool dir");
        let mut upload = Upload::new(&form_headers(), Body::from(body), endpoint, LIMITS)?;
        upload.read_until_model(&area(spool.path())).await?;
        let Prepared { request, pump } = upload.prepare(&route(), CostGuard::default())?;
        let crate::upstream::UpstreamBody::Stream(mut upstream) = request.body else {
            panic!("uploads stream");
        };
        let drain = async move {
            let mut sent = Vec::new();
            while let Some(chunk) = upstream.next().await {
                sent.extend_from_slice(&chunk.ok()?);
            }
            Some(sent)
        };
        let (pumped, sent) = tokio::join!(pump.expect("a pump"), drain);
        pumped?;
        let sent = sent.expect("a complete body after a successful pump");
        let content_type = request.content_type.to_str().expect("ASCII").to_owned();
        let boundary = multer::parse_boundary(&content_type).expect("boundary");
        let stream =
            futures_util::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(sent)) });
        let mut form = multer::Multipart::new(stream, boundary);
        let mut parts = Vec::new();
        while let Some(field) = form.next_field().await.expect("a valid form") {
            let disposition = field.headers()[header::CONTENT_DISPOSITION].as_bytes();
            let disposition = String::from_utf8(disposition.to_vec()).expect("UTF-8");
            let name = field.name().expect("a name").to_owned();
            parts.push((disposition, name, field.bytes().await.expect("data")));
        }
        assert_eq!(std::fs::read_dir(spool.path()).expect("dir").count(), 0);
        Ok(parts)
    }

    fn values<'a>(parts: &'a [Sent], name: &str) -> Vec<&'a [u8]> {
        parts
            .iter()
            .filter(|(_, n, _)| n == name)
            .map(|(_, _, v)| v.as_ref())
            .collect()
    }

    /// What the provider must see of an upload.
    enum Expect {
        /// Accepted, with the route's model as the only `model` part.
        RoutesModel,
        /// Accepted, the first part going up with this Content-Disposition.
        FirstDisposition(&'static str),
        /// Refused with a 400.
        Refused,
    }

    /// An upload the multipart fuzz target found mishandled (minimized), named after what
    /// it must do, with what went wrong before.
    struct FuzzFound {
        name: &'static str,
        endpoint: Endpoint,
        body: &'static [u8],
        expect: Expect,
    }

    const FUZZ_FOUND: &[FuzzFound] = &[
        // The second `model` went upstream as a second model part (now: a repeated
        // field is refused).
        FuzzFound {
            name: "a_second_model_part_is_refused",
            endpoint: Endpoint::Edits,
            body: b"--xB\r\nContent-Disposition: fa; name=\"image[]\"onam\r\n\r\n\x89P\r\n--xB\r\nContent-Disposition: name=\"prompt\"\r\n\r\ncombin\r\n--xB\r\nContent-Disposition:a; name=\"model\"\r\n\r\n\r\n--xB\r\nContent-Disposition: a; name=\"model\"\r\n\r\nhigh\r\n--xB--\r\n",
            expect: Expect::Refused,
        },
        // A `model` part with a filename went upstream as a file, with the client's model,
        // past the route's rewrite.
        FuzzFound {
            name: "a_model_sent_as_a_file_is_still_the_routes_model",
            endpoint: Endpoint::Edits,
            body: b"--xB\r\nContent-Disposition:o-data; name=\"image[]\"; \r\n\r\n`\x82\r\n--xB\r\nContent-Disposition: ;name=\"prompt\"\r\n\ntram\r\n\r\ncbine\r\n--xB\r\nContent-Disposition: fm-t; filename=\"a; name=\"model\"\r\n\r\nigh\r\n--xB--\r\n",
            expect: Expect::RoutesModel,
        },
        // `name="i\m]ge[]"` went upstream as is, and a name ending in a backslash would run
        // into the next parameter.
        FuzzFound {
            name: "a_backslash_in_a_name_cannot_escape_its_closing_quote",
            endpoint: Endpoint::Variations,
            body: b"--xB\r\nContent-Disposition:ta;name=\"i\\m]ge[]\";n\r\n\r\n\n\r\n--xB\r\nContent-Disposition:; name=\"image[]\";n\r\n\r\n\n\x00\r\r\n--xB--\r\n",
            expect: Expect::FirstDisposition(r#"form-data; name="i%5Cm]ge[]""#),
        },
        // A variation with one image and a text part named `image[tion` went upstream,
        // which a PHP-style provider reads as two images.
        FuzzFound {
            name: "names_that_only_look_like_images_are_refused",
            endpoint: Endpoint::Variations,
            body: b"--xB\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n\x89PNG\r\n--xB\r\nContent-Disposition: form-data; name=\"image[tion\"\r\n\r\ntransparent\r\n--xB--\r\n",
            expect: Expect::Refused,
        },
    ];

    #[tokio::test]
    async fn fuzz_found_uploads_go_up_as_they_must() {
        for case in FUZZ_FOUND {
            let name = case.name;
            match (&case.expect, upstream_parts(case.body, case.endpoint).await) {
                (Expect::RoutesModel, Ok(parts)) => {
                    assert_eq!(values(&parts, "model"), [b"upstream-model"], "{name}");
                }
                (Expect::FirstDisposition(want), Ok(parts)) => {
                    assert_eq!(parts[0].0, *want, "{name}");
                }
                (Expect::Refused, Err(err)) => {
                    assert_eq!(err.status(), http::StatusCode::BAD_REQUEST, "{name}");
                }
                (Expect::Refused, Ok(parts)) => panic!("{name}: accepted, sent {parts:?}"),
                (_, Err(err)) => panic!("{name}: refused: {err:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_model_sent_as_a_named_file_is_routed_on_then_rewritten() {
        // A plain filename on the `model` part, after the image, and before it (spooled).
        for body in [
            &b"--xB\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n\x89PNG\r\n--xB\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\np\r\n--xB\r\nContent-Disposition: form-data; name=\"model\"; filename=\"m.txt\"\r\n\r\ndall-e-3\r\n--xB\r\nContent-Disposition: form-data; name=\"n\"; filename=\"n.txt\"\r\n\r\n99\r\n--xB--\r\n"[..],
            b"--xB\r\nContent-Disposition: form-data; name=\"model\"; filename=\"m.txt\"\r\n\r\ndall-e-3\r\n--xB\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\np\r\n--xB\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n\x89PNG\r\n--xB--\r\n",
        ] {
            let mut upload = Upload::new(&form_headers(), Body::from(body), Endpoint::Edits, LIMITS)
                .expect("headers");
            let spool = tempfile::tempdir().expect("spool dir");
            let model = upload.read_until_model(&area(spool.path())).await;
            assert_eq!(model.expect("read").as_deref(), Some("dall-e-3"), "routed on it");
            match upstream_parts(body, Endpoint::Edits).await {
                Ok(parts) => assert_eq!(values(&parts, "model"), [b"upstream-model"]),
                // `n` is checked like the text field it is.
                Err(err) => assert_eq!(err.status(), http::StatusCode::BAD_REQUEST),
            }
        }
    }

    #[test]
    fn roles_follow_the_sdks_spellings() {
        assert_eq!(role("image"), Role::Image);
        assert_eq!(role("image[]"), Role::Image);
        assert_eq!(role("image[3]"), Role::Image);
        assert_eq!(role("image[x]"), Role::Text);
        assert_eq!(role("mask"), Role::Mask);
        assert_eq!(role("svg[model]"), Role::Text);
        assert_eq!(role("model"), Role::Text);
    }

    #[test]
    fn sniffs_png_jpeg_webp() {
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n\0\0\0\r"), Some("image/png"));
        assert_eq!(sniff(&[0xFF, 0xD8, 0xFF, 0xE0]), Some("image/jpeg"));
        assert_eq!(sniff(b"RIFF\x10\0\0\0WEBPVP8 "), Some("image/webp"));
        assert_eq!(sniff(b"GIF89a"), None);
        let mut s = Sniffer::new(Some("application/octet-stream".into()));
        s.feed(b"\x89PN");
        assert!(!s.decided());
        s.feed(b"G\r\n\x1a\n\0\0\0\rIHDR");
        assert!(s.decided());
        assert_eq!(s.content_type(), "image/png");
        let s = Sniffer::new(Some("image/jpeg".into()));
        assert!(s.decided());
        assert_eq!(s.content_type(), "image/jpeg");
    }
}
