//! Token usage, quota periods and key hashing: the vocabulary of accounting.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Tokens used by one request, as the backend reported them or as the gateway counted them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUsage {
    pub input: u64,
    pub output: u64,
    /// Prompt tokens served from the backend's prompt cache (a subset of `input`).
    pub cached_input: u64,
}

impl TokenUsage {
    pub fn total(&self) -> u64 {
        self.input.saturating_add(self.output)
    }
}

/// A fixed UTC window for a period quota.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Hour,
    Day,
    Week,
    #[default]
    Month,
}

impl Period {
    pub fn as_str(&self) -> &'static str {
        match self {
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }

    pub fn parse(s: &str) -> Option<Period> {
        match s {
            "hour" => Some(Period::Hour),
            "day" => Some(Period::Day),
            "week" => Some(Period::Week),
            "month" => Some(Period::Month),
            _ => None,
        }
    }
}

/// What an exhausted budget does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetAction {
    /// Refuse requests that would spend past it (403 `budget_exceeded`).
    #[default]
    Block,
    /// Count and alert, never refuse.
    Alert,
}

impl BudgetAction {
    pub fn as_str(&self) -> &'static str {
        match self {
            BudgetAction::Block => "block",
            BudgetAction::Alert => "alert",
        }
    }

    pub fn parse(s: &str) -> Option<BudgetAction> {
        match s {
            "block" => Some(BudgetAction::Block),
            "alert" => Some(BudgetAction::Alert),
            _ => None,
        }
    }
}

/// The lowercase hex SHA-256 of a subscription key: the only form in which keys are stored.
pub fn key_hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key hash is the standard SHA-256 hex digest (operators compute it with sha256sum).
    #[test]
    fn key_hash_is_sha256_hex() {
        assert_eq!(
            key_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
