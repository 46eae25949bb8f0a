//! Backend credentials: what the gateway puts on a request to a backend. Static keys come from
//! the environment (`key_env`, `token_env`) into sensitive header values; tokens (an OAuth2
//! client-credentials grant, an Azure managed identity) come from a [`TokenProvider`] that keeps
//! them fresh in the background. No application ever holds these.
//!
//! - [`provider`]: the current token of one backend, read without waiting.
//! - [`refresh`]: the one task per backend that fetches and renews it.

mod provider;
mod refresh;

pub use provider::{Timing, TokenProvider, TokenSource};

use http::HeaderValue;
use std::sync::Arc;
use tollgate_common::Secret;
use tollgate_common::config::{BackendApi, BackendAuth, BackendConfig, secret_from_env};

/// A backend's credential, ready to put on a request.
#[derive(Clone, Debug)]
pub enum Credential {
    None,
    /// Header name and value, marked sensitive so hyper never logs it.
    Header(&'static str, HeaderValue),
    /// `Authorization: Bearer` with the current token of an OAuth2 / managed-identity source.
    Token(Arc<TokenProvider>),
}

impl Credential {
    pub fn from_config(b: &BackendConfig) -> anyhow::Result<Credential> {
        Self::from_auth(&format!("backends.{}", b.name), &b.name, b.api, &b.auth)
    }

    /// The credential of `auth` for the server `name` (a backend, an MCP server); `at` names
    /// its config section in errors. `api` decides the header of an `api_key`.
    pub fn from_auth(
        at: &str,
        name: &str,
        api: BackendApi,
        auth: &BackendAuth,
    ) -> anyhow::Result<Credential> {
        let header = |hname: &'static str, value: String| -> anyhow::Result<Credential> {
            let mut v = HeaderValue::from_str(&value)
                .map_err(|_| anyhow::anyhow!("{at}: credential is not a valid header"))?;
            v.set_sensitive(true);
            Ok(Credential::Header(hname, v))
        };
        let env = |var: &str| -> anyhow::Result<Secret> {
            secret_from_env(var).map_err(|e| anyhow::anyhow!("{at}.auth: {e}"))
        };
        match auth {
            BackendAuth::None => Ok(Credential::None),
            BackendAuth::ApiKey { key_env } => {
                let key = env(key_env)?;
                match api {
                    BackendApi::Azure => header("api-key", key.expose().to_string()),
                    BackendApi::Openai => {
                        header("authorization", format!("Bearer {}", key.expose()))
                    }
                }
            }
            BackendAuth::Bearer { token_env } => header(
                "authorization",
                format!("Bearer {}", env(token_env)?.expose()),
            ),
            BackendAuth::Oauth2ClientCredentials {
                token_url,
                client_id,
                client_secret_env,
                scope,
            } => {
                let source = TokenSource::Oauth2 {
                    token_url: token_url.clone(),
                    client_id: client_id.clone(),
                    client_secret: env(client_secret_env)?,
                    scope: scope.clone(),
                };
                Ok(Credential::Token(Arc::new(TokenProvider::new(
                    name,
                    source,
                    Timing::default(),
                ))))
            }
            BackendAuth::AzureManagedIdentity {
                endpoint,
                resource,
                client_id,
            } => {
                let source = TokenSource::ManagedIdentity {
                    endpoint: endpoint.clone(),
                    resource: resource.clone(),
                    client_id: client_id.clone(),
                };
                Ok(Credential::Token(Arc::new(TokenProvider::new(
                    name,
                    source,
                    Timing::default(),
                ))))
            }
        }
    }
}

#[cfg(test)]
mod tests;
