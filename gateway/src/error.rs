//! The gateway's errors and the one place that turns them into HTTP responses.
//!
//! Each variant says whose fault it is ([`Fault`]) so failover and metrics can tell a client's
//! mistake from a backend's; [`Error::to_api`] maps every variant, exhaustively, to a status, an
//! OpenAI error body and a metric label. Messages never contain keys, tokens or credentials.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, header};
use tollgate_common::{ApiError, ErrorKind};

/// Where the fault lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The client sent something wrong, or is not allowed.
    Downstream,
    /// A backend failed or no backend could serve.
    Upstream,
    /// Our own state (the store, a bug).
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<&'static str>,
    },
    #[error("invalid or missing API key")]
    Unauthenticated,
    #[error("this consumer may not use model {0:?}")]
    ModelNotAllowed(String),
    #[error("this consumer is disabled")]
    ConsumerDisabled,
    #[error("the token quota for this period is spent")]
    QuotaExceeded { retry_after_ms: u64 },
    /// A consumer's or team's budget in money lacks this request's estimated cost.
    #[error("the {scope} budget of {limit:.2} {currency} per {period} is spent{}", renews(.retry_after_ms))]
    BudgetExceeded {
        scope: &'static str,
        /// The consumer's or the team's id (for alerts; not in the message).
        id: String,
        limit: f64,
        currency: std::sync::Arc<str>,
        period: &'static str,
        retry_after_ms: u64,
    },
    #[error("token rate limit exceeded")]
    RateLimited { retry_after_ms: u64 },
    #[error("the model {0:?} does not exist or no backend serves it")]
    ModelNotFound(String),
    #[error("no such route")]
    RouteNotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("request body is larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("the request body did not arrive in time")]
    BodyTimeout,
    #[error("no backend is available for this model; retry later")]
    NoBackend { retry_after_ms: Option<u64> },
    #[error("the backend failed: {0}")]
    Upstream(String),
    /// A backend's answer is larger than `server.max_response_bytes` (any backend would send
    /// the same answer: no failover).
    #[error("the backend's response is larger than the gateway allows ({0})")]
    ResponseTooLarge(String),
    #[error("the backend did not answer in time")]
    UpstreamTimeout,
    #[error("the limits store is unavailable")]
    StoreUnavailable,
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Error::BadRequest {
            message: message.into(),
            param: None,
        }
    }

    pub fn fault(&self) -> Fault {
        match self {
            Error::BadRequest { .. }
            | Error::Unauthenticated
            | Error::ModelNotAllowed(_)
            | Error::ConsumerDisabled
            | Error::QuotaExceeded { .. }
            | Error::BudgetExceeded { .. }
            | Error::RateLimited { .. }
            | Error::ModelNotFound(_)
            | Error::RouteNotFound
            | Error::MethodNotAllowed
            | Error::BodyTooLarge { .. }
            | Error::BodyTimeout => Fault::Downstream,
            Error::NoBackend { .. }
            | Error::Upstream(_)
            | Error::UpstreamTimeout
            | Error::ResponseTooLarge(_) => Fault::Upstream,
            Error::StoreUnavailable | Error::Internal(_) => Fault::Internal,
        }
    }

    /// Whether another backend may serve where this attempt failed: a backend's fault, unless
    /// the answer itself is unacceptable (any backend would give it). The client's faults and
    /// our own stop the failover loop.
    pub fn may_fail_over(&self) -> bool {
        self.fault() == Fault::Upstream && !matches!(self, Error::ResponseTooLarge(_))
    }

    /// The client-facing error: kind, message, param, retry hint.
    pub fn to_api(&self) -> ApiError {
        let kind = match self {
            Error::BadRequest { .. } => ErrorKind::InvalidRequest,
            Error::Unauthenticated => ErrorKind::InvalidApiKey,
            Error::ModelNotAllowed(_) => ErrorKind::ModelNotAllowed,
            Error::ConsumerDisabled => ErrorKind::ConsumerDisabled,
            Error::QuotaExceeded { .. } => ErrorKind::QuotaExceeded,
            Error::BudgetExceeded { .. } => ErrorKind::BudgetExceeded,
            Error::RateLimited { .. } => ErrorKind::RateLimited,
            Error::ModelNotFound(_) => ErrorKind::ModelNotFound,
            Error::RouteNotFound => ErrorKind::NotFound,
            Error::MethodNotAllowed => ErrorKind::MethodNotAllowed,
            Error::BodyTooLarge { .. } => ErrorKind::BodyTooLarge,
            Error::BodyTimeout => ErrorKind::RequestTimeout,
            Error::NoBackend { .. } | Error::StoreUnavailable => ErrorKind::Unavailable,
            Error::Upstream(_) => ErrorKind::BadGateway,
            Error::UpstreamTimeout => ErrorKind::GatewayTimeout,
            Error::ResponseTooLarge(_) => ErrorKind::BadGateway,
            Error::Internal(_) => ErrorKind::Internal,
        };
        let message = match self {
            // Internal detail stays in our logs.
            Error::Internal(_) => "internal error".to_string(),
            Error::Upstream(_) => "the backend failed to answer; retry later".to_string(),
            Error::ResponseTooLarge(_) => {
                "the backend's response is larger than the gateway allows".to_string()
            }
            other => other.to_string(),
        };
        let mut api = ApiError::new(kind, message);
        if let Error::BadRequest { param: Some(p), .. } = self {
            api = api.with_param(p);
        }
        match self {
            Error::QuotaExceeded { retry_after_ms }
            | Error::RateLimited { retry_after_ms }
            | Error::BudgetExceeded { retry_after_ms, .. } => {
                api.with_retry_after_ms(*retry_after_ms)
            }
            Error::NoBackend {
                retry_after_ms: Some(ms),
            } => api.with_retry_after_ms(*ms),
            Error::StoreUnavailable => api.with_retry_after_ms(1000),
            _ => api,
        }
    }
}

/// When a spent budget renews, for its message.
fn renews(retry_after_ms: &u64) -> String {
    let s = retry_after_ms / 1000;
    match s {
        0..=5_399 => format!("; it renews in {} minutes", s.div_ceil(60).max(1)),
        5_400..=172_799 => format!("; it renews in {} hours", s.div_ceil(3600)),
        _ => format!("; it renews in {} days", s.div_ceil(86_400)),
    }
}

/// Renders an [`ApiError`] as a response with `retry-after` / `retry-after-ms` when set.
pub fn api_response(api: &ApiError) -> Response {
    let mut resp = (api.kind.status(), api.body()).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(ms) = api.retry_after_ms {
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from(ms.div_ceil(1000).max(1)),
        );
        h.insert("retry-after-ms", HeaderValue::from(ms));
    }
    resp
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        if let Error::Internal(detail) = &self {
            tracing::error!(%detail, "internal error");
        }
        api_response(&self.to_api())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rate limits carry both retry headers, rounded up to whole seconds.
    #[test]
    fn retry_headers() {
        let r = Error::RateLimited {
            retry_after_ms: 1500,
        }
        .into_response();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "2");
        assert_eq!(r.headers()["retry-after-ms"], "1500");
    }

    /// A spent budget is a 403 `budget_exceeded` that says which budget, how much and when it
    /// renews, with `retry-after`.
    #[test]
    fn budget_exceeded() {
        let r = Error::BudgetExceeded {
            scope: "team",
            id: "finance".into(),
            limit: 500.0,
            currency: "EUR".into(),
            period: "month",
            retry_after_ms: 3 * 86_400_000,
        };
        let api = r.to_api();
        assert_eq!(api.kind.code(), "budget_exceeded");
        assert_eq!(
            api.message,
            "the team budget of 500.00 EUR per month is spent; it renews in 3 days"
        );
        let resp = r.into_response();
        assert_eq!(resp.status(), 403);
        assert_eq!(resp.headers()["retry-after"], "259200");
    }

    /// Internal detail never reaches the client.
    #[test]
    fn internal_detail_hidden() {
        let api = Error::Internal("redis://:secret@host".into()).to_api();
        assert!(!api.message.contains("secret"));
        let api = Error::Upstream("connect to http://x?key=abc".into()).to_api();
        assert!(!api.message.contains("abc"));
    }
}
