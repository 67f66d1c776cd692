//! Where each setting comes from (the file, an `IMAGEGATE_*` variable, or the file a
//! `*_FILE` variable names) and the one-line messages that say so when a setting is refused.
//!
//! Every refusal reads `PLACE: what is wrong`, the place being `FILE: KEY` for the file and
//! `environment variable NAME (KEY)` for a variable, so that an operator knows which of the
//! two to edit.

use std::fmt;
use std::path::Path;

use figment::error::{Actual, Kind};
use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Map};
use figment::{Figment, Metadata, Profile, Provider};

/// The prefix of the variables that override the file.
const PREFIX: &str = "IMAGEGATE_";

/// The suffix of a variable naming a file that holds the value (Docker and Kubernetes
/// secrets are files): `IMAGEGATE_DATABASE__URL_FILE=/run/secrets/database_url`.
pub const FILE_SUFFIX: &str = "_FILE";

/// A configuration that cannot be used: one line per problem, each naming its place.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{place}: {message}")]
    Invalid { place: Place, message: String },
    #[error("{}", lines(.0))]
    Several(Vec<ConfigError>),
}

fn lines(errors: &[ConfigError]) -> String {
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    lines.join("\n")
}

impl ConfigError {
    /// One error for several: itself when there is one.
    pub(super) fn all(mut errors: Vec<ConfigError>) -> Result<(), ConfigError> {
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(ConfigError::Several(errors)),
        }
    }
}

/// Where a setting was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// `key` in the configuration file `file` (or the file itself when `key` is empty).
    File { file: String, key: String },
    /// The environment variable `var`, which sets `key`.
    Var { var: String, key: String },
}

impl Place {
    /// The key the place concerns, dotted (`server.listen`).
    pub fn key(&self) -> &str {
        match self {
            Place::File { key, .. } | Place::Var { key, .. } => key,
        }
    }
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::File { file, key } if key.is_empty() => write!(f, "{file}"),
            Place::File { file, key } => write!(f, "{file}: {key}"),
            Place::Var { var, key } => write!(f, "environment variable {var} ({key})"),
        }
    }
}

/// Names the place of `key` (dotted, `routes[0]` indexes allowed): the variable that set
/// it when one did, else the file.
pub(super) fn place_of(figment: Option<&Figment>, file: &str, key: &str) -> Place {
    let var = figment.and_then(|figment| {
        // figment has no array indexes: the nearest value that has a place of its own.
        let plain: String = key.split('[').next().unwrap_or(key).to_owned();
        let metadata = figment.find_metadata(&plain)?;
        let path: Vec<&str> = plain.split('.').collect();
        var_name(metadata, &path)
    });
    match var {
        Some(var) => Place::Var {
            var,
            key: key.to_owned(),
        },
        None => Place::File {
            file: file.to_owned(),
            key: key.to_owned(),
        },
    }
}

/// The variable a value came from, when its provider is one of ours for the environment.
fn var_name(metadata: &Metadata, path: &[impl AsRef<str>]) -> Option<String> {
    if let Some(figment::Source::Custom(var)) = &metadata.source {
        return Some(var.clone());
    }
    if metadata.name.starts_with(&format!("`{PREFIX}`")) {
        let parts: Vec<String> = path
            .iter()
            .map(|p| p.as_ref().to_ascii_uppercase())
            .collect();
        return Some(format!("{PREFIX}{}", parts.join("__")));
    }
    None
}

/// The `IMAGEGATE_SECTION__KEY` overrides, then the values of the `IMAGEGATE_SECTION__KEY_FILE`
/// variables read from their files, over the file at `path`.
pub(super) fn figment(path: &Path) -> Result<Figment, ConfigError> {
    let mut figment = Figment::new()
        .merge(Toml::file(path))
        .merge(env_overrides());
    for (var, value) in std::env::vars() {
        let Some(setting) = var
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.strip_suffix(FILE_SUFFIX))
            .filter(|setting| setting.contains("__"))
        else {
            continue;
        };
        let key = setting.to_ascii_lowercase().replace("__", ".");
        let plain = format!("{PREFIX}{setting}");
        if std::env::var_os(&plain).is_some() {
            return Err(ConfigError::Invalid {
                place: Place::Var { var, key },
                message: format!("set {plain} or {plain}{FILE_SUFFIX}, not both"),
            });
        }
        let text = read_secret_file(&var, &value).map_err(|message| ConfigError::Invalid {
            place: Place::Var {
                var: var.clone(),
                key: key.clone(),
            },
            message,
        })?;
        figment = figment.merge(FileVar { var, key, text });
    }
    Ok(figment)
}

/// `IMAGEGATE_SERVER__LISTEN` -> `server.listen`. Only variables with a `__` (or the one
/// top-level key) are read, so that `IMAGEGATE_CONFIG`, `IMAGEGATE_ADMIN_TOKEN` and the like
/// are not mistaken for configuration keys; `*_FILE` ones are read by [`figment`].
fn env_overrides() -> Env {
    Env::prefixed(PREFIX)
        .filter(|key| {
            let key = key.as_str();
            let from_file = key.to_ascii_uppercase().ends_with(FILE_SUFFIX);
            (key.contains("__") && !from_file) || key.eq_ignore_ascii_case("default_model")
        })
        .split("__")
}

/// The contents of the file a `*_FILE` variable names, without the line end most editors
/// and `echo` add; the error is the reason, naming the file (never its contents).
pub(super) fn read_secret_file(var: &str, path: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|err| format!("cannot read {path} (named by {var}): {err}"))?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    if text.is_empty() {
        return Err(format!("{path} (named by {var}) is empty"));
    }
    Ok(text.to_owned())
}

/// One setting read from the file a `*_FILE` variable names; its metadata names the variable.
struct FileVar {
    var: String,
    key: String,
    text: String,
}

impl Provider for FileVar {
    fn metadata(&self) -> Metadata {
        Metadata::from(
            format!("environment variable {}", self.var),
            figment::Source::Custom(self.var.clone()),
        )
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        // Nested from the innermost key out: `database.url` -> {database: {url: text}}.
        let mut parts = self.key.rsplit('.');
        let last = parts.next().unwrap_or_default();
        let mut dict = Dict::new();
        dict.insert(last.to_owned(), self.text.clone().into());
        for part in parts {
            let mut outer = Dict::new();
            outer.insert(part.to_owned(), dict.into());
            dict = outer;
        }
        Ok(Profile::Default.collect(dict))
    }
}

/// figment's refusal as one line per problem: the place, and what is wrong in plain words,
/// with the closest expected key for a misspelt one.
pub(super) fn parse_error(file: &str, source: figment::Error) -> ConfigError {
    let errors: Vec<ConfigError> = source
        .into_iter()
        .map(|error| one_parse_error(file, error))
        .collect();
    match ConfigError::all(errors) {
        Err(err) => err,
        Ok(()) => ConfigError::Invalid {
            place: Place::File {
                file: file.to_owned(),
                key: String::new(),
            },
            message: "cannot be read".into(),
        },
    }
}

fn one_parse_error(file: &str, error: figment::Error) -> ConfigError {
    let mut path = error.path.clone();
    let message = match &error.kind {
        Kind::UnknownField(found, expected) => {
            // The path ends at the unknown key when figment put it there.
            if path.last() != Some(found) {
                path.push(found.clone());
            }
            format!("unknown key `{found}`{}", suggestion(found, expected))
        }
        Kind::UnknownVariant(found, expected) => {
            format!(
                "`{found}` is not one of {}{}",
                quoted(expected),
                suggestion(found, expected)
            )
        }
        Kind::MissingField(name) => {
            path.push(name.to_string());
            "missing (this key has no default)".to_owned()
        }
        Kind::InvalidType(actual, expected) | Kind::InvalidValue(actual, expected) => {
            if expected == "a duration" {
                duration_message(actual)
            } else {
                format!("expected {expected}, found {actual}")
            }
        }
        other => other.to_string(),
    };
    let key = dotted(&path);
    let place = match error
        .metadata
        .as_ref()
        .and_then(|m| var_name(m, &error.path))
    {
        Some(var) => Place::Var { var, key },
        None => Place::File {
            file: error
                .metadata
                .as_ref()
                .and_then(|m| m.source.as_ref())
                .and_then(|s| s.file_path())
                .map_or_else(|| file.to_owned(), |p| short_path(p, file)),
            key,
        },
    };
    ConfigError::Invalid { place, message }
}

/// `models.x.routes[0].provider`: figment's path with array indexes as the file writes them.
fn dotted(path: &[String]) -> String {
    let mut key = String::new();
    for part in path {
        if part.parse::<usize>().is_ok() && !key.is_empty() {
            key.push_str(&format!("[{part}]"));
        } else {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(part);
        }
    }
    key
}

/// The file as the user named it, rather than the absolute path figment resolved.
fn short_path(resolved: &Path, given: &str) -> String {
    if resolved.ends_with(given) {
        given.to_owned()
    } else {
        resolved.display().to_string()
    }
}

/// What `humantime` says of a value that is not a duration.
fn duration_message(actual: &Actual) -> String {
    match actual {
        Actual::Str(value) => {
            let reason = humantime::parse_duration(value)
                .err()
                .map_or_else(String::new, |e| format!(" ({e})"));
            format!("{value:?} is not a duration like \"30s\"{reason}")
        }
        other => format!("expected a duration like \"30s\", found {other}"),
    }
}

fn quoted(names: &[&str]) -> String {
    let names: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    names.join(", ")
}

/// `; did you mean `provider`?` for the expected name closest to `found`, or the list of
/// expected names when none is close.
fn suggestion(found: &str, expected: &[&str]) -> String {
    let closest = expected
        .iter()
        .map(|name| (strsim::damerau_levenshtein(found, name), *name))
        .min();
    match closest {
        // A third of the letters wrong, at least one: a typo, not another word.
        Some((distance, name)) if distance <= (found.chars().count() / 3).max(1) => {
            format!("; did you mean `{name}`?")
        }
        _ if expected.is_empty() => String::new(),
        _ => format!(" (expected one of {})", quoted(expected)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_close_name_is_suggested_and_a_far_one_lists_the_choices() {
        let expected = &["provider", "model", "defaults", "force"];
        assert_eq!(
            suggestion("provder", expected),
            "; did you mean `provider`?"
        );
        assert_eq!(suggestion("modle", expected), "; did you mean `model`?");
        assert_eq!(
            suggestion("colour", expected),
            " (expected one of `provider`, `model`, `defaults`, `force`)"
        );
    }

    #[test]
    fn a_secret_file_loses_its_line_end_and_must_hold_something() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret\n").expect("write");
        let path = path.display().to_string();
        assert_eq!(read_secret_file("X_FILE", &path).as_deref(), Ok("s3cret"));
        std::fs::write(&path, "\n").expect("write");
        let empty = read_secret_file("X_FILE", &path).expect_err("empty");
        assert!(empty.ends_with("(named by X_FILE) is empty"), "{empty}");
        let gone = dir.path().join("gone").display().to_string();
        let missing = read_secret_file("X_FILE", &gone).expect_err("missing");
        assert!(
            missing.starts_with(&format!("cannot read {gone} (named by X_FILE): ")),
            "{missing}"
        );
    }
}
