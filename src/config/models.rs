//! `[models.NAME]`: the public model names, their aliases, and the routes each one tries.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroUsize;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::endpoints::Endpoint;
use super::pricing::{Price, Prices};
use super::providers::Provider;
use super::raw::{RawFailover, RawModel, RawRoute};
use super::{ConfigError, Validator};

#[derive(Debug)]
pub struct Model {
    pub name: String,
    pub aliases: Vec<String>,
    /// Tried in order (failover walks this list).
    pub routes: Vec<Route>,
    pub failover: Failover,
}

impl Model {
    /// Whether some route of the model serves `endpoint`.
    pub fn serves(&self, endpoint: Endpoint) -> bool {
        self.routes.iter().any(|r| r.serves(endpoint))
    }
}

/// When a request moves on to the model's next route. Connection failures and timeouts
/// before the provider answers always do; these statuses do too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failover {
    pub on_status: Vec<u16>,
    pub max_attempts: NonZeroUsize,
}

#[derive(Debug)]
pub struct Route {
    pub provider: Arc<Provider>,
    pub upstream_model: String,
    pub policy: ParamPolicy,
    /// The provider prefixes `b64_json` with `data:image/...;base64,`; remove it on the way.
    pub strip_b64_prefix: bool,
    pub price: Price,
    /// The page (and its date) the price comes from, as the entry's `source` names it.
    pub price_source: Option<String>,
    /// The endpoints the provider serves this model on (`endpoints`; default: all).
    pub endpoints: Vec<Endpoint>,
}

impl Route {
    pub fn serves(&self, endpoint: Endpoint) -> bool {
        self.endpoints.contains(&endpoint)
    }
}

/// What a route changes in a request before it goes upstream.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ParamPolicy {
    /// Set when absent (or null).
    pub defaults: Map<String, Value>,
    /// Always set.
    pub force: Map<String, Value>,
    /// Always removed.
    pub drop: Vec<String>,
}

impl ParamPolicy {
    /// Applies the policy to a JSON request body.
    pub fn apply(&self, body: &mut Map<String, Value>) {
        for (key, value) in &self.defaults {
            if body.get(key).is_none_or(Value::is_null) {
                body.insert(key.clone(), value.clone());
            }
        }
        for (key, value) in &self.force {
            body.insert(key.clone(), value.clone());
        }
        for key in &self.drop {
            body.shift_remove(key);
        }
    }
}

/// The validated `[models]` table.
pub(super) struct Models {
    /// Public model name -> model, one entry per canonical name.
    pub models: BTreeMap<String, Arc<Model>>,
    /// Alias -> canonical public name.
    pub aliases: HashMap<String, String>,
}

impl Validator<'_> {
    pub(super) fn models(
        &self,
        raw: BTreeMap<String, RawModel>,
        providers: &BTreeMap<String, Arc<Provider>>,
        prices: &Prices,
        default_model: Option<&str>,
    ) -> Result<Models, ConfigError> {
        let mut models = BTreeMap::new();
        let mut aliases = HashMap::new();
        for (name, m) in raw {
            let key = format!("models.{name}");
            if m.routes.is_empty() {
                return Err(self.err(format!("{key}.routes"), "needs at least one route"));
            }
            let routes = m
                .routes
                .into_iter()
                .enumerate()
                .map(|(i, r)| {
                    self.route(&format!("{key}.routes[{i}]"), &name, r, providers, prices)
                })
                .collect::<Result<Vec<_>, _>>()?;
            for alias in &m.aliases {
                if aliases.insert(alias.clone(), name.clone()).is_some() {
                    return Err(self.err(
                        format!("{key}.aliases"),
                        format!("alias {alias:?} is used twice"),
                    ));
                }
            }
            let failover = self.failover(&key, m.failover, routes.len())?;
            let model = Model {
                name: name.clone(),
                aliases: m.aliases,
                routes,
                failover,
            };
            models.insert(name, Arc::new(model));
        }
        if let Some(alias) = aliases.keys().find(|a| models.contains_key(*a)) {
            return Err(self.err("models", format!("{alias:?} is both a model and an alias")));
        }
        if let Some(default) = default_model {
            if !models.contains_key(default) && !aliases.contains_key(default) {
                return Err(self.err(
                    "default_model",
                    format!("{default:?} is not a configured model"),
                ));
            }
        }
        Ok(Models { models, aliases })
    }

    /// `rkey` is the route's key (`models.NAME.routes[i]`), `model` its public model name.
    fn route(
        &self,
        rkey: &str,
        model: &str,
        r: RawRoute,
        providers: &BTreeMap<String, Arc<Provider>>,
        prices: &Prices,
    ) -> Result<Route, ConfigError> {
        let provider = providers.get(&r.provider).ok_or_else(|| {
            self.err(
                format!("{rkey}.provider"),
                format!("no provider named {:?} in [providers]", r.provider),
            )
        })?;
        let upstream_model = r.model.unwrap_or_else(|| model.to_owned());
        let entry = prices
            .get(&(r.provider.clone(), upstream_model.clone()))
            .ok_or_else(|| {
                self.err(
                    format!("pricing.{}.{upstream_model}", r.provider),
                    format!("missing: route {rkey} needs a price so that its usage has a cost"),
                )
            })?;
        for field in ["model", "prompt"] {
            if r.force.contains_key(field)
                || r.defaults.contains_key(field)
                || r.drop.iter().any(|d| d == field)
            {
                return Err(self.err(
                    rkey,
                    format!("the parameter policy may not touch {field:?}"),
                ));
            }
        }
        let endpoints = self.endpoints(rkey, r.endpoints)?;
        Ok(Route {
            provider: Arc::clone(provider),
            upstream_model,
            policy: ParamPolicy {
                defaults: r.defaults,
                force: r.force,
                drop: r.drop,
            },
            strip_b64_prefix: r.strip_b64_prefix,
            price: entry.price.clone(),
            price_source: entry.source.clone(),
            endpoints,
        })
    }

    /// A route's `endpoints`: names it knows, at least one; all when unset.
    fn endpoints(
        &self,
        rkey: &str,
        raw: Option<Vec<String>>,
    ) -> Result<Vec<Endpoint>, ConfigError> {
        let Some(names) = raw else {
            return Ok(Endpoint::ALL.to_vec());
        };
        let key = format!("{rkey}.endpoints");
        if names.is_empty() {
            return Err(self.err(key, "needs at least one endpoint (leave it out for all)"));
        }
        names
            .iter()
            .map(|name| {
                Endpoint::parse(name).ok_or_else(|| {
                    self.err(
                        &key,
                        format!("unknown endpoint {name:?} (generations, edits or variations)"),
                    )
                })
            })
            .collect()
    }

    /// `routes` is how many routes the model has: the default number of attempts.
    fn failover(
        &self,
        key: &str,
        raw: RawFailover,
        routes: usize,
    ) -> Result<Failover, ConfigError> {
        let max_attempts =
            NonZeroUsize::new(raw.max_attempts.unwrap_or(routes)).ok_or_else(|| {
                self.err(format!("{key}.failover.max_attempts"), "must be at least 1")
            })?;
        if let Some(bad) = raw.on_status.iter().find(|s| !(400..=599).contains(*s)) {
            return Err(self.err(
                format!("{key}.failover.on_status"),
                format!("{bad} is not an error status"),
            ));
        }
        Ok(Failover {
            on_status: raw.on_status,
            max_attempts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_sets_defaults_forces_and_drops() {
        let policy = ParamPolicy {
            defaults: serde_json::from_str(r#"{"quality":"standard","size":"1024x1024"}"#)
                .expect("json"),
            force: serde_json::from_str(r#"{"n":1}"#).expect("json"),
            drop: vec!["input_fidelity".into()],
        };
        let mut body: Map<String, Value> = serde_json::from_str(
            r#"{"prompt":"p","quality":null,"size":"auto","n":3,"input_fidelity":"high"}"#,
        )
        .expect("json");
        policy.apply(&mut body);
        assert_eq!(
            Value::Object(body).to_string(),
            r#"{"prompt":"p","quality":"standard","size":"auto","n":1}"#
        );
    }
}
