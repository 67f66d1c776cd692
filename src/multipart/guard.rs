//! Bounds what multer holds in memory for a part's headers. multer reads a part's header
//! block by buffering until it finds the blank line that ends it, with no limit but the
//! whole upload's: an upload whose part header never ends would sit in memory whole (and
//! be searched again with each chunk). This watches the bytes on their way into multer,
//! following the same steps multer takes, and fails the body once a header block grows
//! past [`MAX_PART_HEADER_BYTES`].

/// Far above what any SDK sends (about 150 bytes a part), far below what could hurt.
pub const MAX_PART_HEADER_BYTES: usize = 16 * 1024;

/// A part's header block ran past [`MAX_PART_HEADER_BYTES`].
#[derive(Debug, thiserror::Error)]
#[error("a part's headers are longer than {MAX_PART_HEADER_BYTES} bytes")]
pub struct PartHeadersTooLong;

/// Where in the multipart grammar the next byte falls, as multer reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// In a part's data (or at the start): `matched` bytes of `\r\n--BOUNDARY` seen.
    Delimiter { matched: usize },
    /// Just after a delimiter: `--` closes the form; anything else opens a part.
    AfterDelimiter { dash: bool },
    /// Spaces and tabs after a delimiter (multer discards them as they come).
    Padding,
    /// The `\r` of the line end after a delimiter was seen.
    LineEnd,
    /// In a header block: `matched` bytes of `\r\n\r\n` seen, `len` bytes so far.
    Headers { matched: usize, len: usize },
    /// The form is closed, or malformed in a way multer rejects by itself.
    Done,
}

pub struct HeaderGuard {
    delimiter: Vec<u8>,
    stage: Stage,
}

impl HeaderGuard {
    pub fn new(boundary: &str) -> Self {
        let mut delimiter = b"\r\n--".to_vec();
        delimiter.extend_from_slice(boundary.as_bytes());
        HeaderGuard {
            delimiter,
            // The body opens with `--BOUNDARY`, without the line break before it.
            stage: Stage::Delimiter { matched: 2 },
        }
    }

    /// Follows one chunk; fails when a header block grows too long.
    pub fn check(&mut self, chunk: &[u8]) -> Result<(), PartHeadersTooLong> {
        let mut i = 0;
        while i < chunk.len() {
            if self.stage == (Stage::Delimiter { matched: 0 }) {
                // Part data: only a line break can start a delimiter; skip to the next one.
                match memchr::memchr(b'\r', &chunk[i..]) {
                    Some(k) => i += k,
                    None => return Ok(()),
                }
            }
            let b = chunk[i];
            self.stage = match self.stage {
                Stage::Done => return Ok(()),
                Stage::Delimiter { matched } if b == self.delimiter[matched] => {
                    if matched + 1 == self.delimiter.len() {
                        Stage::AfterDelimiter { dash: false }
                    } else {
                        Stage::Delimiter {
                            matched: matched + 1,
                        }
                    }
                }
                // The delimiter has no `\r` after its first byte, so a mismatch restarts
                // the match at this very byte.
                Stage::Delimiter { .. } => Stage::Delimiter {
                    matched: usize::from(b == b'\r'),
                },
                Stage::AfterDelimiter { dash: false } => match b {
                    b'-' => Stage::AfterDelimiter { dash: true },
                    b' ' | b'\t' => Stage::Padding,
                    b'\r' => Stage::LineEnd,
                    _ => Stage::Done,
                },
                // `--BOUNDARY--` closes the form (multer reads no further), and
                // `--BOUNDARY-x` is an error multer reports itself.
                Stage::AfterDelimiter { dash: true } => Stage::Done,
                Stage::Padding => match b {
                    b' ' | b'\t' => Stage::Padding,
                    b'\r' => Stage::LineEnd,
                    _ => Stage::Done,
                },
                Stage::LineEnd if b == b'\n' => Stage::Headers { matched: 0, len: 0 },
                Stage::LineEnd => Stage::Done,
                Stage::Headers { matched, len } => {
                    if len == MAX_PART_HEADER_BYTES {
                        return Err(PartHeadersTooLong);
                    }
                    let matched = if b == b"\r\n\r\n"[matched] {
                        matched + 1
                    } else {
                        usize::from(b == b'\r')
                    };
                    if matched == 4 {
                        Stage::Delimiter { matched: 0 }
                    } else {
                        Stage::Headers {
                            matched,
                            len: len + 1,
                        }
                    }
                }
            };
            i += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(guard: &mut HeaderGuard, body: &[u8], split: usize) -> Result<(), PartHeadersTooLong> {
        for chunk in body.chunks(split.max(1)) {
            guard.check(chunk)?;
        }
        Ok(())
    }

    #[test]
    fn a_normal_form_passes_in_chunks_of_any_size() {
        let body = b"--xB\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nvalue\r\n--xB  \r\nContent-Disposition: form-data; name=\"b\"\r\n\r\n\r\n--xB--\r\nepilogue";
        for split in 1..body.len() {
            let mut guard = HeaderGuard::new("xB");
            feed(&mut guard, body, split).expect("passes");
            assert_eq!(guard.stage, Stage::Done, "split {split}");
        }
    }

    #[test]
    fn a_header_block_that_never_ends_is_cut_off() {
        let mut body = b"--xB\r\nContent-Disposition: form-data; name=\"a\"\r\nX-Pad: ".to_vec();
        body.extend(std::iter::repeat_n(b'a', MAX_PART_HEADER_BYTES));
        for split in [1, 7, 4096, body.len()] {
            let mut guard = HeaderGuard::new("xB");
            assert!(feed(&mut guard, &body, split).is_err(), "split {split}");
        }
        // The second part's headers count on their own, after a first part's data.
        let mut body = b"--xB\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n".to_vec();
        body.extend(std::iter::repeat_n(b'd', 3 * MAX_PART_HEADER_BYTES));
        body.extend_from_slice(b"\r\n--xB\r\n");
        let mut guard = HeaderGuard::new("xB");
        feed(&mut guard, &body, 1000).expect("part data is not limited here");
        body.extend(std::iter::repeat_n(b'h', MAX_PART_HEADER_BYTES + 1));
        let mut guard = HeaderGuard::new("xB");
        assert!(feed(&mut guard, &body, 1000).is_err());
    }

    #[test]
    fn data_that_resembles_a_delimiter_stays_data() {
        // `\r\r\n--xB`: the delimiter is still found after a false start.
        let body = b"--xB\r\nH: v\r\n\r\nab\r\r\n--xB--";
        let mut guard = HeaderGuard::new("xB");
        feed(&mut guard, body, 1).expect("passes");
        assert_eq!(guard.stage, Stage::Done);
    }
}
