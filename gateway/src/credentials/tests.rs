use super::refresh::{TokenResponse, schedule};
use super::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

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
    let t: TokenResponse =
        serde_json::from_str(r#"{"access_token":"abc","expires_in":"3599","token_type":"Bearer"}"#)
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
