//! The SDK requests captured on the wire (tests/fixtures/captures), read back as sent.

use std::path::{Path, PathBuf};

use http::Method;

/// A captured SDK request: method, path, headers and body (de-chunked).
pub struct Capture {
    pub chunked: bool,
    pub method: Method,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

pub fn captures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/captures")
}

pub fn capture(name: &str) -> Capture {
    let raw = std::fs::read(captures_dir().join(format!("{name}.http"))).expect("capture file");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| raw.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)))
        .expect("capture has a blank line after its headers");
    let head = String::from_utf8_lossy(&raw[..split.0]).into_owned();
    let mut body = raw[split.0 + split.1..].to_vec();
    let mut lines = head.lines();
    let request_line = lines.next().expect("request line");
    let mut parts = request_line.split_whitespace();
    let method = Method::from_bytes(parts.next().expect("method").as_bytes()).expect("method");
    let path = parts.next().expect("path").to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Capture {
        chunked,
        method,
        path,
        headers,
        body,
    }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size_text = String::from_utf8_lossy(&raw[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("0").trim(), 16)
            .expect("chunk size");
        raw = &raw[eol + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

/// Names of the captures whose file name contains `part`.
pub fn captures_named(part: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(captures_dir())
        .expect("captures dir")
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter_map(|n| n.strip_suffix(".http").map(str::to_owned))
        .filter(|n| n.contains(part))
        .collect();
    names.sort();
    names
}
