//! A key's settings as the admin API and the CLI take them, checked here once into what the
//! store keeps: a bad value is refused with the field it concerns, before anything is
//! written.

use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use crate::store::{BudgetPeriod, KeyChanges, KeyLimits};

/// The most `rpm` or `max_in_flight` may be: far above any real use, low enough that the
/// rate limit's arithmetic stays exact.
const MAX_COUNT: i64 = 1_000_000;
/// A budget above this many US dollars would not fit in nano-dollars.
const MAX_BUDGET_USD: f64 = 9_000_000_000.0;
const MAX_NAME_CHARS: usize = 100;

/// A value refused, and the field it came in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SettingError {
    pub message: String,
    pub param: &'static str,
}

fn refuse(param: &'static str, message: impl Into<String>) -> SettingError {
    SettingError {
        message: message.into(),
        param,
    }
}

/// `POST /admin/keys`, and `imagegate keys create`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    pub name: String,
    pub budget_usd: Option<f64>,
    pub budget_period: Option<String>,
    pub rpm: Option<i64>,
    pub max_in_flight: Option<i64>,
    pub models: Option<Vec<String>>,
    /// RFC 3339.
    pub expires_at: Option<String>,
    pub metadata: Option<Value>,
}

/// `PATCH /admin/keys/{name}`, and `imagegate keys update`: a field left out stays as it
/// is, a field set to null is cleared.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeKey {
    #[serde(default, deserialize_with = "nullable")]
    pub budget_usd: Option<Option<f64>>,
    #[serde(default, deserialize_with = "nullable")]
    pub budget_period: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    pub rpm: Option<Option<i64>>,
    #[serde(default, deserialize_with = "nullable")]
    pub max_in_flight: Option<Option<i64>>,
    #[serde(default, deserialize_with = "nullable")]
    pub models: Option<Option<Vec<String>>>,
    #[serde(default, deserialize_with = "nullable")]
    pub expires_at: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    pub metadata: Option<Option<Value>>,
}

/// A field that is there, null or not: absent fields never reach this (`default`).
fn nullable<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

impl CreateKey {
    /// The key's name and limits. `models` are the public names (models and aliases) the
    /// running configuration routes.
    pub fn check(&self, models: &[&str]) -> Result<(String, KeyLimits), SettingError> {
        let name = check_name(&self.name)?;
        let budget = self
            .budget_usd
            .map(|usd| budget(usd, self.budget_period.as_deref()))
            .transpose()?;
        if budget.is_none() && self.budget_period.is_some() {
            return Err(refuse("budget_period", "budget_period needs a budget_usd."));
        }
        let (budget_nanousd, budget_period) = budget
            .map(|(n, p)| (n, p.unwrap_or_else(|| "total".to_owned())))
            .unzip();
        Ok((
            name,
            KeyLimits {
                budget_nanousd,
                budget_period,
                rpm: self.rpm.map(|n| count("rpm", n)).transpose()?,
                max_in_flight: self
                    .max_in_flight
                    .map(|n| count("max_in_flight", n))
                    .transpose()?,
                models: self
                    .models
                    .as_ref()
                    .map(|m| allowlist(m, models))
                    .transpose()?,
                expires_at: self.expires_at.as_deref().map(expiry).transpose()?,
                metadata: self.metadata.clone().map(metadata).transpose()?,
            },
        ))
    }
}

impl ChangeKey {
    pub fn check(&self, models: &[&str]) -> Result<KeyChanges, SettingError> {
        let budget = match (&self.budget_usd, &self.budget_period) {
            (None, None) => None,
            (Some(None), None | Some(None)) => Some(None),
            (Some(Some(usd)), period) => {
                let period = match period {
                    Some(None) => {
                        return Err(refuse(
                            "budget_period",
                            "budget_period cannot be cleared while the key has a budget; clear budget_usd to remove both.",
                        ));
                    }
                    Some(Some(period)) => Some(period.as_str()),
                    None => None,
                };
                Some(Some(budget(*usd, period)?))
            }
            (_, Some(_)) => {
                return Err(refuse(
                    "budget_period",
                    "budget_period changes together with budget_usd: send both.",
                ));
            }
        };
        Ok(KeyChanges {
            budget,
            rpm: nullable_map(&self.rpm, |n| count("rpm", *n))?,
            max_in_flight: nullable_map(&self.max_in_flight, |n| count("max_in_flight", *n))?,
            models: nullable_map(&self.models, |m| allowlist(m, models))?,
            expires_at: nullable_map(&self.expires_at, |t| expiry(t))?,
            metadata: nullable_map(&self.metadata, |m| metadata(m.clone()))?,
        })
    }
}

fn nullable_map<T, U>(
    field: &Option<Option<T>>,
    check: impl FnOnce(&T) -> Result<U, SettingError>,
) -> Result<Option<Option<U>>, SettingError> {
    match field {
        None => Ok(None),
        Some(None) => Ok(Some(None)),
        Some(Some(value)) => check(value).map(|v| Some(Some(v))),
    }
}

/// Characters a new key name may have besides ASCII letters and digits.
const NAME_PUNCTUATION: &str = "._-:@";

/// A name people type and read, that fits in a URL path segment and a log line, and that
/// looks like no other: ASCII letters, digits and [`NAME_PUNCTUATION`], 1 to
/// [`MAX_NAME_CHARS`] characters. No white space, markup, formula, bidirectional override
/// or zero-width character, so two keys never display alike. Checked when a key is
/// created; names given before this rule keep working wherever a key is read or used.
pub fn check_name(name: &str) -> Result<String, SettingError> {
    let plain = |c: char| c.is_ascii_alphanumeric() || NAME_PUNCTUATION.contains(c);
    if name.is_empty() || name.chars().count() > MAX_NAME_CHARS || !name.chars().all(plain) {
        return Err(refuse(
            "name",
            format!(
                "name must be 1 to {MAX_NAME_CHARS} characters, each an ASCII letter, a digit or one of . _ - : @ (got {name:?})."
            ),
        ));
    }
    Ok(name.to_owned())
}

/// Nano-dollars, and the period when one was given.
fn budget(usd: f64, period: Option<&str>) -> Result<(i64, Option<String>), SettingError> {
    if !usd.is_finite() || usd < 0.0 {
        return Err(refuse(
            "budget_usd",
            "budget_usd must be a number of US dollars, 0 or more.",
        ));
    }
    if usd > MAX_BUDGET_USD {
        return Err(refuse(
            "budget_usd",
            format!("budget_usd must be at most {MAX_BUDGET_USD}."),
        ));
    }
    if let Some(period) = period {
        if BudgetPeriod::parse(period).is_none() {
            return Err(refuse(
                "budget_period",
                format!("budget_period must be one of day, month or total, not {period:?}."),
            ));
        }
    }
    // Bounded by MAX_BUDGET_USD above: the cast cannot saturate.
    let nanousd = (usd * 1e9).round() as i64;
    Ok((nanousd, period.map(str::to_owned)))
}

fn count(param: &'static str, n: i64) -> Result<i64, SettingError> {
    if !(1..=MAX_COUNT).contains(&n) {
        return Err(refuse(
            param,
            format!(
                "{param} must be a whole number from 1 to {MAX_COUNT} (null for no limit; to stop a key, revoke it)."
            ),
        ));
    }
    Ok(n)
}

/// Each name must be one the running configuration routes (a model or an alias); repeats
/// are dropped. Which model an alias stands for is decided when a request is checked.
fn allowlist(names: &[String], known: &[&str]) -> Result<Vec<String>, SettingError> {
    if names.is_empty() {
        return Err(refuse(
            "models",
            "models must name at least one model (null or absent: every model).",
        ));
    }
    let mut list: Vec<String> = Vec::with_capacity(names.len());
    for name in names {
        if !known.contains(&name.as_str()) {
            return Err(refuse(
                "models",
                format!(
                    "models: {name:?} is not a model or alias this gateway routes (known: {}).",
                    known.join(", ")
                ),
            ));
        }
        if !list.contains(name) {
            list.push(name.clone());
        }
    }
    Ok(list)
}

/// An RFC 3339 time, or a date (`2030-01-31`): the key stops working at that day's first
/// instant, UTC.
fn expiry(text: &str) -> Result<DateTime<Utc>, SettingError> {
    if let Ok(day) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(day.and_time(NaiveTime::MIN).and_utc());
    }
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|err| {
            refuse(
                "expires_at",
                format!(
                    "expires_at must be an RFC 3339 time such as 2030-01-31T00:00:00Z or a date \
                     such as 2030-01-31 ({err})."
                ),
            )
        })
}

fn metadata(value: Value) -> Result<Map<String, Value>, SettingError> {
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(refuse("metadata", "metadata must be a JSON object.")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODELS: &[&str] = &["gpt-image-1", "img"];

    fn create(json: Value) -> Result<(String, KeyLimits), SettingError> {
        serde_json::from_value::<CreateKey>(json)
            .expect("well-formed")
            .check(MODELS)
    }

    fn change(json: Value) -> Result<KeyChanges, SettingError> {
        serde_json::from_value::<ChangeKey>(json)
            .expect("well-formed")
            .check(MODELS)
    }

    #[test]
    fn a_full_create_is_checked_into_limits() {
        let (name, limits) = create(serde_json::json!({
            "name": "svc", "budget_usd": 12.5, "rpm": 60, "max_in_flight": 4,
            "models": ["img", "gpt-image-1", "img"], "expires_at": "2030-01-31T00:00:00+01:00",
            "metadata": {"team": "search"}
        }))
        .expect("valid");
        assert_eq!(name, "svc");
        assert_eq!(limits.budget_nanousd, Some(12_500_000_000));
        assert_eq!(limits.budget_period.as_deref(), Some("total"));
        assert_eq!(limits.rpm, Some(60));
        assert_eq!(
            limits.models,
            Some(vec!["img".into(), "gpt-image-1".into()])
        );
        assert_eq!(
            limits.expires_at.map(|t| t.to_rfc3339()),
            Some("2030-01-30T23:00:00+00:00".into())
        );
        let (_, limits) = create(serde_json::json!({"name": "svc", "expires_at": "2030-01-31"}))
            .expect("a plain date");
        assert_eq!(
            limits.expires_at.map(|t| t.to_rfc3339()),
            Some("2030-01-31T00:00:00+00:00".into())
        );
    }

    #[test]
    fn each_bad_value_names_its_field() {
        let cases = [
            (serde_json::json!({"name": " "}), "name"),
            (serde_json::json!({"name": "a/b"}), "name"),
            (
                serde_json::json!({"name": "a", "budget_usd": -1}),
                "budget_usd",
            ),
            (
                serde_json::json!({"name": "a", "budget_usd": 1, "budget_period": "week"}),
                "budget_period",
            ),
            (
                serde_json::json!({"name": "a", "budget_period": "day"}),
                "budget_period",
            ),
            (serde_json::json!({"name": "a", "rpm": -5}), "rpm"),
            (serde_json::json!({"name": "a", "rpm": 0}), "rpm"),
            (
                serde_json::json!({"name": "a", "max_in_flight": 0}),
                "max_in_flight",
            ),
            (
                serde_json::json!({"name": "a", "models": ["dall-e-9"]}),
                "models",
            ),
            (serde_json::json!({"name": "a", "models": []}), "models"),
            (
                serde_json::json!({"name": "a", "expires_at": "tomorrow"}),
                "expires_at",
            ),
            (
                serde_json::json!({"name": "a", "metadata": [1]}),
                "metadata",
            ),
        ];
        for (json, param) in cases {
            let err = create(json.clone()).expect_err("refused");
            assert_eq!(err.param, param, "{json}: {err}");
        }
    }

    #[test]
    fn new_names_are_plain() {
        let longest = "a".repeat(MAX_NAME_CHARS);
        for name in ["svc", "svc-1.prod_eu:team@corp", "A9", longest.as_str()] {
            assert_eq!(check_name(name).as_deref(), Ok(name));
        }
        let too_long = "a".repeat(MAX_NAME_CHARS + 1);
        for name in [
            "",
            too_long.as_str(),
            "svc 1",
            " svc",
            "=SUM(1+1)",
            "<b>x</b>",
            "svc\u{202e}1",
            "svc\u{200b}1",
            "sv\u{0441}1",
            "a/b",
            "a%2f",
            "line\nbreak",
            "é",
        ] {
            let err = check_name(name).expect_err(name);
            assert_eq!(err.param, "name");
            assert!(err.message.contains(". _ - : @"), "{}", err.message);
        }
    }

    #[test]
    fn a_change_leaves_out_what_is_absent_and_clears_what_is_null() {
        let changes = change(serde_json::json!({"rpm": null, "models": ["img"]})).expect("ok");
        assert_eq!(
            changes,
            KeyChanges {
                rpm: Some(None),
                models: Some(Some(vec!["img".into()])),
                ..KeyChanges::default()
            }
        );
        let changes = change(serde_json::json!({"budget_usd": 2})).expect("ok");
        assert_eq!(changes.budget, Some(Some((2_000_000_000, None))));
        let changes = change(serde_json::json!({"budget_usd": null})).expect("ok");
        assert_eq!(changes.budget, Some(None));
        for json in [
            serde_json::json!({"budget_period": "day"}),
            serde_json::json!({"budget_usd": 1, "budget_period": null}),
            serde_json::json!({"budget_usd": 1, "budget_period": "hour"}),
        ] {
            let err = change(json.clone()).expect_err("refused");
            assert_eq!(err.param, "budget_period", "{json}");
        }
        assert_eq!(
            change(serde_json::json!({"rpm": -1})).unwrap_err().param,
            "rpm"
        );
    }
}
