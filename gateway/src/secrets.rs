//! Every secret the gateway holds, so that none passes back to a client: a backend that echoes
//! a credential in an error body or a header must not hand it to the caller.
//!
//! [`Secrets`] collects the configured ones at start-up (backend API keys and bearer tokens,
//! OAuth2 client secrets, consumers' plain keys from `key_env`) and asks each token provider
//! for the token it holds now at the moment of scrubbing (tokens change as they are refreshed).
//! [`Secrets::scrub`] replaces every occurrence, raw or as a JSON string would escape it, with
//! `***`.

use crate::credentials::TokenProvider;
use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use tollgate_common::config::{BackendAuth, Config, secret_from_env};

/// What replaces a secret.
const MASK: &[u8] = b"***";

/// The secrets to scrub from anything a backend sends back.
#[derive(Default)]
pub struct Secrets {
    /// Fixed for the life of the process, each in every form it may appear in.
    fixed: Vec<Box<[u8]>>,
    /// Their current tokens are read at each scrub.
    providers: Vec<Arc<TokenProvider>>,
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secrets")
            .field("fixed", &self.fixed.len())
            .field("providers", &self.providers.len())
            .finish()
    }
}

impl Secrets {
    /// The configured secrets that are set in the environment (a missing one fails start-up
    /// elsewhere, naming its key), plus the token providers of token-based backends.
    pub fn from_config(config: &Config, providers: Vec<Arc<TokenProvider>>) -> Secrets {
        let mut plain = Vec::new();
        for b in &config.backends {
            let var = match &b.auth {
                BackendAuth::ApiKey { key_env, .. } => Some(key_env),
                BackendAuth::Bearer { token_env } => Some(token_env),
                BackendAuth::Oauth2ClientCredentials {
                    client_secret_env, ..
                } => Some(client_secret_env),
                BackendAuth::None | BackendAuth::AzureManagedIdentity { .. } => None,
            };
            plain.extend(var.and_then(|v| secret_from_env(v).ok()));
        }
        for c in &config.consumers {
            plain.extend(c.key_env.as_deref().and_then(|v| secret_from_env(v).ok()));
        }
        let mut s = Secrets {
            fixed: Vec::new(),
            providers,
        };
        for p in &plain {
            s.add(p.expose());
        }
        s
    }

    /// Adds `secret` in its raw form and as a JSON string escapes it.
    pub(crate) fn add(&mut self, secret: &str) {
        if secret.is_empty() {
            return;
        }
        let raw: Box<[u8]> = secret.as_bytes().into();
        let json = serde_json::to_string(secret).unwrap_or_default();
        let json = json.trim_matches('"');
        if json != secret {
            self.fixed.push(json.as_bytes().into());
        }
        if !self.fixed.contains(&raw) {
            self.fixed.push(raw);
        }
    }

    /// `data` with every secret replaced by `***` (borrowed, no allocation, when there was
    /// none).
    pub fn scrub<'a>(&self, data: &'a [u8]) -> Cow<'a, [u8]> {
        let mut out = Cow::Borrowed(data);
        let mut apply = |secret: &[u8]| {
            if !secret.is_empty() && memchr::memmem::find(&out, secret).is_some() {
                out = Cow::Owned(replace_all(&out, secret));
            }
        };
        for s in &self.fixed {
            apply(s);
        }
        for p in &self.providers {
            p.each_secret(&mut apply);
        }
        out
    }

    /// A header value with every secret replaced; None when nothing was found.
    pub fn scrub_header(&self, v: &http::HeaderValue) -> Option<http::HeaderValue> {
        match self.scrub(v.as_bytes()) {
            Cow::Borrowed(_) => None,
            Cow::Owned(clean) => Some(
                http::HeaderValue::from_bytes(&clean)
                    .unwrap_or_else(|_| http::HeaderValue::from_static("***")),
            ),
        }
    }
}

fn replace_all(data: &[u8], needle: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut last = 0;
    for at in memchr::memmem::find_iter(data, needle) {
        if at < last {
            continue;
        }
        out.extend_from_slice(&data[last..at]);
        out.extend_from_slice(MASK);
        last = at + needle.len();
    }
    out.extend_from_slice(&data[last..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(list: &[&str]) -> Secrets {
        let mut s = Secrets::default();
        for x in list {
            s.add(x);
        }
        s
    }

    /// Every occurrence of every secret goes, in raw and JSON-escaped form; other bytes stay.
    #[test]
    fn scrubs_every_occurrence() {
        let s = secrets(&["sk-live-abc", "a/b\"c"]);
        let body =
            br#"{"error":{"message":"key sk-live-abc is wrong (sk-live-abc)","x":"a/b\"c"}}"#;
        let clean = s.scrub(body);
        assert_eq!(
            &clean[..],
            br#"{"error":{"message":"key *** is wrong (***)","x":"***"}}"#
        );
        assert!(matches!(s.scrub(b"nothing here"), Cow::Borrowed(_)));
        let v = http::HeaderValue::from_static("Bearer sk-live-abc");
        assert_eq!(s.scrub_header(&v).unwrap(), "Bearer ***");
        assert!(
            s.scrub_header(&http::HeaderValue::from_static("ok"))
                .is_none()
        );
    }
}
