//! The OTLP exporters' HTTP client.

use anyhow::Context as _;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::EXPORT_TIMEOUT;

/// At most one "export failed" warning per this many seconds.
const WARN_EVERY_S: u64 = 60;

/// The OTLP exporters' HTTP client: the SDK's batch threads hand each export to the gateway's
/// runtime, where reqwest sends it. Failures are reported at most once a minute.
#[derive(Clone, Debug)]
pub(super) struct ExportClient {
    client: reqwest::Client,
    rt: tokio::runtime::Handle,
    /// Unix seconds of the last failure warning (0 = never).
    warned_at: Arc<AtomicU64>,
}

impl ExportClient {
    pub(super) fn new() -> anyhow::Result<ExportClient> {
        let rt = tokio::runtime::Handle::try_current()
            .context("OTLP export needs the gateway's Tokio runtime")?;
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(EXPORT_TIMEOUT)
            .no_proxy()
            .build()
            .context("building the OTLP HTTP client")?;
        Ok(ExportClient {
            client,
            rt,
            warned_at: Arc::default(),
        })
    }

    fn warn(&self, what: &str, detail: &str) {
        let now = crate::clock::now_ms() / 1000;
        let last = self.warned_at.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= WARN_EVERY_S)
            && self
                .warned_at
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                endpoint = what,
                error = detail,
                "OTLP export failed; telemetry is dropped until the collector answers \
                 (requests are not affected; next warning in {WARN_EVERY_S} s at most)"
            );
        }
    }
}

#[async_trait::async_trait]
impl HttpClient for ExportClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let url = parts.uri.to_string();
        let req = self
            .client
            .request(parts.method, &url)
            .headers(parts.headers)
            .body(body);
        let sent = self.rt.spawn(async move {
            let resp = req.send().await?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let body = resp.bytes().await?;
            Ok::<_, reqwest::Error>((status, headers, body))
        });
        let (status, headers, body) = match sent.await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                let detail = if e.is_connect() {
                    "connection failed"
                } else if e.is_timeout() {
                    "timed out"
                } else {
                    "request failed"
                };
                self.warn(&url, detail);
                return Err(Box::new(e));
            }
            Err(e) => return Err(Box::new(e)),
        };
        if !status.is_success() {
            self.warn(&url, &format!("collector answered {}", status.as_u16()));
        }
        let mut resp = Response::new(body);
        *resp.status_mut() = status;
        *resp.headers_mut() = headers;
        Ok(resp)
    }
}
