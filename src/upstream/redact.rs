//! A provider's key taken out of what the provider said, however the provider wrote it.
//!
//! A provider that echoes the key it was sent may write it as it came, in another letter
//! case, JSON-escaped (`sk\u002d...`, any character as `\uXXXX`), URL-encoded (`%2D`, `+`
//! for a space) or as an HTML character reference, and a client or a job record that gets
//! such text can decode it back. So the text is decoded first (over and over, for text
//! encoded twice), the key looked for case-insensitively in what that gives, and every
//! stretch of the original text that decodes to the key replaced by [`MARKER`].
//!
//! A JSON body is parsed, each string (and each name) redacted once decoded, and written
//! again; any other body is redacted as text.

use std::ops::Range;

use serde_json::Value;

/// What stands where the key was.
pub const MARKER: &str = "[redacted]";

/// Decoding passes at most: text encoded once, twice (`%252D`, `\\u0025 2D`), or more.
const MAX_PASSES: usize = 4;

/// `body` without `key` in any of the forms the module names; the same bytes when the key
/// is not in it.
pub fn redact(body: &[u8], key: &str) -> Vec<u8> {
    let key = fold(key);
    if key.is_empty() {
        return body.to_vec();
    }
    if let Ok(mut json) = serde_json::from_slice::<Value>(body) {
        if redact_json(&mut json, &key) {
            // Serialising a value that was parsed cannot fail.
            return serde_json::to_vec(&json).unwrap_or_else(|_| MARKER.as_bytes().to_vec());
        }
        return body.to_vec();
    }
    let text = String::from_utf8_lossy(body);
    match redact_text(&text, &key) {
        Some(redacted) => redacted.into_bytes(),
        None => body.to_vec(),
    }
}

/// Redacts every string and object member name of `value` in place; true if one changed.
fn redact_json(value: &mut Value, key: &[char]) -> bool {
    match value {
        Value::String(text) => match redact_text(text, key) {
            Some(redacted) => {
                *text = redacted;
                true
            }
            None => false,
        },
        Value::Array(items) => {
            // Every item, not only up to the first that changed.
            let mut changed = false;
            for item in items {
                changed |= redact_json(item, key);
            }
            changed
        }
        Value::Object(members) => {
            let mut changed = false;
            for (name, mut member) in std::mem::take(members) {
                changed |= redact_json(&mut member, key);
                let name = match redact_text(&name, key) {
                    Some(redacted) => {
                        changed = true;
                        redacted
                    }
                    None => name,
                };
                members.insert(name, member);
            }
            changed
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

/// One character of decoded text, and the bytes of the original text it came from.
#[derive(Clone, Debug)]
struct Unit {
    c: char,
    from: Range<usize>,
}

/// `text` with each stretch that decodes to the (folded) key replaced by [`MARKER`]; none
/// when there is none.
fn redact_text(text: &str, key: &[char]) -> Option<String> {
    let mut units: Vec<Unit> = text
        .char_indices()
        .map(|(at, c)| Unit {
            c,
            from: at..at + c.len_utf8(),
        })
        .collect();
    let mut found = matches(&units, key);
    for _ in 0..MAX_PASSES {
        match decode(&units) {
            Some(decoded) => units = decoded,
            None => break,
        }
        found.extend(matches(&units, key));
    }
    if found.is_empty() {
        return None;
    }
    found.sort_by_key(|range| range.start);
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for range in found {
        if range.end <= at {
            continue;
        }
        if range.start >= at {
            out.push_str(&text[at..range.start]);
            out.push_str(MARKER);
        }
        at = range.end;
    }
    out.push_str(&text[at..]);
    Some(out)
}

/// The original byte ranges of the places where `units` read as the key.
fn matches(units: &[Unit], key: &[char]) -> Vec<Range<usize>> {
    // Each folded character, with the unit it came from.
    let folded: Vec<(char, usize)> = units
        .iter()
        .enumerate()
        .flat_map(|(i, unit)| fold_char(unit.c).map(move |c| (c, i)))
        .collect();
    if folded.len() < key.len() {
        return Vec::new();
    }
    folded
        .windows(key.len())
        .filter(|window| window.iter().map(|(c, _)| c).eq(key.iter()))
        .map(|window| {
            let first = &units[window[0].1];
            let last = &units[window[window.len() - 1].1];
            first.from.start..last.from.end
        })
        .collect()
}

/// The key as it is compared: folded, character by character.
fn fold(text: &str) -> Vec<char> {
    text.chars().flat_map(fold_char).collect()
}

/// A character compared without its case (`K`, `k` and the Kelvin sign alike), and a space
/// as the `+` that stands for it in a form-encoded value.
fn fold_char(c: char) -> impl Iterator<Item = char> {
    c.to_uppercase()
        .flat_map(char::to_lowercase)
        .map(|c| if c == ' ' { '+' } else { c })
}

/// One pass of decoding: `%XX` (a UTF-8 sequence of them as its character), JSON's
/// backslash escapes (`\uXXXX`, a surrogate pair as one character) and HTML's character
/// references (`&#45;`, `&#x2d;`). None when nothing was decoded.
fn decode(units: &[Unit]) -> Option<Vec<Unit>> {
    let mut out = Vec::with_capacity(units.len());
    let mut decoded_any = false;
    let mut i = 0;
    while i < units.len() {
        let escape = match units[i].c {
            '%' => percent(units, i),
            '\\' => backslash(units, i),
            '&' => reference(units, i),
            _ => None,
        };
        match escape {
            Some((c, taken)) => {
                out.push(Unit {
                    c,
                    from: units[i].from.start..units[i + taken - 1].from.end,
                });
                decoded_any = true;
                i += taken;
            }
            None => {
                out.push(units[i].clone());
                i += 1;
            }
        }
    }
    decoded_any.then_some(out)
}

/// The value of the hexadecimal digits in `units[from..from + n]`.
fn hex(units: &[Unit], from: usize, n: usize) -> Option<u32> {
    let digits = units.get(from..from + n)?;
    digits
        .iter()
        .try_fold(0u32, |value, unit| Some(value * 16 + unit.c.to_digit(16)?))
}

/// `%XX`, or the `%XX%XX...` of one UTF-8 encoded character: the character and how many
/// units it took.
fn percent(units: &[Unit], at: usize) -> Option<(char, usize)> {
    let byte = |k: usize| -> Option<u8> {
        let start = at + 3 * k;
        if units.get(start)?.c != '%' {
            return None;
        }
        u8::try_from(hex(units, start + 1, 2)?).ok()
    };
    let first = byte(0)?;
    let len = match first {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf7 => 4,
        _ => return None,
    };
    let bytes: Vec<u8> = (0..len).map(byte).collect::<Option<_>>()?;
    let c = std::str::from_utf8(&bytes).ok()?.chars().next()?;
    Some((c, 3 * len))
}

/// A JSON backslash escape: the character and how many units it took.
fn backslash(units: &[Unit], at: usize) -> Option<(char, usize)> {
    let c = match units.get(at + 1)?.c {
        'u' => return unicode_escape(units, at),
        '"' => '"',
        '\\' => '\\',
        '/' => '/',
        'b' => '\u{8}',
        'f' => '\u{c}',
        'n' => '\n',
        'r' => '\r',
        't' => '\t',
        _ => return None,
    };
    Some((c, 2))
}

/// `\uXXXX`, or a surrogate pair `\uD8xx\uDCxx`.
fn unicode_escape(units: &[Unit], at: usize) -> Option<(char, usize)> {
    let high = hex(units, at + 2, 4)?;
    if let Some(c) = char::from_u32(high) {
        return Some((c, 6));
    }
    if !(0xd800..0xdc00).contains(&high)
        || units.get(at + 6)?.c != '\\'
        || units.get(at + 7)?.c != 'u'
    {
        return None;
    }
    let low = hex(units, at + 8, 4)?;
    if !(0xdc00..0xe000).contains(&low) {
        return None;
    }
    let c = char::from_u32(0x10000 + ((high - 0xd800) << 10) + (low - 0xdc00))?;
    Some((c, 12))
}

/// `&#DDD;` or `&#xHH;`: the character and how many units it took.
fn reference(units: &[Unit], at: usize) -> Option<(char, usize)> {
    if units.get(at + 1)?.c != '#' {
        return None;
    }
    let (radix, start) = match units.get(at + 2)?.c {
        'x' | 'X' => (16, at + 3),
        _ => (10, at + 2),
    };
    let mut value: u32 = 0;
    let mut end = start;
    while let Some(digit) = units.get(end).and_then(|u| u.c.to_digit(radix)) {
        value = value.checked_mul(radix)?.checked_add(digit)?;
        end += 1;
    }
    if end == start || units.get(end)?.c != ';' {
        return None;
    }
    Some((char::from_u32(value)?, end + 1 - at))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sk-Live_Key+42/x";

    fn redacted(body: &str) -> String {
        String::from_utf8(redact(body.as_bytes(), KEY)).expect("utf-8")
    }

    /// Every escape of every character: the forms a test can build the key in.
    fn forms() -> Vec<String> {
        let each = |f: &dyn Fn(char) -> String| KEY.chars().map(f).collect::<String>();
        vec![
            KEY.to_owned(),
            KEY.to_uppercase(),
            KEY.to_lowercase(),
            KEY.replace('-', "\\u002d"),
            KEY.replace('-', "\\u002D"),
            each(&|c| format!("\\u{:04x}", u32::from(c))),
            each(&|c| format!("%{:02X}", u32::from(c))),
            each(&|c| format!("%{:02x}", u32::from(c))),
            KEY.replace('-', "%2D")
                .replace('+', "%2B")
                .replace('/', "%2F"),
            KEY.replace('-', "%252D"),
            KEY.replace('/', "\\/"),
            each(&|c| format!("&#{};", u32::from(c))),
            KEY.replace('-', "&#x2D;"),
            // Mixed: upper case, one escape of each kind.
            "SK%2dLIVE\\u005fKEY+42/X".to_owned(),
            // The Kelvin sign reads as a K once case is set aside.
            KEY.replace('K', "\u{212a}"),
        ]
    }

    #[test]
    fn the_key_is_found_however_it_is_written() {
        for form in forms() {
            let text = format!("Incorrect API key provided: {form}. See the docs.");
            assert_eq!(
                redacted(&text),
                "Incorrect API key provided: [redacted]. See the docs.",
                "{form}"
            );
        }
    }

    #[test]
    fn json_strings_and_names_are_redacted_after_decoding() {
        for form in forms() {
            // The form as a JSON string holds it (its backslashes escaped in turn).
            let quoted = serde_json::to_string(&form).expect("json");
            let raw_escaped = format!("sk\\u002d{}", &KEY[3..]);
            let body = format!(
                r#"{{"error":{{"message":"key {inner} refused","type":"invalid_request_error","param":null,"code":"invalid_api_key","echo":[{quoted},"{raw_escaped}"],{quoted}:1}}}}"#,
                inner = &quoted[1..quoted.len() - 1],
            );
            let out: Value = serde_json::from_str(&redacted(&body)).expect("still JSON");
            assert_eq!(
                out["error"]["message"], "key [redacted] refused",
                "{form}: {body}"
            );
            assert_eq!(
                out["error"]["echo"],
                serde_json::json!(["[redacted]", "[redacted]"])
            );
            assert_eq!(out["error"]["[redacted]"], 1, "{out}");
            assert_eq!(out["error"]["code"], "invalid_api_key");
        }
    }

    #[test]
    fn other_text_is_left_as_it_was() {
        let body = r#"{"error": {"message": "Invalid size '7x7'.", "param": "size"}}"#;
        assert_eq!(redacted(body), body, "not even re-serialised");
        for text in [
            "100% sure %zz %",
            "a \\u00 b \\q",
            "&#; &#x; &amp;",
            "sk-live",
        ] {
            assert_eq!(redacted(text), text);
        }
        // Close to the key is not the key.
        let near = KEY.replace('4', "5");
        assert_eq!(redacted(&near), near);
        assert_eq!(redact(b"anything", ""), b"anything");
        // A body that is not UTF-8 keeps its bytes when the key is not in it.
        assert_eq!(redact(b"\xff\xfe", KEY), b"\xff\xfe");
    }

    #[test]
    fn each_occurrence_goes_and_the_text_between_stays() {
        let text = format!("{KEY}{KEY} and {} then %{KEY}", KEY.to_uppercase());
        assert_eq!(
            redacted(&text),
            "[redacted][redacted] and [redacted] then %[redacted]"
        );
    }
}
