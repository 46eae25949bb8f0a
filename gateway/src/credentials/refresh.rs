//! The refresh task of a token provider: fetches a token (OAuth2 client credentials or a
//! managed identity), schedules the next fetch shortly before it expires, backs off after
//! failures while the valid token keeps serving, and fetches at once when a backend refused
//! the token.

use http::HeaderValue;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tollgate_common::Secret;

use super::provider::{Timing, Token, TokenSource};

/// The state of the one refresh task of a backend.
pub(super) struct Refresher {
    pub(super) backend: Arc<str>,
    pub(super) source: Arc<TokenSource>,
    pub(super) timing: Timing,
    pub(super) tx: watch::Sender<Option<Token>>,
    pub(super) forced: Arc<Notify>,
    pub(super) client: reqwest::Client,
}

/// A token endpoint's answer; `expires_in`/`expires_on` come as numbers or as strings (IMDS).
#[derive(Deserialize)]
pub(super) struct TokenResponse {
    #[serde(deserialize_with = "secret")]
    pub(super) access_token: Secret,
    #[serde(default)]
    pub(super) expires_in: Option<NumOrString>,
    #[serde(default)]
    pub(super) expires_on: Option<NumOrString>,
}

fn secret<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
    String::deserialize(d).map(Secret::new)
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum NumOrString {
    Num(f64),
    Str(String),
}

impl NumOrString {
    pub(super) fn secs(&self) -> Option<f64> {
        match self {
            NumOrString::Num(n) => Some(*n),
            NumOrString::Str(s) => s.trim().parse().ok(),
        }
        .filter(|n: &f64| n.is_finite())
    }
}

/// Lifetime assumed when a token endpoint does not say.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);

/// Why a fetch failed, without any detail a token endpoint could have echoed back.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("token endpoint unreachable")]
    Transport,
    #[error("token endpoint answered {0}")]
    Status(u16),
    #[error("token endpoint answer is not a token")]
    Body,
}

impl Refresher {
    pub(super) async fn run(self) {
        let mut backoff = self.timing.backoff;
        loop {
            let fetched_at = Instant::now();
            let sleep = match self.fetch().await {
                Ok((token, lifetime)) => {
                    backoff = self.timing.backoff;
                    let (refresh_in, usable_for) = schedule(lifetime, &self.timing);
                    let header = bearer(&token);
                    drop(token);
                    match header {
                        Some(header) => {
                            let usable_until = Instant::now() + usable_for;
                            self.tx.send_replace(Some(Token {
                                header,
                                usable_until,
                            }));
                            tracing::debug!(backend = %self.backend, ?lifetime, "backend token refreshed");
                            refresh_in
                        }
                        None => {
                            tracing::warn!(backend = %self.backend, "backend token is not a valid header value");
                            next_backoff(&mut backoff, &self.timing)
                        }
                    }
                }
                Err(e) => {
                    let serving = self
                        .tx
                        .borrow()
                        .as_ref()
                        .is_some_and(|t| Instant::now() < t.usable_until);
                    tracing::warn!(backend = %self.backend, error = %e, still_serving = serving,
                        "backend token refresh failed; retrying");
                    next_backoff(&mut backoff, &self.timing)
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = self.forced.notified() => {
                    tokio::time::sleep_until(fetched_at + self.timing.min_interval).await;
                }
            }
        }
    }

    async fn fetch(&self) -> Result<(Secret, Duration), FetchError> {
        let req = match &*self.source {
            TokenSource::Oauth2 {
                token_url,
                client_id,
                client_secret,
                scope,
            } => {
                let mut form: Vec<(&str, &str)> = vec![
                    ("grant_type", "client_credentials"),
                    ("client_id", client_id),
                    ("client_secret", client_secret.expose()),
                ];
                if let Some(s) = scope {
                    form.push(("scope", s));
                }
                self.client.post(token_url).form(&form)
            }
            TokenSource::ManagedIdentity {
                endpoint,
                resource,
                client_id,
            } => {
                let mut query: Vec<(&str, &str)> =
                    vec![("api-version", "2018-02-01"), ("resource", resource)];
                if let Some(id) = client_id {
                    query.push(("client_id", id));
                }
                self.client
                    .get(endpoint)
                    .query(&query)
                    .header("Metadata", "true")
            }
        };
        let resp = req.send().await.map_err(|_| FetchError::Transport)?;
        if !resp.status().is_success() {
            return Err(FetchError::Status(resp.status().as_u16()));
        }
        let body = resp.bytes().await.map_err(|_| FetchError::Transport)?;
        let t: TokenResponse = serde_json::from_slice(&body).map_err(|_| FetchError::Body)?;
        if t.access_token.is_empty() {
            return Err(FetchError::Body);
        }
        let now_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let secs = t
            .expires_in
            .as_ref()
            .and_then(NumOrString::secs)
            .or_else(|| {
                t.expires_on
                    .as_ref()
                    .and_then(NumOrString::secs)
                    .map(|on| on - now_unix)
            });
        let lifetime = match secs {
            Some(s) if s > 0.0 => Duration::from_secs_f64(s.min(86_400.0 * 7.0)),
            Some(_) => Duration::ZERO,
            None => DEFAULT_LIFETIME,
        };
        Ok((t.access_token, lifetime))
    }
}

/// `Bearer <token>` as a sensitive header value.
pub(super) fn bearer(token: &Secret) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(&format!("Bearer {}", token.expose())).ok()?;
    v.set_sensitive(true);
    Some(v)
}

/// For a token of `lifetime`: when to refresh it and how long to send it.
pub(super) fn schedule(lifetime: Duration, t: &Timing) -> (Duration, Duration) {
    let margin = lifetime
        .mul_f64(t.margin_fraction.clamp(0.0, 1.0))
        .min(t.max_margin);
    let refresh_in = lifetime.saturating_sub(margin).max(t.min_interval);
    let usable_for = lifetime.saturating_sub(t.stop_serving.min(lifetime / 20));
    (refresh_in, usable_for)
}

pub(super) fn next_backoff(backoff: &mut Duration, t: &Timing) -> Duration {
    let now = *backoff;
    *backoff = (*backoff * 2).min(t.max_backoff);
    now
}
