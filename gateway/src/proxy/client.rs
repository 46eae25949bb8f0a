//! The client the request path forwards with: hyper's pooled client, directly. reqwest (still
//! used off the path: embeddings, JWKS, webhooks, OTLP) wraps the same client in layers the
//! path does not need — a redirect policy (redirects are never followed here), per-request
//! timeout wrappers (the path has its own first-byte, idle and deadline bounds), URL
//! re-parsing. Plain HTTP backends speak HTTP/1.1; TLS backends negotiate HTTP/2 or 1.1 by
//! ALPN, with the webpki roots.

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::time::Duration;

/// The pooled client to every backend.
pub type Upstream = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A client whose connects give up after `connect_ms`; idle connections are kept 90 s.
pub fn upstream(connect_ms: u64) -> Upstream {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_millis(connect_ms)));
    // The scheme is the TLS connector's to check.
    http.enforce_http(false);
    let https = HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .pool_timer(TokioTimer::new())
        .build(https)
}
