//! An identity provider for the JWT tests: RSA and EC keys generated once per test binary, a
//! JWKS served by a local axum server (whose keys can be rotated and which can be taken down),
//! and helpers that mint tokens, honest and forged.

#![allow(dead_code)]

use axum::extract::State;
use axum::response::IntoResponse;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use p256::pkcs8::EncodePrivateKey as _;
use rsa::pkcs1::{EncodeRsaPrivateKey as _, EncodeRsaPublicKey as _};
use rsa::traits::PublicKeyParts as _;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

pub const ISSUER: &str = "https://login.example.test/tenant/v2.0";
pub const AUDIENCE: &str = "api://tollgate";

/// A signing key, its public JWK and (for RSA) its public key PEM.
pub struct TestKey {
    pub kid: String,
    pub encoding: EncodingKey,
    pub jwk: Value,
    pub public_pem: String,
}

pub struct Keys {
    /// Served from the start.
    pub rsa: TestKey,
    pub ec: TestKey,
    /// Served only after a rotation.
    pub rsa_next: TestKey,
    /// Never served: an attacker's key.
    pub rogue: TestKey,
}

fn rsa_key(kid: &str) -> TestKey {
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("rsa keygen");
    let der = key.to_pkcs1_der().expect("pkcs1");
    let public = key.to_public_key();
    let jwk = json!({"kty": "RSA", "kid": kid, "use": "sig",
        "n": B64.encode(public.n().to_bytes_be()), "e": B64.encode(public.e().to_bytes_be())});
    let public_pem = public
        .to_pkcs1_pem(rsa::pkcs1::LineEnding::LF)
        .expect("pem");
    TestKey {
        kid: kid.into(),
        encoding: EncodingKey::from_rsa_der(der.as_bytes()),
        jwk,
        public_pem,
    }
}

fn ec_key(kid: &str) -> TestKey {
    let key = p256::ecdsa::SigningKey::random(&mut rsa::rand_core::OsRng);
    let der = key.to_pkcs8_der().expect("pkcs8");
    let point = key.verifying_key().to_encoded_point(false);
    let jwk = json!({"kty": "EC", "kid": kid, "use": "sig", "alg": "ES256", "crv": "P-256",
        "x": B64.encode(point.x().expect("x")), "y": B64.encode(point.y().expect("y"))});
    TestKey {
        kid: kid.into(),
        encoding: EncodingKey::from_ec_der(der.as_bytes()),
        jwk,
        public_pem: String::new(),
    }
}

/// Generated once per test binary (RSA key generation takes a moment).
pub static KEYS: LazyLock<Keys> = LazyLock::new(|| Keys {
    rsa: rsa_key("rsa-1"),
    ec: ec_key("ec-1"),
    rsa_next: rsa_key("rsa-2"),
    rogue: rsa_key("rsa-1"),
});

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Claims that pass every check: issuer, audience, valid for ten minutes, consumer `app-1`.
pub fn claims() -> Value {
    let now = now();
    json!({"iss": ISSUER, "aud": AUDIENCE, "exp": now + 600, "nbf": now - 5, "iat": now,
        "azp": "app-1", "team": "research", "roles": ["reader"]})
}

/// A token signed by `key` with `alg`, naming `key.kid`.
pub fn sign(key: &TestKey, alg: Algorithm, claims: &Value) -> String {
    sign_kid(key, alg, Some(&key.kid), claims)
}

pub fn sign_kid(key: &TestKey, alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&h, claims, &key.encoding).expect("encode")
}

/// A token assembled by hand from a header and claims, with the given signature part.
pub fn raw(header: &Value, claims: &Value, signature: &str) -> String {
    format!(
        "{}.{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string()),
        signature
    )
}

pub fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// The identity provider's JWKS endpoint: `GET /keys`.
pub struct Jwks {
    pub addr: SocketAddr,
    state: Arc<JwksState>,
}

struct JwksState {
    keys: Mutex<Vec<Value>>,
    down: AtomicBool,
    hits: AtomicU64,
    max_age: u64,
}

impl Jwks {
    /// Serves the RSA and EC keys, `Cache-Control: max-age=max_age`.
    pub async fn start(max_age: u64) -> Jwks {
        let state = Arc::new(JwksState {
            keys: Mutex::new(vec![KEYS.rsa.jwk.clone(), KEYS.ec.jwk.clone()]),
            down: AtomicBool::new(false),
            hits: AtomicU64::new(0),
            max_age,
        });
        let app = axum::Router::new()
            .route("/keys", axum::routing::get(serve_keys))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Jwks { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}/keys", self.addr)
    }

    pub fn set_keys(&self, keys: Vec<Value>) {
        *self.state.keys.lock().unwrap() = keys;
    }

    /// While down, every fetch gets a 503.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    pub fn hits(&self) -> u64 {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// An `[auth]` section for this JWKS; `extra` adds `[auth.jwt]` keys.
    pub fn auth_toml(&self, mode: &str, extra: &str) -> String {
        format!(
            "[auth]\nmode = \"{mode}\"\n[auth.jwt]\nissuer = \"{ISSUER}\"\naudience = \"{AUDIENCE}\"\n\
             jwks_url = \"{}\"\nconsumer_claim = \"azp\"\nteam_claim = \"team\"\n{extra}\n",
            self.url()
        )
    }
}

async fn serve_keys(State(s): State<Arc<JwksState>>) -> axum::response::Response {
    s.hits.fetch_add(1, Ordering::SeqCst);
    if s.down.load(Ordering::SeqCst) {
        return http::StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let doc = json!({"keys": *s.keys.lock().unwrap()});
    (
        [(
            http::header::CACHE_CONTROL,
            format!("public, max-age={}", s.max_age),
        )],
        axum::Json(doc),
    )
        .into_response()
}
