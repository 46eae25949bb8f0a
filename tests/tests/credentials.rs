//! Backend credentials over real sockets: a local OAuth2 token endpoint and a local IMDS-style
//! managed-identity endpoint count their calls; the gateway fetches one token for many
//! concurrent requests, refreshes it near expiry, and the mock backend sees only the injected
//! `Authorization: Bearer …` / `api-key`, never the client's credentials. A last test runs
//! traffic with every kind of secret configured and finds none of them in the gateway's log or
//! in `/metrics`.

mod jwt_support;

use axum::extract::{Query, State};
use axum::response::IntoResponse;
use jsonwebtoken::Algorithm;
use jwt_support::{Jwks, KEYS, claims, now, sign};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tollgate_loadtest::mock::MockOpts;
use tollgate_tests::{Harness, Running, client, gateway_bin, key_for};
use tollgate_tests::{eventually, metrics};

/// A gateway process on the harness's config with its own environment and log level.
struct DebugGateway {
    url: String,
    log: std::path::PathBuf,
    child: std::process::Child,
}

impl DebugGateway {
    fn spawn(h: &Running, envs: &[(&str, &str)]) -> DebugGateway {
        use std::io::BufRead as _;
        let log = h.dir.path().join("debug-gateway.log");
        let mut child = std::process::Command::new(gateway_bin())
            .args(["serve", "--config"])
            .arg(&h.config_path)
            .args(["--listen", "127.0.0.1:0"])
            .envs(envs.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        // Keep draining so the process never blocks on a full pipe.
        std::thread::spawn(move || for _ in out.lines() {});
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| {
                panic!(
                    "gateway did not start: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
        DebugGateway {
            url: format!("http://{addr}"),
            log,
            child,
        }
    }
}

impl Drop for DebugGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A token endpoint: `POST /oauth/token` (client credentials) and `GET /imds` (managed
/// identity). Each call gets a new token `<prefix>-<n>`.
struct TokenServer {
    addr: std::net::SocketAddr,
    state: Arc<TokenState>,
}

struct TokenState {
    calls: AtomicU64,
    /// Lifetime of the tokens handed out, seconds.
    lifetime: u64,
    /// The last request's form fields (OAuth2) or query and `Metadata` header (IMDS).
    last: Mutex<HashMap<String, String>>,
}

impl TokenServer {
    async fn start(lifetime: u64) -> TokenServer {
        let state = Arc::new(TokenState {
            calls: AtomicU64::new(0),
            lifetime,
            last: Mutex::new(HashMap::new()),
        });
        let app = axum::Router::new()
            .route("/oauth/token", axum::routing::post(oauth))
            .route("/imds", axum::routing::get(imds))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        TokenServer { addr, state }
    }

    fn calls(&self) -> u64 {
        self.state.calls.load(Ordering::SeqCst)
    }

    fn last(&self) -> HashMap<String, String> {
        self.state.last.lock().unwrap().clone()
    }

    fn oauth_toml(&self, secret_env: &str) -> String {
        format!(
            "auth = {{ type = \"oauth2_client_credentials\", token_url = \"http://{}/oauth/token\", client_id = \"gw-app\", \
             client_secret_env = \"{secret_env}\", scope = \"https://cognitiveservices.azure.com/.default\" }}",
            self.addr
        )
    }
}

/// The n-th OAuth2 token: long enough to search a log for.
fn access_token(n: u64) -> String {
    format!("access-token-{n}-9f8e7d6c")
}

async fn oauth(State(s): State<Arc<TokenState>>, body: String) -> axum::response::Response {
    let n = s.calls.fetch_add(1, Ordering::SeqCst) + 1;
    *s.last.lock().unwrap() = serde_urlencoded::from_str(&body).unwrap_or_default();
    axum::Json(
        json!({"access_token": access_token(n), "token_type": "Bearer", "expires_in": s.lifetime}),
    )
    .into_response()
}

async fn imds(
    State(s): State<Arc<TokenState>>,
    Query(q): Query<HashMap<String, String>>,
    headers: http::HeaderMap,
) -> axum::response::Response {
    let n = s.calls.fetch_add(1, Ordering::SeqCst) + 1;
    let mut seen = q;
    if let Some(m) = headers.get("metadata").and_then(|v| v.to_str().ok()) {
        seen.insert("Metadata".into(), m.into());
    }
    *s.last.lock().unwrap() = seen;
    if headers.get("metadata").is_none_or(|v| v != "true") {
        return (
            http::StatusCode::BAD_REQUEST,
            "Required metadata header not specified",
        )
            .into_response();
    }
    // IMDS gives times as strings; this one only says when the token expires.
    let on = (now() as u64 + s.lifetime).to_string();
    axum::Json(json!({"access_token": format!("mi-{n}"), "expires_on": on, "token_type": "Bearer"}))
        .into_response()
}

fn chat(model: &str) -> Value {
    tollgate_tests::chat(5).model(model).prompt("hi").json()
}

async fn post(h: &Running, model: &str, headers: &[(&str, &str)]) -> u16 {
    let mut req = client()
        .post(format!("{}/v1/chat/completions", h.url(0)))
        .json(&chat(model));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let _ = resp.bytes().await;
    status
}

/// Fifty concurrent requests cost the token endpoint one call (made at start-up with the
/// client id, the secret from the environment and the scope); the backend sees only
/// `Authorization: Bearer <token>`, never the client's key.
#[tokio::test]
async fn oauth2_token_fetched_once_for_concurrent_requests() {
    let tokens = TokenServer::start(3600).await;
    let h = Harness::new()
        .backend_with("m", &tokens.oauth_toml("TG_TEST_CLIENT_SECRET"), |m| {
            m.latency_ms = 20
        })
        .consumer("team-a", "")
        .env("TG_TEST_CLIENT_SECRET", "client-secret-value")
        .start()
        .await
        .unwrap();
    let key = key_for("team-a");
    let results = futures::future::join_all((0..50).map(|i| {
        let h = &h;
        let key = &key;
        async move {
            let hdr = if i % 2 == 0 {
                "api-key"
            } else {
                "authorization"
            };
            let value = if i % 2 == 0 {
                key.clone()
            } else {
                format!("Bearer {key}")
            };
            post(h, "gpt-4o", &[(hdr, &value)]).await
        }
    }))
    .await;
    assert!(results.iter().all(|s| *s == 200), "{results:?}");
    assert_eq!(tokens.calls(), 1, "one token for all requests");
    let form = tokens.last();
    assert_eq!(form["grant_type"], "client_credentials");
    assert_eq!(form["client_id"], "gw-app");
    assert_eq!(form["client_secret"], "client-secret-value");
    assert_eq!(
        form["scope"],
        "https://cognitiveservices.azure.com/.default"
    );
    let stats = h.mock("m").stats().await.unwrap();
    assert_eq!(stats.ok, 50);
    assert_eq!(
        stats.auth_seen.get("authorization"),
        Some(&vec![format!("Bearer {}", access_token(1))])
    );
    assert!(
        stats.auth_seen.get("api-key").is_none_or(Vec::is_empty),
        "client key reached the backend: {:?}",
        stats.auth_seen
    );
}

/// A managed-identity token (IMDS request shape: `Metadata: true`, api-version, resource,
/// client_id) that lives five seconds is refreshed once near its expiry, not before, and the
/// backend then gets the new token.
#[tokio::test]
async fn short_lived_managed_identity_token_refreshed_near_expiry() {
    let imds = TokenServer::start(5).await;
    let auth = format!(
        "auth = {{ type = \"azure_managed_identity\", endpoint = \"http://{}/imds\", \
         resource = \"https://cognitiveservices.azure.com\", client_id = \"uami-1\" }}",
        imds.addr
    );
    let h = Harness::new()
        .backend("m", MockOpts::default(), &auth)
        .consumer("a", "")
        .start_in_process()
        .await;
    let key = key_for("a");
    assert_eq!(post(&h, "gpt-4o", &[("api-key", &key)]).await, 200);
    let q = imds.last();
    assert_eq!(q["Metadata"], "true");
    assert_eq!(q["api-version"], "2018-02-01");
    assert_eq!(q["resource"], "https://cognitiveservices.azure.com");
    assert_eq!(q["client_id"], "uami-1");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(imds.calls(), 1, "not refreshed long before expiry");
    assert!(
        eventually(Duration::from_secs(6), || async { imds.calls() >= 2 }).await,
        "refreshed near expiry"
    );
    assert_eq!(imds.calls(), 2);
    assert_eq!(post(&h, "gpt-4o", &[("api-key", &key)]).await, 200);
    let seen = &h.mock("m").stats().await.unwrap().auth_seen["authorization"];
    assert_eq!(
        seen,
        &vec!["Bearer mi-1".to_string(), "Bearer mi-2".to_string()]
    );
}

/// With a backend API key, an OAuth2 client secret, client keys (hashed and from the
/// environment) and JWTs in play — good and bad requests, streamed and not — no secret string
/// appears in the gateway process's log or in `/metrics`, and each backend gets only its own
/// injected credential.
#[tokio::test]
async fn no_secret_reaches_logs_or_metrics() {
    let jwks = Jwks::start(300).await;
    let tokens = TokenServer::start(3600).await;
    let backend_key = "backend-api-key-5f3a9c";
    let client_secret = "oauth-client-secret-81b2";
    let env_client_key = "env-client-key-77d0e1";
    let h = Harness::new()
        .backend(
            "keyed",
            MockOpts::default(),
            "models = [\"gpt-4o\"]\nauth = { type = \"api_key\", key_env = \"TG_BACKEND_KEY\" }",
        )
        .backend(
            "oauth",
            MockOpts::default(),
            &format!(
                "models = [\"gpt-4o-mini\"]\n{}",
                tokens.oauth_toml("TG_CLIENT_SECRET")
            ),
        )
        .consumer("team-a", "")
        .consumer("team-b", "key_env = \"TG_CLIENT_KEY\"")
        .config(&jwks.auth_toml("key_or_jwt", ""))
        .gateways(0)
        .start()
        .await
        .unwrap();
    // The harness logs at info; this gateway logs everything down to debug (JWT rejection
    // reasons, token refreshes, hyper and reqwest internals), where a leak would hide.
    let envs = [
        ("TG_BACKEND_KEY", backend_key),
        ("TG_CLIENT_SECRET", client_secret),
        ("TG_CLIENT_KEY", env_client_key),
        ("TOLLGATE_LOG", "debug"),
    ];
    let gw = DebugGateway::spawn(&h, &envs);
    let harness_key = key_for("team-a");
    let jwt = sign(&KEYS.rsa, Algorithm::RS256, &claims());
    let forged = sign(&KEYS.rogue, Algorithm::RS256, &claims());
    let expired = {
        let mut c = claims();
        c["exp"] = json!(now() - 3600);
        sign(&KEYS.ec, Algorithm::ES256, &c)
    };
    let c = client();
    for model in ["gpt-4o", "gpt-4o-mini"] {
        for (name, value, want) in [
            ("api-key", harness_key.clone(), 200),
            ("ocp-apim-subscription-key", env_client_key.to_string(), 200),
            ("authorization", format!("Bearer {jwt}"), 200),
            ("authorization", format!("Bearer {forged}"), 401),
            ("authorization", format!("Bearer {expired}"), 401),
            ("api-key", format!("{harness_key}-typo"), 401),
        ] {
            for stream in [false, true] {
                let mut body = chat(model);
                body["stream"] = json!(stream);
                let resp = c
                    .post(format!("{}/v1/chat/completions", gw.url))
                    .header(name, &value)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status().as_u16(), want, "{model} {name}");
                let _ = resp.bytes().await;
            }
        }
    }
    let issued: Vec<String> = (1..=tokens.calls()).map(access_token).collect();
    assert_eq!(issued.len(), 1);
    let keyed = h.mock("keyed").stats().await.unwrap();
    assert_eq!(
        keyed.auth_seen.get("api-key"),
        Some(&vec![backend_key.to_string()])
    );
    assert!(
        keyed
            .auth_seen
            .get("authorization")
            .is_none_or(Vec::is_empty),
        "{:?}",
        keyed.auth_seen
    );
    let oauth = h.mock("oauth").stats().await.unwrap();
    assert_eq!(
        oauth.auth_seen.get("authorization"),
        Some(&vec![format!("Bearer {}", access_token(1))])
    );
    assert!(
        oauth.auth_seen.get("api-key").is_none_or(Vec::is_empty),
        "{:?}",
        oauth.auth_seen
    );
    assert!(
        oauth
            .auth_seen
            .get("ocp-apim-subscription-key")
            .is_none_or(Vec::is_empty),
        "{:?}",
        oauth.auth_seen
    );

    let jwt_signatures: Vec<&str> = [&jwt, &forged, &expired]
        .iter()
        .filter_map(|t| t.rsplit('.').next())
        .collect();
    let mut secrets: Vec<&str> = vec![
        backend_key,
        client_secret,
        env_client_key,
        &harness_key,
        &jwt,
        &forged,
        &expired,
    ];
    secrets.extend(jwt_signatures);
    secrets.extend(issued.iter().map(String::as_str));
    let metrics_text = metrics(&gw.url).await;
    let log = std::fs::read_to_string(&gw.log).unwrap();
    assert!(log.contains("JWT rejected"), "the debug log was captured");
    for s in &secrets {
        assert!(!log.contains(s), "a secret appears in the gateway log");
        assert!(!metrics_text.contains(s), "a secret appears in /metrics");
    }
}
