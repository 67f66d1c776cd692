//! Writes the provider's multipart body: the client's parts in their order, with `model`
//! rewritten, the route's parameter policy applied and image parts named as the provider
//! wants them.

use std::collections::HashSet;

use bytes::Bytes;
use serde_json::Value;

use crate::config::{ParamPolicy, Route};
use crate::upstream::Endpoint;

pub struct Encoder {
    boundary: String,
    upstream_model: String,
    policy: ParamPolicy,
    image_field: Option<String>,
    /// Text fields already written, so that defaults are added only where absent.
    seen: HashSet<String>,
}

impl Encoder {
    pub fn new(route: &Route, endpoint: Endpoint) -> Self {
        let image_field = match endpoint {
            // A variation's single image keeps its name.
            Endpoint::Variations => None,
            _ => route.provider.image_field.clone(),
        };
        Encoder {
            boundary: format!("imagegate-{}", uuid::Uuid::now_v7().simple()),
            upstream_model: route.upstream_model.clone(),
            policy: route.policy.clone(),
            image_field,
            seen: HashSet::new(),
        }
    }

    pub fn content_type(&self) -> String {
        format!("multipart/form-data; boundary={}", self.boundary)
    }

    /// Whether a part with this name goes upstream at all.
    pub fn keeps(&self, name: &str) -> bool {
        !self.policy.drop.iter().any(|d| d == name)
    }

    /// A whole text part with the client's own part `headers` (header lines, each ending in
    /// CRLF; Content-Disposition is written here), or nothing when the policy drops it.
    /// Only the value of `model` (and of a field the policy forces) changes.
    /// Each name comes once: the upload refuses a repeated field before it gets here.
    pub fn text(&mut self, name: &str, headers: &[u8], value: &[u8]) -> Option<Bytes> {
        self.seen.insert(name.to_owned());
        if !self.keeps(name) {
            return None;
        }
        if name == "model" {
            let model = self.upstream_model.clone();
            return Some(self.text_part(name, headers, model.as_bytes()));
        }
        if let Some(forced) = self.policy.force.get(name) {
            let forced = form_value(forced);
            return Some(self.text_part(name, headers, forced.as_bytes()));
        }
        Some(self.text_part(name, headers, value))
    }

    fn text_part(&self, name: &str, headers: &[u8], value: &[u8]) -> Bytes {
        let mut part = format!(
            "--{}\r\nContent-Disposition: form-data; name=\"{}\"\r\n",
            self.boundary,
            quote(name)
        )
        .into_bytes();
        part.extend_from_slice(headers);
        part.extend_from_slice(b"\r\n");
        part.extend_from_slice(value);
        part.extend_from_slice(b"\r\n");
        Bytes::from(part)
    }

    /// The boundary and headers of a file part; its bytes follow, then [`Encoder::part_end`].
    pub fn file_header(
        &self,
        name: &str,
        is_image: bool,
        filename: Option<&str>,
        content_type: &str,
    ) -> Bytes {
        let name = match (&self.image_field, is_image) {
            (Some(field), true) => field.as_str(),
            _ => name,
        };
        let filename = match filename {
            Some(f) => format!("; filename=\"{}\"", quote(f)),
            None => String::new(),
        };
        Bytes::from(format!(
            "--{}\r\nContent-Disposition: form-data; name=\"{}\"{filename}\r\nContent-Type: {}\r\n\r\n",
            self.boundary,
            quote(name),
            quote(content_type)
        ))
    }

    pub fn part_end() -> Bytes {
        Bytes::from_static(b"\r\n")
    }

    /// Fields the policy adds (and `model` when the client sent none), then the closing
    /// boundary.
    pub fn finish(&mut self) -> Bytes {
        let mut tail = Vec::new();
        if !self.seen.contains("model") {
            tail.extend_from_slice(&self.text_part("model", b"", self.upstream_model.as_bytes()));
        }
        let added: Vec<(String, String)> = self
            .policy
            .force
            .iter()
            .chain(self.policy.defaults.iter())
            .filter(|(name, _)| !self.seen.contains(*name))
            .map(|(name, value)| (name.clone(), form_value(value)))
            .collect();
        for (name, value) in added {
            if self.seen.insert(name.clone()) {
                tail.extend_from_slice(&self.text_part(&name, b"", value.as_bytes()));
            }
        }
        tail.extend_from_slice(format!("--{}--\r\n", self.boundary).as_bytes());
        Bytes::from(tail)
    }
}

/// A policy value as a form field: strings as they are, anything else as JSON text.
fn form_value(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Header parameter values cannot carry quotes or line breaks (header injection), nor
/// backslashes, which strict parsers read as escaping the closing quote.
fn quote(value: &str) -> String {
    value
        .chars()
        .filter(|c| *c != '\r' && *c != '\n')
        .map(|c| match c {
            '"' => "%22".to_owned(),
            '\\' => "%5C".to_owned(),
            c => c.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_cannot_break_out_of_a_header() {
        assert_eq!(quote("a\"b\r\nX-Evil: 1"), "a%22bX-Evil: 1");
        // Unescaped, `name="a\"; filename="; name=model"` reads as name=model upstream.
        assert_eq!(quote("a\\"), "a%5C");
    }

    #[test]
    fn form_values_are_plain_text() {
        assert_eq!(form_value(&Value::from("standard")), "standard");
        assert_eq!(form_value(&Value::from(1)), "1");
        assert_eq!(form_value(&Value::from(true)), "true");
    }
}
