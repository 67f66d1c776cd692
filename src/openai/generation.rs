//! `POST /v1/images/generations`: the checks a request must pass before it is forwarded.

use serde_json::{Map, Value};

/// Why a request was refused before it was forwarded: a 400 in OpenAI's shape, naming the
/// offending parameter when there is one (the error module turns it into its response).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub message: String,
    pub param: Option<String>,
}

impl Invalid {
    pub(super) fn new(message: impl Into<String>, param: Option<&str>) -> Self {
        Invalid {
            message: message.into(),
            param: param.map(str::to_owned),
        }
    }
}

/// A generation request as received: the whole JSON object, kept in its key order so that
/// fields imagegate does not know are passed on untouched.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub body: Map<String, Value>,
}

/// Fields imagegate reads itself, each a string or null when present: `model` routes the
/// request, `size` and `quality` go into its usage row. Their values are not checked:
/// a provider may take sizes, qualities or models imagegate has never heard of. Every other
/// field (`output_format`, `background`, `moderation`, `style`, `complexity`, ...) passes
/// through as the client sent it, for the provider to judge.
const STRING_FIELDS: &[&str] = &["model", "size", "quality"];

impl GenerationRequest {
    /// Parses and checks a body. Python's SDK sends `null` for fields the caller left as
    /// `None`, so null counts as absent everywhere.
    pub fn parse(bytes: &[u8]) -> Result<Self, Invalid> {
        let body = parse_object(bytes)?;
        check_common(&body)?;
        Ok(GenerationRequest { body })
    }

    /// A field's value, with null read as absent.
    pub fn field(&self, name: &str) -> Option<&Value> {
        self.body.get(name).filter(|v| !v.is_null())
    }

    pub fn str_field(&self, name: &str) -> Option<&str> {
        self.field(name).and_then(Value::as_str)
    }

    pub fn model(&self) -> Option<&str> {
        self.str_field("model")
    }

    pub fn stream(&self) -> bool {
        self.field("stream")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    pub fn n(&self) -> Option<i64> {
        self.field("n").and_then(Value::as_i64)
    }
}

/// A request body that must be a JSON object, each of its fields once: a provider reads
/// one of a repeated field's values, which need not be the one imagegate routed, checked
/// and priced (serde_json keeps the last).
pub(super) fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, Invalid> {
    let top: TopLevel = serde_json::from_slice(bytes).map_err(|err| {
        Invalid::new(
            format!(
                "We could not parse the JSON body of your request ({err}). \
                 The body must be a JSON object."
            ),
            None,
        )
    })?;
    match top {
        TopLevel::Object {
            duplicate: Some(name),
            ..
        } => Err(Invalid::new(
            format!("The field '{name}' was sent more than once; send each field once."),
            Some(&name),
        )),
        TopLevel::Object { body, .. } => Ok(body),
        TopLevel::Other => Err(Invalid::new(
            "The body of your request must be a JSON object.",
            None,
        )),
    }
}

/// A JSON document's top level, read in one pass: an object with the first field it
/// repeats, or anything else.
enum TopLevel {
    Object {
        body: Map<String, Value>,
        duplicate: Option<String>,
    },
    Other,
}

impl<'de> serde::Deserialize<'de> for TopLevel {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(TopLevelVisitor)
    }
}

struct TopLevelVisitor;

impl<'de> serde::de::Visitor<'de> for TopLevelVisitor {
    type Value = TopLevel;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<TopLevel, A::Error> {
        let mut body = Map::new();
        let mut duplicate = None;
        while let Some(key) = map.next_key::<String>()? {
            let value: Value = map.next_value()?;
            if body.contains_key(&key) {
                duplicate.get_or_insert(key);
            } else {
                body.insert(key, value);
            }
        }
        Ok(TopLevel::Object { body, duplicate })
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<TopLevel, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(TopLevel::Other)
    }

    fn visit_bool<E>(self, _: bool) -> Result<TopLevel, E> {
        Ok(TopLevel::Other)
    }

    fn visit_i64<E>(self, _: i64) -> Result<TopLevel, E> {
        Ok(TopLevel::Other)
    }

    fn visit_u64<E>(self, _: u64) -> Result<TopLevel, E> {
        Ok(TopLevel::Other)
    }

    fn visit_f64<E>(self, _: f64) -> Result<TopLevel, E> {
        Ok(TopLevel::Other)
    }

    fn visit_str<E>(self, _: &str) -> Result<TopLevel, E> {
        Ok(TopLevel::Other)
    }

    fn visit_unit<E>(self) -> Result<TopLevel, E> {
        Ok(TopLevel::Other)
    }
}

/// The checks generations and JSON edits share: a prompt, and the fields imagegate itself
/// reads in the types it reads them as (`n` bounds the most a call can cost).
pub(super) fn check_common(body: &Map<String, Value>) -> Result<(), Invalid> {
    let field = |name: &str| body.get(name).filter(|v| !v.is_null());
    match field("prompt") {
        None => {
            return Err(Invalid::new(
                "Missing required parameter: 'prompt'.",
                Some("prompt"),
            ));
        }
        Some(Value::String(prompt)) if prompt.trim().is_empty() => {
            return Err(Invalid::new(
                "Invalid 'prompt': it must not be empty.",
                Some("prompt"),
            ));
        }
        Some(Value::String(_)) => {}
        Some(_) => return Err(wrong_type("prompt", "a string")),
    }
    for name in STRING_FIELDS {
        if !matches!(field(name), None | Some(Value::String(_))) {
            return Err(wrong_type(name, "a string"));
        }
    }
    if !matches!(field("stream"), None | Some(Value::Bool(_))) {
        return Err(wrong_type("stream", "a boolean"));
    }
    check_int_range(field("n"), "n", 1, 10)?;
    check_int_range(field("partial_images"), "partial_images", 0, i64::MAX)?;
    Ok(())
}

pub(super) fn wrong_type(field: &str, expected: &str) -> Invalid {
    Invalid::new(
        format!("Invalid type for '{field}': expected {expected}."),
        Some(field),
    )
}

fn check_int_range(value: Option<&Value>, field: &str, min: i64, max: i64) -> Result<(), Invalid> {
    let Some(value) = value else { return Ok(()) };
    match value.as_i64() {
        Some(v) if (min..=max).contains(&v) => Ok(()),
        Some(v) if max == i64::MAX => Err(Invalid::new(
            format!("Invalid '{field}': {v} is out of range; it must be at least {min}."),
            Some(field),
        )),
        Some(v) => Err(Invalid::new(
            format!("Invalid '{field}': {v} is out of range; it must be between {min} and {max}."),
            Some(field),
        )),
        None => Err(wrong_type(field, "an integer")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param_of(body: &str) -> Option<String> {
        match GenerationRequest::parse(body.as_bytes()) {
            Err(Invalid { param, .. }) => param,
            other => panic!("expected a 400 for {body}, got {other:?}"),
        }
    }

    #[test]
    fn a_repeated_field_is_refused_naming_it() {
        assert_eq!(
            param_of(r#"{"prompt":"fox","n":1,"model":"dall-e-3","n":10}"#).as_deref(),
            Some("n")
        );
        assert_eq!(
            param_of(r#"{"model":"a","prompt":"fox","model":"b"}"#).as_deref(),
            Some("model")
        );
        // Nested objects are the provider's to read; not a top-level repeat.
        GenerationRequest::parse(br#"{"prompt":"fox","extra":{"n":1},"n":2}"#).expect("valid");
        for not_an_object in ["[1,{\"a\":2}]", "\"fox\"", "7", "null", "true"] {
            let err = GenerationRequest::parse(not_an_object.as_bytes()).expect_err(not_an_object);
            assert!(err.message.contains("must be a JSON object"), "{err:?}");
        }
    }

    #[test]
    fn accepts_python_nulls_and_unknown_fields() {
        let req = GenerationRequest::parse(
            br#"{"prompt":"fox","model":null,"n":null,"stream":null,"extra":{"a":1}}"#,
        )
        .expect("valid");
        assert_eq!(req.model(), None);
        assert!(!req.stream());
        assert_eq!(
            req.body.keys().collect::<Vec<_>>(),
            ["prompt", "model", "n", "stream", "extra"]
        );
    }

    #[test]
    fn values_imagegate_does_not_read_are_the_providers_to_judge() {
        // Values and shapes no OpenAI model took when imagegate was written: they pass on
        // as sent, in their order, for the provider to accept or refuse.
        let body = r#"{"prompt":"fox","quality":"xhigh","size":"2880x1616","output_format":"svg","background":{"kind":"blur"},"moderation":2,"style":["a"],"user":7,"output_compression":150,"partial_images":5,"complexity":"high","frame_count":12,"safety_identifier":"u-1"}"#;
        let req = GenerationRequest::parse(body.as_bytes()).expect("valid");
        assert_eq!(Value::Object(req.body).to_string(), body);
    }

    #[test]
    fn names_the_offending_parameter() {
        assert_eq!(param_of(r#"{"model":"x"}"#), Some("prompt".into()));
        assert_eq!(param_of(r#"{"prompt":"  "}"#), Some("prompt".into()));
        assert_eq!(param_of(r#"{"prompt":3}"#), Some("prompt".into()));
        assert_eq!(param_of(r#"{"prompt":"a","n":0}"#), Some("n".into()));
        assert_eq!(param_of(r#"{"prompt":"a","n":11}"#), Some("n".into()));
        assert_eq!(param_of(r#"{"prompt":"a","n":"2"}"#), Some("n".into()));
        assert_eq!(param_of(r#"{"prompt":"a","n":1.5}"#), Some("n".into()));
        assert_eq!(
            param_of(r#"{"prompt":"a","model":7}"#),
            Some("model".into())
        );
        assert_eq!(
            param_of(r#"{"prompt":"a","stream":"yes"}"#),
            Some("stream".into())
        );
        assert_eq!(
            param_of(r#"{"prompt":"a","size":1024}"#),
            Some("size".into())
        );
        assert_eq!(
            param_of(r#"{"prompt":"a","partial_images":-1}"#),
            Some("partial_images".into())
        );
        assert_eq!(
            param_of(r#"{"prompt":"a","partial_images":"2"}"#),
            Some("partial_images".into())
        );
        assert_eq!(param_of("[1]"), None);
        assert_eq!(param_of("{not json"), None);
    }
}
