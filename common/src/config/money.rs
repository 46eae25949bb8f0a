//! `[pricing]`, `[[teams]]` and `[[alerts]]`: money. Budgets per team and per consumer (a
//! consumer's own budget fields live in [`ConsumerConfig`](super::ConsumerConfig)), and the
//! webhooks told before (and when) budgets, quotas or backends run out.

use super::{Config, ConfigError, valid_name_char};
use crate::secret::Secret;
use crate::types::{BudgetAction, Period};
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PricingConfig {
    /// The currency of every `price` and `budget` (shown in headers, errors, alerts, reports).
    pub currency: String,
}

impl Default for PricingConfig {
    fn default() -> Self {
        PricingConfig {
            currency: "USD".into(),
        }
    }
}

/// A team: seeded into the store (`tg:team:{id}`) when absent; the store wins afterwards.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeamConfig {
    pub id: String,
    /// Money per `budget_period` shared by all the team's consumers; none = no team budget.
    #[serde(default)]
    pub budget: Option<f64>,
    #[serde(default)]
    pub budget_period: Period,
    #[serde(default)]
    pub budget_action: BudgetAction,
}

/// What an alert watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertEvent {
    /// A team's or consumer's budget crossed a threshold.
    Budget,
    /// A consumer's token quota crossed a threshold.
    Quota,
    /// A backend's circuit opened (a PTU saturated: traffic fails over).
    Circuit,
    /// A replica lost the store and runs under `store.on_error`.
    Store,
}

impl AlertEvent {
    pub const ALL: [AlertEvent; 4] = [
        AlertEvent::Budget,
        AlertEvent::Quota,
        AlertEvent::Circuit,
        AlertEvent::Store,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            AlertEvent::Budget => "budget",
            AlertEvent::Quota => "quota",
            AlertEvent::Circuit => "circuit",
            AlertEvent::Store => "store",
        }
    }
}

/// A webhook told when budgets or quotas cross thresholds, a circuit opens or the store fails.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertConfig {
    /// The webhook URL (a secret: it usually carries its token). Or `url_env`.
    #[serde(default)]
    pub url: Option<Secret>,
    /// An environment variable holding the URL.
    #[serde(default)]
    pub url_env: Option<String>,
    /// Only budgets and quotas of these teams (empty = every team).
    #[serde(default)]
    pub teams: Vec<String>,
    /// Only budgets and quotas of these consumers (empty = every consumer).
    #[serde(default)]
    pub consumers: Vec<String>,
    /// Fractions of a budget or quota at which to fire, each once per window.
    #[serde(default = "default_thresholds")]
    pub thresholds: Vec<f64>,
    /// What to watch; default all of them.
    #[serde(default = "all_events")]
    pub events: Vec<AlertEvent>,
    /// One delivery attempt's deadline.
    #[serde(default = "default_alert_timeout")]
    pub timeout_ms: u64,
    /// Attempts after the first (with 1 s, 2 s, 4 s ... between them).
    #[serde(default = "default_retries")]
    pub retries: u32,
}

fn default_thresholds() -> Vec<f64> {
    vec![0.5, 0.8, 1.0]
}

fn all_events() -> Vec<AlertEvent> {
    AlertEvent::ALL.to_vec()
}

fn default_alert_timeout() -> u64 {
    5_000
}

fn default_retries() -> u32 {
    3
}

/// Checks a budget's amount and period, naming the key at fault.
fn check_budget(
    at: &dyn Fn(&str) -> String,
    budget: Option<f64>,
    period: Period,
) -> Result<(), ConfigError> {
    if let Some(b) = budget
        && (!b.is_finite() || b < 0.0)
    {
        return Err(ConfigError::new(
            at("budget"),
            "must be a finite amount >= 0",
        ));
    }
    if budget.is_some() && period == Period::Hour {
        return Err(ConfigError::new(
            at("budget_period"),
            "budgets are per day, week or month",
        ));
    }
    Ok(())
}

impl Config {
    /// The checks of `[pricing]`, `[[teams]]`, consumers' budgets and `[[alerts]]`.
    pub(super) fn validate_money(&self) -> Result<(), ConfigError> {
        let c = &self.pricing.currency;
        if c.is_empty() || c.len() > 8 || !c.chars().all(|ch| ch.is_ascii_alphanumeric()) {
            return Err(ConfigError::new(
                "pricing.currency",
                "expected a currency code such as EUR or USD",
            ));
        }
        let mut ids = std::collections::HashSet::new();
        for (i, t) in self.teams.iter().enumerate() {
            let at = |k: &str| format!("teams[{i}].{k}");
            if t.id.is_empty() || !t.id.chars().all(valid_name_char) {
                return Err(ConfigError::new(
                    at("id"),
                    "use letters, digits, '-', '_', '.'",
                ));
            }
            if !ids.insert(t.id.as_str()) {
                return Err(ConfigError::new(
                    at("id"),
                    format!("duplicate team {:?}", t.id),
                ));
            }
            check_budget(&at, t.budget, t.budget_period)?;
        }
        for (i, c) in self.consumers.iter().enumerate() {
            let at = |k: &str| format!("consumers[{i}].{k}");
            check_budget(&at, c.budget, c.budget_period)?;
        }
        for (i, a) in self.alerts.iter().enumerate() {
            let at = |k: &str| format!("alerts[{i}].{k}");
            match (&a.url, &a.url_env) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(ConfigError::new(
                        at("url"),
                        "set exactly one of url, url_env",
                    ));
                }
                // The URL itself never goes into an error message: it is a secret.
                (Some(u), None)
                    if !(u.expose().starts_with("http://")
                        || u.expose().starts_with("https://")) =>
                {
                    return Err(ConfigError::new(at("url"), "expected an http(s):// URL"));
                }
                _ => {}
            }
            if a.thresholds.is_empty()
                || a.thresholds
                    .iter()
                    .any(|t| !t.is_finite() || *t <= 0.0 || *t > 10.0)
            {
                return Err(ConfigError::new(
                    at("thresholds"),
                    "list fractions within (0, 10], e.g. [0.5, 0.8, 1.0]",
                ));
            }
            if a.events.is_empty() {
                return Err(ConfigError::new(at("events"), "list at least one event"));
            }
            if a.timeout_ms == 0 {
                return Err(ConfigError::new(at("timeout_ms"), "must be > 0"));
            }
            if a.retries > 10 {
                return Err(ConfigError::new(at("retries"), "at most 10"));
            }
        }
        Ok(())
    }
}
