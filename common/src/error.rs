//! The OpenAI error body every client library understands:
//! `{"error":{"message":..,"type":..,"param":null,"code":..}}`.
//!
//! [`ErrorKind`] is the closed list of errors tollgate answers with; each kind fixes the HTTP
//! status, the OpenAI `type` and `code`, and a low-cardinality label for metrics. Messages are
//! written by the gateway and never contain a key, a token or a backend credential.

use http::StatusCode;
use serde::Serialize;

/// Every error a client can receive from tollgate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The body is not JSON, or a required field is missing or of the wrong type.
    InvalidRequest,
    /// No credential, or one that matches no consumer.
    InvalidApiKey,
    /// The consumer may not use this model.
    ModelNotAllowed,
    /// The consumer exists but is switched off.
    ConsumerDisabled,
    /// The consumer's period quota is spent.
    QuotaExceeded,
    /// The consumer's or its team's budget in money is spent.
    BudgetExceeded,
    /// No backend serves this model.
    ModelNotFound,
    /// Unknown route.
    NotFound,
    /// Method not allowed on a known route.
    MethodNotAllowed,
    /// The body is larger than `server.max_body_bytes`.
    BodyTooLarge,
    /// The body did not arrive within `server.body_timeout_ms`.
    RequestTimeout,
    /// The per-minute token bucket is empty.
    RateLimited,
    /// A backend answered with something unusable, or the connection failed.
    BadGateway,
    /// No backend is available (all circuits open), or the store refuses under `fail_closed`.
    Unavailable,
    /// The backend did not answer in time.
    GatewayTimeout,
    /// A bug or an impossible state on our side.
    Internal,
}

impl ErrorKind {
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorKind::InvalidApiKey => StatusCode::UNAUTHORIZED,
            ErrorKind::ModelNotAllowed
            | ErrorKind::ConsumerDisabled
            | ErrorKind::QuotaExceeded
            | ErrorKind::BudgetExceeded => StatusCode::FORBIDDEN,
            ErrorKind::ModelNotFound | ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorKind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::BadGateway => StatusCode::BAD_GATEWAY,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OpenAI `error.type`.
    pub fn error_type(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest
            | ErrorKind::ModelNotFound
            | ErrorKind::NotFound
            | ErrorKind::MethodNotAllowed
            | ErrorKind::BodyTooLarge
            | ErrorKind::RequestTimeout => "invalid_request_error",
            ErrorKind::InvalidApiKey => "authentication_error",
            ErrorKind::ModelNotAllowed | ErrorKind::ConsumerDisabled => "permission_error",
            ErrorKind::QuotaExceeded | ErrorKind::BudgetExceeded => "insufficient_quota",
            ErrorKind::RateLimited => "rate_limit_error",
            ErrorKind::BadGateway | ErrorKind::Unavailable | ErrorKind::GatewayTimeout => {
                "api_error"
            }
            ErrorKind::Internal => "server_error",
        }
    }

    /// The OpenAI `error.code`, also the metric label.
    pub fn code(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest => "invalid_request_error",
            ErrorKind::InvalidApiKey => "invalid_api_key",
            ErrorKind::ModelNotAllowed => "model_not_allowed",
            ErrorKind::ConsumerDisabled => "consumer_disabled",
            ErrorKind::QuotaExceeded => "quota_exceeded",
            ErrorKind::BudgetExceeded => "budget_exceeded",
            ErrorKind::ModelNotFound => "model_not_found",
            ErrorKind::NotFound => "not_found",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::BodyTooLarge => "request_too_large",
            ErrorKind::RequestTimeout => "request_timeout",
            ErrorKind::RateLimited => "rate_limit_exceeded",
            ErrorKind::BadGateway => "bad_gateway",
            ErrorKind::Unavailable => "service_unavailable",
            ErrorKind::GatewayTimeout => "gateway_timeout",
            ErrorKind::Internal => "internal_error",
        }
    }
}

/// An error on its way to a client: a kind, a message, and optionally how long to wait.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    /// The offending request field, when there is one (OpenAI `param`).
    pub param: Option<&'static str>,
    /// For 429 and 503: when the client may try again.
    pub retry_after_ms: Option<u64>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
            param: None,
            retry_after_ms: None,
        }
    }

    pub fn with_param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    pub fn with_retry_after_ms(mut self, ms: u64) -> Self {
        self.retry_after_ms = Some(ms);
        self
    }

    /// The JSON body.
    pub fn body(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Inner<'a> {
            message: &'a str,
            #[serde(rename = "type")]
            kind: &'a str,
            param: Option<&'a str>,
            code: &'a str,
        }
        #[derive(Serialize)]
        struct Outer<'a> {
            error: Inner<'a>,
        }
        serde_json::to_vec(&Outer {
            error: Inner {
                message: &self.message,
                kind: self.kind.error_type(),
                param: self.param,
                code: self.kind.code(),
            },
        })
        .unwrap_or_else(|_| b"{\"error\":{\"message\":\"internal error\"}}".to_vec())
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.kind.status(),
            self.kind.code(),
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The body has exactly the OpenAI shape, `param` null unless set.
    #[test]
    fn body_is_openai_shaped() {
        let e = ApiError::new(ErrorKind::RateLimited, "slow down");
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error":{"message":"slow down","type":"rate_limit_error",
                "param":null,"code":"rate_limit_exceeded"}})
        );
        assert_eq!(e.kind.status(), 429);
    }
}
