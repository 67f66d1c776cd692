//! One multipart form builder for every upload test: parts from names and values, or from raw
//! header bytes when a test needs names and values that are anything.

/// The boundary of every form built here.
pub const BOUNDARY: &str = "test-boundary-7MA4YWxk";

/// An image part's bytes: a PNG signature and then not an image (nothing here decodes it).
pub const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR-not-really-an-image";

/// The `content-type` of a form built here.
pub fn content_type() -> String {
    format!("multipart/form-data; boundary={BOUNDARY}")
}

/// A multipart body built part by part.
#[derive(Default)]
pub struct Form {
    parts: Vec<u8>,
}

impl Form {
    pub fn new() -> Form {
        Form::default()
    }

    /// A part with this `Content-Disposition` and these extra header lines (each ending in CRLF).
    pub fn part(mut self, disposition: &[u8], extra_headers: &[u8], value: &[u8]) -> Form {
        self.parts
            .extend_from_slice(format!("--{BOUNDARY}\r\nContent-Disposition: ").as_bytes());
        self.parts.extend_from_slice(disposition);
        self.parts.extend_from_slice(b"\r\n");
        self.parts.extend_from_slice(extra_headers);
        self.parts.extend_from_slice(b"\r\n");
        self.parts.extend_from_slice(value);
        self.parts.extend_from_slice(b"\r\n");
        self
    }

    pub fn text(self, name: &str, value: impl AsRef<[u8]>) -> Form {
        self.part(
            format!("form-data; name=\"{name}\"").as_bytes(),
            b"",
            value.as_ref(),
        )
    }

    /// A file part named `filename` of type `content_type`.
    pub fn file_named(self, name: &str, filename: &str, content_type: &str, data: &[u8]) -> Form {
        self.part(
            format!("form-data; name=\"{name}\"; filename=\"{filename}\"").as_bytes(),
            format!("Content-Type: {content_type}\r\n").as_bytes(),
            data,
        )
    }

    /// A PNG file part.
    pub fn file(self, name: &str, data: &[u8]) -> Form {
        self.file_named(name, "f.png", "image/png", data)
    }

    /// The `image` part of an edit, with [`PNG`] in it.
    pub fn image(self) -> Form {
        self.file_named("image", "a.png", "image/png", PNG)
    }

    /// An `image` part of 100,000 bytes: an upload long enough to stall or trickle halfway.
    pub fn large_image(self) -> Form {
        self.file_named("image", "a.png", "image/png", &[7u8; 100_000])
    }

    /// An edit of `model`: a prompt and a ten-byte PNG image.
    pub fn edit(model: &str, prompt: &str) -> Form {
        Form::new()
            .text("model", model)
            .text("prompt", prompt)
            .file_named(
                "image",
                "a.png",
                "image/png",
                b"\x89PNG\r\n\x1a\n0123456789",
            )
    }

    pub fn content_type(&self) -> String {
        content_type()
    }

    /// The whole body: the parts and the closing delimiter.
    pub fn body(&self) -> Vec<u8> {
        let mut body = self.parts.clone();
        body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
        body
    }
}
