//! Which headers cross the gateway. A request to a backend carries the gateway's credential,
//! so a client must not choose how that credential acts: only an allow-list of client headers
//! goes on (no `OpenAI-Organization`/`OpenAI-Project`, no `X-Forwarded-*`/`Forwarded`, nothing
//! a client names in `Connection`). On the way back, headers that describe the backend's
//! account or deployment (organization, project, region, `server`), CORS headers, cookies,
//! challenges and hop-by-hop headers are dropped, and every configured secret is scrubbed from
//! the rest.

use crate::secrets::Secrets;
use http::{HeaderMap, HeaderName, header};

/// Client headers sent on to a backend; the gateway sets `content-type`, `x-request-id`, the
/// credential and (with telemetry) `traceparent` itself.
const FORWARDED_REQUEST_HEADERS: [&str; 4] = ["accept", "traceparent", "tracestate", "openai-beta"];

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Backend response headers never passed back: they describe the backend's account, deployment
/// or software, set browser policy, set state, or challenge for a credential the client never
/// gave.
const DROPPED_RESPONSE_HEADERS: [&str; 7] = [
    "server",
    "set-cookie",
    "www-authenticate",
    "openai-organization",
    "openai-project",
    "x-ms-region",
    "x-powered-by",
];

/// The client headers a backend request carries.
pub fn forwarded_request_headers(client: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(FORWARDED_REQUEST_HEADERS.len() + 4);
    for name in FORWARDED_REQUEST_HEADERS {
        for v in client.get_all(name) {
            out.append(HeaderName::from_static(name), v.clone());
        }
    }
    out
}

/// Copies a backend's response headers that may reach the client into `to`, scrubbed of every
/// secret. `keep_length`: the body passes unchanged, so its `content-length` still holds.
pub fn copy_response_headers(
    from: &HeaderMap,
    to: &mut HeaderMap,
    secrets: &Secrets,
    keep_length: bool,
) {
    // Headers the backend names in `Connection` are hop-by-hop too.
    let named: Vec<String> = from
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .collect();
    for (k, v) in from {
        let n = k.as_str();
        if HOP_BY_HOP.contains(&n)
            || DROPPED_RESPONSE_HEADERS.contains(&n)
            || n.starts_with("access-control-")
            || n.starts_with("x-ratelimit-")
            || (!keep_length && k == header::CONTENT_LENGTH)
            || named.iter().any(|c| c == n)
        {
            continue;
        }
        match secrets.scrub_header(v) {
            Some(clean) => to.append(k.clone(), clean),
            None => to.append(k.clone(), v.clone()),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    /// Only allow-listed client headers go on: no org/project choice, no forwarding headers,
    /// no credentials, nothing the client declared hop-by-hop.
    #[test]
    fn request_allow_list() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("accept", "application/json"),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
            ("openai-organization", "org-victim"),
            ("openai-project", "proj-victim"),
            ("x-forwarded-for", "10.0.0.1"),
            ("forwarded", "for=10.0.0.1"),
            ("connection", "x-smuggle"),
            ("x-smuggle", "1"),
            ("api-key", "client-key"),
            ("authorization", "Bearer client-key"),
            ("cookie", "a=b"),
            ("host", "evil"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        let out = forwarded_request_headers(&h);
        let names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["accept", "traceparent"]);
    }

    /// Account, region, server, CORS and challenge headers stay behind; secrets are scrubbed
    /// from the rest; `content-length` goes when the body changes.
    #[test]
    fn response_filter() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("content-type", "application/json"),
            ("content-length", "10"),
            ("openai-organization", "org-1"),
            ("openai-project", "proj-1"),
            ("x-ms-region", "East US"),
            ("server", "nginx"),
            ("access-control-allow-origin", "*"),
            ("www-authenticate", "Bearer realm=x"),
            ("connection", "x-hop"),
            ("x-hop", "1"),
            ("x-echo", "key=backend-secret-1"),
            ("openai-processing-ms", "12"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        let mut secrets = Secrets::default();
        secrets.add("backend-secret-1");
        let mut out = HeaderMap::new();
        copy_response_headers(&h, &mut out, &secrets, false);
        let names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(
            names,
            vec!["content-type", "x-echo", "openai-processing-ms"]
        );
        assert_eq!(out["x-echo"], "key=***");
        let mut out = HeaderMap::new();
        copy_response_headers(&h, &mut out, &secrets, true);
        assert_eq!(out["content-length"], "10");
    }
}
