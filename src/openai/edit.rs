//! `POST /v1/images/edits` sent as JSON: the images are references (`image_url`, a web or
//! data: URL, or `file_id`) instead of uploads. The checks a request must pass before it is
//! forwarded; the references themselves pass through untouched, for the provider to fetch.

use serde_json::{Map, Value};

use super::generation::{GenerationRequest, Invalid, check_common, parse_object, wrong_type};

/// Parses and checks a JSON edit: what a generation needs, plus 1 to `max_images` image
/// references in `images` (or `image`, one reference or a list) and an optional `mask`
/// reference. The body is returned as sent: routing reads it like a generation's.
pub fn parse_json_edit(bytes: &[u8], max_images: usize) -> Result<GenerationRequest, Invalid> {
    let body = parse_object(bytes)?;
    check_images(&body, max_images)?;
    if let Some(mask) = body.get("mask").filter(|v| !v.is_null()) {
        check_reference(mask, "mask")?;
    }
    check_common(&body)?;
    Ok(GenerationRequest { body })
}

fn check_images(body: &Map<String, Value>, max_images: usize) -> Result<(), Invalid> {
    let present = |name: &str| body.get(name).filter(|v| !v.is_null());
    let (name, value) = match (present("images"), present("image")) {
        (Some(_), Some(_)) => {
            return Err(Invalid::new(
                "Invalid 'image': give the references in 'images' or in 'image', not both.",
                Some("image"),
            ));
        }
        (Some(images), None) => ("images", images),
        (None, Some(image)) => ("image", image),
        (None, None) => {
            return Err(Invalid::new(
                "Missing required parameter: 'images' (a list of {\"image_url\"} or {\"file_id\"} references).",
                Some("images"),
            ));
        }
    };
    let entries = match value {
        Value::Array(entries) => entries.as_slice(),
        // `image` may hold one reference.
        Value::Object(_) if name == "image" => std::slice::from_ref(value),
        _ => return Err(wrong_type(name, "a list of image references")),
    };
    if entries.is_empty() {
        return Err(Invalid::new(
            format!("Invalid '{name}': it must hold at least one image reference."),
            Some(name),
        ));
    }
    if entries.len() > max_images {
        return Err(Invalid::new(
            format!(
                "Invalid '{name}': {} images given; at most {max_images} are accepted.",
                entries.len()
            ),
            Some(name),
        ));
    }
    for (i, entry) in entries.iter().enumerate() {
        let param = if matches!(value, Value::Array(_)) {
            format!("{name}[{i}]")
        } else {
            name.to_owned()
        };
        check_reference(entry, &param)?;
    }
    Ok(())
}

/// One image reference: an object with exactly one of `image_url` (an http(s) or data: URL)
/// and `file_id` (a non-empty string). `param` names it in errors (`images[2]`, `mask`).
fn check_reference(entry: &Value, param: &str) -> Result<(), Invalid> {
    let Value::Object(entry) = entry else {
        return Err(wrong_type(
            param,
            "an object with an 'image_url' or a 'file_id'",
        ));
    };
    let present = |name: &str| entry.get(name).filter(|v| !v.is_null());
    match (present("image_url"), present("file_id")) {
        (Some(_), Some(_)) => Err(Invalid::new(
            format!("Invalid '{param}': give either 'image_url' or 'file_id', not both."),
            Some(param),
        )),
        (None, None) => Err(Invalid::new(
            format!("Invalid '{param}': it needs an 'image_url' or a 'file_id'."),
            Some(param),
        )),
        (Some(url), None) => {
            let field = format!("{param}.image_url");
            match url.as_str() {
                Some(url) if is_image_url(url) => Ok(()),
                Some(_) => Err(Invalid::new(
                    format!("Invalid '{field}': it must be an http(s) URL or a data: URL."),
                    Some(&field),
                )),
                None => Err(wrong_type(&field, "a string")),
            }
        }
        (None, Some(id)) => {
            let field = format!("{param}.file_id");
            match id.as_str() {
                Some(id) if !id.trim().is_empty() => Ok(()),
                Some(_) => Err(Invalid::new(
                    format!("Invalid '{field}': it must not be empty."),
                    Some(&field),
                )),
                None => Err(wrong_type(&field, "a string")),
            }
        }
    }
}

/// An `http://` or `https://` URL with a host, or a `data:` URL (`data:[type][;base64],...`).
/// Read as sent: no blanks around it, none inside.
fn is_image_url(url: &str) -> bool {
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return false;
    }
    let lower = |n: usize| url.get(..n).map(str::to_ascii_lowercase);
    if lower(5).as_deref() == Some("data:") {
        return url.contains(',');
    }
    let rest = if lower(8).as_deref() == Some("https://") {
        &url[8..]
    } else if lower(7).as_deref() == Some("http://") {
        &url[7..]
    } else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit('@').next().unwrap_or_default();
    !host.is_empty() && !host.starts_with(':')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param_of(body: &str) -> Option<String> {
        match parse_json_edit(body.as_bytes(), 16) {
            Err(Invalid { param, .. }) => param,
            Ok(_) => panic!("expected a 400 for {body}"),
        }
    }

    #[test]
    fn references_pass_through_as_sent() {
        let body = r#"{"model":"gpt-image-1","images":[{"image_url":"https://example.com/a.png?x=1"},{"file_id":"file-abc"},{"image_url":"data:image/png;base64,iVBO"}],"mask":{"file_id":"file-mask"},"prompt":"fox","quality":"xhigh","complexity":"high"}"#;
        let req = parse_json_edit(body.as_bytes(), 16).expect("valid");
        assert_eq!(req.model(), Some("gpt-image-1"));
        assert_eq!(Value::Object(req.body).to_string(), body);
        // `image` in place of `images`: one reference, or a list.
        for body in [
            r#"{"image":{"image_url":"http://h/a.png"},"prompt":"p"}"#,
            r#"{"image":[{"file_id":"f"}],"prompt":"p"}"#,
        ] {
            parse_json_edit(body.as_bytes(), 16).expect(body);
        }
    }

    #[test]
    fn names_the_offending_field() {
        let seventeen = vec![r#"{"file_id":"f"}"#; 17].join(",");
        let seventeen = format!(r#"{{"prompt":"p","images":[{seventeen}]}}"#);
        let cases: &[(&str, &str)] = &[
            (r#"{"prompt":"p"}"#, "images"),
            (r#"{"prompt":"p","images":null,"image":null}"#, "images"),
            (r#"{"prompt":"p","images":[]}"#, "images"),
            (r#"{"prompt":"p","images":{"file_id":"f"}}"#, "images"),
            (&seventeen, "images"),
            (
                r#"{"prompt":"p","images":[{"file_id":"f"},{"file_id":"g"},{"image_url":"ftp://h/a.png"}]}"#,
                "images[2].image_url",
            ),
            (
                r#"{"prompt":"p","images":[{"image_url":7}]}"#,
                "images[0].image_url",
            ),
            (r#"{"prompt":"p","images":[{}]}"#, "images[0]"),
            (
                r#"{"prompt":"p","images":[{"file_id":"f","image_url":"https://h/a"}]}"#,
                "images[0]",
            ),
            (
                r#"{"prompt":"p","images":["https://h/a.png"]}"#,
                "images[0]",
            ),
            (
                r#"{"prompt":"p","images":[{"file_id":""}]}"#,
                "images[0].file_id",
            ),
            (
                r#"{"prompt":"p","images":[{"file_id":"f"}],"mask":{"image_url":"x"}}"#,
                "mask.image_url",
            ),
            (r#"{"prompt":"p","image":{}}"#, "image"),
            (
                r#"{"prompt":"p","images":[{"file_id":"f"}],"image":[{"file_id":"g"}]}"#,
                "image",
            ),
            (r#"{"images":[{"file_id":"f"}]}"#, "prompt"),
            (r#"{"prompt":"p","images":[{"file_id":"f"}],"n":11}"#, "n"),
        ];
        for (body, param) in cases {
            assert_eq!(param_of(body).as_deref(), Some(*param), "{body}");
        }
        for url in [
            "not a url",
            "https://",
            "http:///a.png",
            " https://h/a.png",
            "https://h/a b.png",
            "file:///etc/passwd",
            "data:image/png;base64",
        ] {
            let body = serde_json::json!({"prompt": "p", "images": [{"image_url": url}]});
            assert_eq!(
                param_of(&body.to_string()).as_deref(),
                Some("images[0].image_url"),
                "{url}"
            );
        }
    }

    #[test]
    fn image_urls() {
        for ok in [
            "https://example.com/a.png",
            "HTTPS://EXAMPLE.COM",
            "http://127.0.0.1:8080/a?b#c",
            "https://user@host/a",
            "data:image/png;base64,AAAA",
            "data:,hello",
        ] {
            assert!(is_image_url(ok), "{ok}");
        }
        for bad in [
            "",
            "https:/h",
            "https://:80/a",
            "javascript:alert(1)",
            "h://x",
        ] {
            assert!(!is_image_url(bad), "{bad}");
        }
    }
}
