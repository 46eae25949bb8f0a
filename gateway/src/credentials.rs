//! Backend credentials that are tokens, not static keys: an OAuth2 client-credentials grant
//! (`oauth2_client_credentials`) or an Azure managed identity from an IMDS-style endpoint
//! (`azure_managed_identity`). No application ever holds these; the gateway injects them as
//! `Authorization: Bearer <token>`.
//!
//! Each backend has one [`TokenProvider`] with one background task that fetches the first token
//! at start-up and refreshes it shortly before it expires, for all requests at once. Requests
//! read the current token without waiting; only before the very first token arrives (or after
//! the last one expired) do they wait, and for a bounded time. A failed refresh is retried with
//! backoff while the still-valid token keeps serving. A backend that refuses a token (401) makes
//! the provider drop it and fetch a new one at once ([`TokenProvider::rejected`]). Token
//! endpoints' redirects are never followed: the client secret goes only where configured. The
//! client secret lives in a [`Secret`]; tokens sit in sensitive header values; neither is ever
//! logged.

use crate::error::Error;
use http::HeaderValue;
use serde::Deserialize;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tollgate_common::Secret;

/// Where a backend's token comes from.
pub enum TokenSource {
    /// `POST token_url` with `grant_type=client_credentials` (Entra ID, any OAuth2 server).
    Oauth2 {
        token_url: String,
        client_id: String,
        client_secret: Secret,
        scope: Option<String>,
    },
    /// `GET endpoint?api-version=2018-02-01&resource=..[&client_id=..]` with `Metadata: true`.
    ManagedIdentity {
        endpoint: String,
        resource: String,
        client_id: Option<String>,
    },
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Oauth2 {
                token_url,
                client_id,
                scope,
                ..
            } => f
                .debug_struct("Oauth2")
                .field("token_url", token_url)
                .field("client_id", client_id)
                .field("client_secret", &"***")
                .field("scope", scope)
                .finish(),
            TokenSource::ManagedIdentity {
                endpoint,
                resource,
                client_id,
            } => f
                .debug_struct("ManagedIdentity")
                .field("endpoint", endpoint)
                .field("resource", resource)
                .field("client_id", client_id)
                .finish(),
        }
    }
}

/// When to refresh and how hard to retry. [`Timing::default`] is what the gateway uses; tests
/// shorten it.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Refresh this fraction of the lifetime before expiry ...
    pub margin_fraction: f64,
    /// ... but never earlier than this before expiry.
    pub max_margin: Duration,
    /// A token is not sent once it is this close to expiry (capped at 1/20 of its lifetime).
    pub stop_serving: Duration,
    /// Shortest wait between two fetches that succeed.
    pub min_interval: Duration,
    /// First retry delay after a failed fetch; doubles up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// How long a request waits for a token when none is valid.
    pub wait_first: Duration,
    /// Timeout of one call to the token endpoint.
    pub fetch_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            margin_fraction: 0.1,
            max_margin: Duration::from_secs(300),
            stop_serving: Duration::from_secs(30),
            min_interval: Duration::from_secs(1),
            backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            wait_first: Duration::from_secs(5),
            fetch_timeout: Duration::from_secs(10),
        }
    }
}

/// A token ready to put on a request.
#[derive(Clone)]
struct Token {
    /// `Bearer <token>`, marked sensitive.
    header: HeaderValue,
    /// Sent until then; after that requests wait for the next one.
    usable_until: Instant,
}

/// One backend's token, kept fresh by one background task.
pub struct TokenProvider {
    backend: Arc<str>,
    source: Arc<TokenSource>,
    timing: Timing,
    current: watch::Sender<Option<Token>>,
    /// Wakes the refresh task early: a backend refused the current token.
    forced: Arc<Notify>,
    /// The refresh task; aborted when the provider is dropped (the gateway shut down).
    task: parking_lot::Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for TokenProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenProvider")
            .field("backend", &self.backend)
            .field("source", &self.source)
            .finish()
    }
}

impl Drop for TokenProvider {
    fn drop(&mut self) {
        if let Some(t) = self.task.lock().take() {
            t.abort();
        }
    }
}

impl TokenProvider {
    pub fn new(backend: &str, source: TokenSource, timing: Timing) -> Self {
        TokenProvider {
            backend: Arc::from(backend),
            source: Arc::new(source),
            timing,
            current: watch::channel(None).0,
            forced: Arc::new(Notify::new()),
            task: parking_lot::Mutex::new(None),
        }
    }

    /// Starts the refresh task (once; later calls do nothing). Needs a Tokio runtime.
    pub fn start(&self) -> anyhow::Result<()> {
        let mut task = self.task.lock();
        if task.is_some() {
            return Ok(());
        }
        let client = reqwest::Client::builder()
            .timeout(self.timing.fetch_timeout)
            .connect_timeout(self.timing.fetch_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let refresher = Refresher {
            backend: self.backend.clone(),
            source: self.source.clone(),
            timing: self.timing,
            tx: self.current.clone(),
            forced: self.forced.clone(),
            client,
        };
        *task = Some(tokio::spawn(refresher.run()));
        Ok(())
    }

    /// The `Authorization` value to send now. Waits (bounded) only when no valid token exists.
    pub async fn header(&self) -> Result<HeaderValue, Error> {
        if let Some(t) = self.current.borrow().as_ref()
            && Instant::now() < t.usable_until
        {
            return Ok(t.header.clone());
        }
        let mut rx = self.current.subscribe();
        let wait = rx.wait_for(|t| t.as_ref().is_some_and(|t| Instant::now() < t.usable_until));
        match tokio::time::timeout(self.timing.wait_first, wait).await {
            Ok(Ok(t)) => t
                .as_ref()
                .map(|t| t.header.clone())
                .ok_or_else(|| self.unavailable()),
            _ => Err(self.unavailable()),
        }
    }

    /// A backend answered 401 to a request carrying `sent`: unless a newer token has already
    /// replaced it, stop sending it and fetch a new one now (at most one fetch per refused
    /// token, and never sooner than `min_interval` after the last fetch).
    pub fn rejected(&self, sent: &HeaderValue) {
        let stale = self.current.send_if_modified(|t| match t {
            Some(t) if t.header == *sent && Instant::now() < t.usable_until => {
                t.usable_until = Instant::now();
                true
            }
            _ => false,
        });
        if stale {
            tracing::warn!(backend = %self.backend, "backend refused its token; fetching a new one");
            self.forced.notify_one();
        }
    }

    /// Calls `f` with each secret this provider holds (the client secret, the current token),
    /// for scrubbing from what a backend sends back; nothing is copied.
    pub fn each_secret(&self, f: &mut dyn FnMut(&[u8])) {
        if let TokenSource::Oauth2 { client_secret, .. } = &*self.source {
            f(client_secret.expose().as_bytes());
        }
        if let Some(t) = self.current.borrow().as_ref() {
            let h = t.header.as_bytes();
            f(h.strip_prefix(b"Bearer ").unwrap_or(h));
        }
    }

    fn unavailable(&self) -> Error {
        Error::Upstream(format!("{}: no valid backend credential", self.backend))
    }
}

/// The state of the one refresh task of a backend.
struct Refresher {
    backend: Arc<str>,
    source: Arc<TokenSource>,
    timing: Timing,
    tx: watch::Sender<Option<Token>>,
    forced: Arc<Notify>,
    client: reqwest::Client,
}

/// A token endpoint's answer; `expires_in`/`expires_on` come as numbers or as strings (IMDS).
#[derive(Deserialize)]
struct TokenResponse {
    #[serde(deserialize_with = "secret")]
    access_token: Secret,
    #[serde(default)]
    expires_in: Option<NumOrString>,
    #[serde(default)]
    expires_on: Option<NumOrString>,
}

fn secret<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
    String::deserialize(d).map(Secret::new)
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrString {
    Num(f64),
    Str(String),
}

impl NumOrString {
    fn secs(&self) -> Option<f64> {
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
    async fn run(self) {
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
fn bearer(token: &Secret) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(&format!("Bearer {}", token.expose())).ok()?;
    v.set_sensitive(true);
    Some(v)
}

/// For a token of `lifetime`: when to refresh it and how long to send it.
fn schedule(lifetime: Duration, t: &Timing) -> (Duration, Duration) {
    let margin = lifetime
        .mul_f64(t.margin_fraction.clamp(0.0, 1.0))
        .min(t.max_margin);
    let refresh_in = lifetime.saturating_sub(margin).max(t.min_interval);
    let usable_for = lifetime.saturating_sub(t.stop_serving.min(lifetime / 20));
    (refresh_in, usable_for)
}

fn next_backoff(backoff: &mut Duration, t: &Timing) -> Duration {
    let now = *backoff;
    *backoff = (*backoff * 2).min(t.max_backoff);
    now
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// An hour-long token is refreshed 5 minutes early; a short one at 90% of its life; a token
    /// is sent until just before it expires.
    #[test]
    fn refresh_schedule() {
        let t = Timing::default();
        let (r, u) = schedule(Duration::from_secs(3600), &t);
        assert_eq!(r, Duration::from_secs(3300));
        assert_eq!(u, Duration::from_secs(3570));
        let (r, u) = schedule(Duration::from_secs(10), &t);
        assert_eq!(r, Duration::from_secs(9));
        assert_eq!(u, Duration::from_millis(9500));
        let (r, _) = schedule(Duration::ZERO, &t);
        assert_eq!(
            r, t.min_interval,
            "an instantly expiring token never makes a busy loop"
        );
    }

    /// Token answers in the shapes OAuth2 servers and IMDS use; the token never prints.
    #[test]
    fn parses_token_answers() {
        let t: TokenResponse = serde_json::from_str(
            r#"{"access_token":"abc","expires_in":"3599","token_type":"Bearer"}"#,
        )
        .unwrap();
        assert_eq!(t.expires_in.unwrap().secs(), Some(3599.0));
        assert_eq!(format!("{:?}", t.access_token), "***");
        let t: TokenResponse =
            serde_json::from_str(r#"{"access_token":"abc","expires_on":1700000000}"#).unwrap();
        assert_eq!(t.expires_on.unwrap().secs(), Some(1.7e9));
        let s = TokenSource::Oauth2 {
            token_url: "http://x".into(),
            client_id: "id".into(),
            client_secret: Secret::new("hunter2"),
            scope: None,
        };
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    /// A refresh that fails is retried with backoff while the still-valid token keeps serving
    /// without waiting; the next good answer replaces it.
    #[tokio::test]
    async fn failed_refresh_keeps_serving_the_valid_token() {
        let calls = Arc::new(AtomicU64::new(0));
        let failing = Arc::new(AtomicBool::new(false));
        let (c, f) = (calls.clone(), failing.clone());
        let app = axum::Router::new().route(
            "/token",
            axum::routing::post(move || {
                let (c, f) = (c.clone(), f.clone());
                async move {
                    let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                    if f.load(Ordering::SeqCst) {
                        return (http::StatusCode::SERVICE_UNAVAILABLE, String::new());
                    }
                    (
                        http::StatusCode::OK,
                        format!(r#"{{"access_token":"tok-{n}","expires_in":4}}"#),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let timing = Timing {
            margin_fraction: 0.5,
            min_interval: Duration::from_millis(100),
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(200),
            ..Timing::default()
        };
        let source = TokenSource::Oauth2 {
            token_url: format!("http://{addr}/token"),
            client_id: "id".into(),
            client_secret: Secret::new("s"),
            scope: None,
        };
        let p = TokenProvider::new("b", source, timing);
        p.start().unwrap();
        assert_eq!(p.header().await.unwrap(), "Bearer tok-1");
        failing.store(true, Ordering::SeqCst);
        // Refresh is due at 2 s (half of 4 s); it fails and is retried every 100-200 ms.
        tokio::time::sleep(Duration::from_millis(2800)).await;
        assert!(
            calls.load(Ordering::SeqCst) >= 3,
            "refresh retried: {calls:?}"
        );
        let started = std::time::Instant::now();
        assert_eq!(p.header().await.unwrap(), "Bearer tok-1");
        assert!(
            started.elapsed() < Duration::from_millis(50),
            "a valid token is served without waiting"
        );
        failing.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let h = p.header().await.unwrap();
        assert_ne!(h, "Bearer tok-1");
        assert!(h.is_sensitive());
    }

    /// A token a backend refused is no longer sent and a new one is fetched at once; the same
    /// refusal reported again (by requests that carried the old token) fetches nothing more.
    #[tokio::test]
    async fn refused_token_is_replaced_once() {
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        let app = axum::Router::new().route(
            "/token",
            axum::routing::post(move || {
                let c = c.clone();
                async move {
                    let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                    format!(r#"{{"access_token":"tok-{n}","expires_in":3600}}"#)
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let timing = Timing {
            min_interval: Duration::from_millis(50),
            ..Timing::default()
        };
        let source = TokenSource::Oauth2 {
            token_url: format!("http://{addr}/token"),
            client_id: "id".into(),
            client_secret: Secret::new("client-secret-x"),
            scope: None,
        };
        let p = TokenProvider::new("b", source, timing);
        p.start().unwrap();
        let first = p.header().await.unwrap();
        assert_eq!(first, "Bearer tok-1");
        let mut held = Vec::new();
        p.each_secret(&mut |s| held.push(String::from_utf8_lossy(s).to_string()));
        assert_eq!(held, vec!["client-secret-x", "tok-1"]);
        p.rejected(&first);
        let second = p.header().await.unwrap();
        assert_eq!(second, "Bearer tok-2");
        p.rejected(&first);
        assert_eq!(p.header().await.unwrap(), "Bearer tok-2");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
