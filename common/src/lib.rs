//! Types shared by every tollgate crate: the configuration schema (parsed with unknown keys
//! rejected and validated once at load), the OpenAI-style error body, secrets that never print,
//! and the token-usage and consumer types that the gateway, the store and the tests agree on.

#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod secret;
pub mod types;

pub use config::Config;
pub use error::{ApiError, ErrorKind};
pub use secret::Secret;
pub use types::{BudgetAction, Period, TokenUsage, key_hash};
