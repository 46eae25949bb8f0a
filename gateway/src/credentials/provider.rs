//! One backend's token provider: the current token, read by requests without waiting, and
//! the handle of the one task that keeps it fresh ([`super::refresh`]).

use crate::error::Error;
use http::HeaderValue;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tollgate_common::Secret;

use super::refresh::Refresher;

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
pub(super) struct Token {
    /// `Bearer <token>`, marked sensitive.
    pub(super) header: HeaderValue,
    /// Sent until then; after that requests wait for the next one.
    pub(super) usable_until: Instant,
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
