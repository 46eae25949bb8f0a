//! JWT authentication over real sockets: keys generated in the test, a JWKS served by a local
//! identity provider, a gateway validating tokens against it. Valid RSA and EC tokens pass;
//! every known attack gets the same generic 401; keys rotate without a restart; a JWKS outage
//! keeps the known keys; claims decide consumer, team and model access; the `key_and_jwt` and
//! `key_or_jwt` modes combine tokens with subscription keys.

mod jwt_support;

use jsonwebtoken::{Algorithm, EncodingKey};
use jwt_support::{AUDIENCE, ISSUER, Jwks, KEYS, claims, now, raw, sign, sign_kid};
use serde_json::{Value, json};
use std::time::Duration;
use tollgate_loadtest::mock::MockOpts;
use tollgate_tests::{Harness, Running, client, key_for};
use tollgate_tests::{eventually, metric_sum, metrics};

fn chat() -> Value {
    tollgate_tests::chat(5).prompt("hi").json()
}

async fn gateway(jwks: &Jwks, mode: &str, extra_jwt: &str, config: &str) -> Running {
    Harness::new()
        .backend("m", MockOpts::default(), "")
        .consumer("team-a", "")
        .config(&jwks.auth_toml(mode, extra_jwt))
        .config(config)
        .start_in_process()
        .await
}

/// Sends a chat request with `headers`; returns the status and the JSON body.
async fn call(
    h: &Running,
    model: &str,
    headers: &[(&str, &str)],
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut body = chat();
    body["model"] = json!(model);
    let mut req = client()
        .post(format!("{}/v1/chat/completions", h.url(0)))
        .json(&body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.json::<Value>().await.unwrap_or(Value::Null);
    (status, body, headers)
}

async fn bearer(h: &Running, token: &str) -> (u16, Value) {
    let (s, b, _) = call(
        h,
        "gpt-4o",
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await;
    (s, b)
}

/// RS256, PS256 and ES256 tokens from the JWKS pass; the consumer and team come from the
/// configured claims; a consumer known only by its token is limited by the `[limits]`
/// default; the backend never sees the client's token.
#[tokio::test]
async fn valid_rsa_and_ec_tokens_pass() {
    let jwks = Jwks::start(300).await;
    let h = gateway(&jwks, "jwt", "", "[limits]\ndefault_tpm = 200").await;
    let c = claims();
    let tokens = [
        sign(&KEYS.rsa, Algorithm::RS256, &c),
        sign(&KEYS.rsa, Algorithm::PS256, &c),
        sign(&KEYS.ec, Algorithm::ES256, &c),
    ];
    for t in &tokens {
        let (status, body, headers) =
            call(&h, "gpt-4o", &[("authorization", &format!("Bearer {t}"))]).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(headers["x-tollgate-consumer"], "app-1");
    }
    let stats = h.mock("m").stats().await.unwrap();
    assert_eq!(stats.ok, 3);
    assert!(
        stats
            .auth_seen
            .get("authorization")
            .is_none_or(Vec::is_empty),
        "client token reached the backend: {:?}",
        stats.auth_seen
    );
    let base = h.url(0);
    let ok = eventually(Duration::from_secs(3), || async {
        metric_sum(
            &metrics(&base).await,
            "tollgate_tokens_total",
            &[("consumer", "app-1"), ("team", "research")],
        ) > 0
    })
    .await;
    assert!(ok, "team from the token claim: {}", metrics(&base).await);
    // The default tpm (200) applies to a consumer without a store record.
    let t = &tokens[0];
    let mut limited = false;
    for _ in 0..40 {
        if bearer(&h, t).await.0 == 429 {
            limited = true;
            break;
        }
    }
    assert!(
        limited,
        "a JWT-only consumer is limited by [limits].default_tpm"
    );
}

/// Every attack gets 401 `invalid_api_key` with one generic message that repeats nothing of
/// the token: alg none, HS256 signed with the RSA public key, algorithms outside the
/// allow-list, expired, not yet valid, wrong issuer or audience, unknown kid, a forged
/// signature, tampered payload, missing claims, malformed and oversize tokens.
#[tokio::test]
async fn every_attack_gets_a_generic_401() {
    let jwks = Jwks::start(300).await;
    let h = gateway(&jwks, "jwt", "algorithms = [\"RS256\", \"ES256\"]", "").await;
    let k = &*KEYS;
    let good = claims();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = claims();
        f(&mut c);
        c
    };
    // The control: a valid token passes on this gateway.
    let valid = sign(&k.rsa, Algorithm::RS256, &good);
    assert_eq!(bearer(&h, &valid).await.0, 200);

    let parts: Vec<&str> = valid.split('.').collect();
    let tampered = {
        let mut c = good.clone();
        c["azp"] = json!("someone-else");
        format!(
            "{}.{}.{}",
            parts[0],
            jwt_support::b64(c.to_string().as_bytes()),
            parts[2]
        )
    };
    let hs_with_public_key = {
        let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
        header.kid = Some(k.rsa.kid.clone());
        let key = EncodingKey::from_secret(k.rsa.public_pem.as_bytes());
        jsonwebtoken::encode(&header, &good, &key).unwrap()
    };
    let mut oversize_claims = good.clone();
    oversize_claims["pad"] = json!("x".repeat(9 * 1024));
    let attacks: Vec<(&str, String)> = vec![
        (
            "alg none",
            raw(
                &json!({"alg": "none", "typ": "JWT", "kid": "rsa-1"}),
                &good,
                "",
            ),
        ),
        (
            "alg none, signature kept",
            raw(&json!({"alg": "none", "kid": "rsa-1"}), &good, parts[2]),
        ),
        ("HS256 with the RSA public key", hs_with_public_key),
        (
            "PS256 outside the allow-list",
            sign(&k.rsa, Algorithm::PS256, &good),
        ),
        (
            "RS512 outside the allow-list",
            sign(&k.rsa, Algorithm::RS512, &good),
        ),
        (
            "expired",
            sign(
                &k.rsa,
                Algorithm::RS256,
                &with(&|c| c["exp"] = json!(now() - 3600)),
            ),
        ),
        (
            "not yet valid",
            sign(
                &k.rsa,
                Algorithm::RS256,
                &with(&|c| c["nbf"] = json!(now() + 3600)),
            ),
        ),
        (
            "wrong issuer",
            sign(
                &k.rsa,
                Algorithm::RS256,
                &with(&|c| c["iss"] = json!("https://evil.test/")),
            ),
        ),
        (
            "wrong audience",
            sign(
                &k.rsa,
                Algorithm::RS256,
                &with(&|c| c["aud"] = json!("api://other")),
            ),
        ),
        (
            "no exp",
            sign(
                &k.rsa,
                Algorithm::RS256,
                &with(&|c| drop(c.as_object_mut().unwrap().remove("exp"))),
            ),
        ),
        (
            "no aud",
            sign(
                &k.rsa,
                Algorithm::RS256,
                &with(&|c| drop(c.as_object_mut().unwrap().remove("aud"))),
            ),
        ),
        (
            "no consumer claim",
            sign(
                &k.rsa,
                Algorithm::RS256,
                &with(&|c| drop(c.as_object_mut().unwrap().remove("azp"))),
            ),
        ),
        (
            "unknown kid",
            sign_kid(&k.rogue, Algorithm::RS256, Some("rsa-unknown"), &good),
        ),
        (
            "no kid, several keys",
            sign_kid(&k.rsa, Algorithm::RS256, None, &good),
        ),
        (
            "forged signature under a known kid",
            sign(&k.rogue, Algorithm::RS256, &good),
        ),
        (
            "EC token naming the RSA key",
            sign_kid(&k.ec, Algorithm::ES256, Some("rsa-1"), &good),
        ),
        ("tampered payload", tampered),
        ("signature stripped", format!("{}.{}.", parts[0], parts[1])),
        ("malformed: two parts", format!("{}.{}", parts[0], parts[1])),
        (
            "malformed: garbage",
            "eyJhbGciOiJSUzI1NiJ9.!!!.###".to_string(),
        ),
        (
            "malformed: not base64 json",
            "eyJub3QganNvbg.eyJ4IjoxfQ.c2ln".to_string(),
        ),
        ("oversize", sign(&k.rsa, Algorithm::RS256, &oversize_claims)),
        ("empty", String::new()),
    ];
    let mut messages = std::collections::BTreeSet::new();
    for (name, token) in &attacks {
        let (status, body) = bearer(&h, token).await;
        assert_eq!(status, 401, "{name}: {body}");
        assert_eq!(body["error"]["code"], "invalid_api_key", "{name}");
        let message = body["error"]["message"].as_str().unwrap().to_string();
        for piece in token.split('.').filter(|p| p.len() > 8) {
            assert!(
                !message.contains(piece),
                "{name}: message repeats the token"
            );
        }
        messages.insert(message);
    }
    assert_eq!(
        messages.len(),
        1,
        "one generic message for every failure: {messages:?}"
    );
    // No header at all is the same 401.
    let (status, _, _) = call(&h, "gpt-4o", &[]).await;
    assert_eq!(status, 401);
    assert_eq!(
        h.mock("m").stats().await.unwrap().ok,
        1,
        "only the control reached the backend"
    );
}

/// A token signed with a new key (new `kid`) is accepted once the identity provider serves
/// it, without a restart: the unknown kid triggers one JWKS refresh.
#[tokio::test]
async fn key_rotation_works_without_restart() {
    let jwks = Jwks::start(3600).await;
    let h = gateway(&jwks, "jwt", "", "").await;
    assert_eq!(
        bearer(&h, &sign(&KEYS.rsa, Algorithm::RS256, &claims()))
            .await
            .0,
        200
    );
    let fetched = jwks.hits();
    // The provider rotates: the new key joins, the old one stays for a while.
    jwks.set_keys(vec![KEYS.rsa_next.jwk.clone(), KEYS.rsa.jwk.clone()]);
    let next = sign(&KEYS.rsa_next, Algorithm::RS256, &claims());
    assert_eq!(
        bearer(&h, &next).await.0,
        200,
        "new kid accepted after one refresh"
    );
    assert_eq!(jwks.hits(), fetched + 1, "exactly one refresh");
    assert_eq!(
        bearer(&h, &sign(&KEYS.rsa, Algorithm::RS256, &claims()))
            .await
            .0,
        200
    );
    // Many requests with a kid nobody serves cost at most one more fetch (rate-limited).
    let rogue = sign_kid(
        &KEYS.rogue,
        Algorithm::RS256,
        Some("rsa-unknown"),
        &claims(),
    );
    let results = futures::future::join_all((0..20).map(|_| bearer(&h, &rogue))).await;
    assert!(results.iter().all(|(s, _)| *s == 401));
    assert!(
        jwks.hits() <= fetched + 2,
        "unknown kids are rate-limited: {} fetches",
        jwks.hits() - fetched
    );
}

/// With the JWKS endpoint down, tokens signed by keys already known keep working; a refresh
/// attempt fails and drops nothing.
#[tokio::test]
async fn jwks_down_keeps_known_keys() {
    let jwks = Jwks::start(300).await;
    let h = gateway(&jwks, "jwt", "", "").await;
    assert_eq!(
        bearer(&h, &sign(&KEYS.ec, Algorithm::ES256, &claims()))
            .await
            .0,
        200
    );
    jwks.set_down(true);
    let before = jwks.hits();
    // An unknown kid forces a refresh attempt against the dead endpoint.
    let unknown = sign(&KEYS.rsa_next, Algorithm::RS256, &claims());
    assert_eq!(bearer(&h, &unknown).await.0, 401);
    assert_eq!(jwks.hits(), before + 1, "the refresh was attempted");
    for t in [
        sign(&KEYS.rsa, Algorithm::RS256, &claims()),
        sign(&KEYS.ec, Algorithm::ES256, &claims()),
    ] {
        assert_eq!(bearer(&h, &t).await.0, 200, "known keys survive the outage");
    }
}

/// `required_claims` missing → 401 for every model; `model_claims` missing → 403
/// `model_not_allowed` for that model only, and /v1/models leaves it out.
#[tokio::test]
async fn required_and_per_model_claims() {
    let jwks = Jwks::start(300).await;
    let extra = "required_claims = { tid = \"tenant-1\" }\n[auth.jwt.model_claims]\n\"gpt-4o\" = { roles = \"gpt4\" }";
    let h = gateway(&jwks, "jwt", extra, "").await;
    let token = |tid: Option<&str>, roles: &[&str]| {
        let mut c = claims();
        if let Some(t) = tid {
            c["tid"] = json!(t);
        }
        c["roles"] = json!(roles);
        format!("Bearer {}", sign(&KEYS.rsa, Algorithm::RS256, &c))
    };
    let reader = token(Some("tenant-1"), &["reader"]);
    let gpt4 = token(Some("tenant-1"), &["reader", "gpt4"]);
    assert_eq!(
        call(&h, "gpt-4o-mini", &[("authorization", &reader)])
            .await
            .0,
        200
    );
    let (status, body, _) = call(&h, "gpt-4o", &[("authorization", &reader)]).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("model_not_allowed")),
        "{body}"
    );
    assert_eq!(call(&h, "gpt-4o", &[("authorization", &gpt4)]).await.0, 200);
    for t in [token(None, &["gpt4"]), token(Some("tenant-2"), &["gpt4"])] {
        assert_eq!(
            call(&h, "gpt-4o-mini", &[("authorization", &t)]).await.0,
            401
        );
    }
    let models = h
        .get_json(0, "/v1/models", &[("authorization", &reader)])
        .await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert!(
        ids.contains(&"gpt-4o-mini") && !ids.contains(&"gpt-4o"),
        "{ids:?}"
    );
}

/// `key_and_jwt` needs both a subscription key (which names the consumer) and a valid JWT;
/// either alone, or a bad token with a good key, is 401.
#[tokio::test]
async fn key_and_jwt_needs_both() {
    let jwks = Jwks::start(300).await;
    let h = gateway(&jwks, "key_and_jwt", "", "").await;
    let key = key_for("team-a");
    let jwt = format!("Bearer {}", sign(&KEYS.rsa, Algorithm::RS256, &claims()));
    let expired = {
        let mut c = claims();
        c["exp"] = json!(now() - 3600);
        format!("Bearer {}", sign(&KEYS.rsa, Algorithm::RS256, &c))
    };
    let (status, _, headers) =
        call(&h, "gpt-4o", &[("api-key", &key), ("authorization", &jwt)]).await;
    assert_eq!(status, 200);
    assert_eq!(
        headers["x-tollgate-consumer"], "team-a",
        "the key decides the consumer"
    );
    let (status, _, _) = call(
        &h,
        "gpt-4o",
        &[("ocp-apim-subscription-key", &key), ("authorization", &jwt)],
    )
    .await;
    assert_eq!(status, 200);
    for (name, hs) in [
        ("key only", vec![("api-key", key.as_str())]),
        ("jwt only", vec![("authorization", jwt.as_str())]),
        (
            "expired jwt",
            vec![
                ("api-key", key.as_str()),
                ("authorization", expired.as_str()),
            ],
        ),
        (
            "unknown key",
            vec![("api-key", "nope"), ("authorization", jwt.as_str())],
        ),
    ] {
        assert_eq!(call(&h, "gpt-4o", &hs).await.0, 401, "{name}");
    }
    let stats = h.mock("m").stats().await.unwrap();
    assert!(
        stats.auth_seen.values().all(Vec::is_empty),
        "client credentials reached the backend: {:?}",
        stats.auth_seen
    );
}

/// `key_or_jwt` takes a JWT-shaped bearer as a token and anything else as a key.
#[tokio::test]
async fn key_or_jwt_accepts_either() {
    let jwks = Jwks::start(300).await;
    let h = gateway(&jwks, "key_or_jwt", "", "").await;
    let key = key_for("team-a");
    let jwt = sign(&KEYS.ec, Algorithm::ES256, &claims());
    let cases = [
        (("api-key", key.clone()), 200, Some("team-a")),
        (
            ("authorization", format!("Bearer {key}")),
            200,
            Some("team-a"),
        ),
        (
            ("authorization", format!("Bearer {jwt}")),
            200,
            Some("app-1"),
        ),
        (
            (
                "authorization",
                "Bearer eyJhbGciOiJub25lIn0.eyJhenAiOiJ4In0.".to_string(),
            ),
            401,
            None,
        ),
        (("authorization", "Bearer wrong-key".to_string()), 401, None),
    ];
    for ((name, value), want, consumer) in cases {
        let (status, body, headers) = call(&h, "gpt-4o", &[(name, &value)]).await;
        assert_eq!(status, want, "{name}: {body}");
        if let Some(c) = consumer {
            assert_eq!(headers["x-tollgate-consumer"], c);
        }
    }
}

/// A JWKS from `jwks_file` works like one from a URL.
#[tokio::test]
async fn jwks_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, json!({"keys": [KEYS.ec.jwk]}).to_string()).unwrap();
    let auth = format!(
        "[auth]\nmode = \"jwt\"\n[auth.jwt]\nissuer = \"{ISSUER}\"\naudience = \"{AUDIENCE}\"\njwks_file = {:?}\n",
        path.display().to_string()
    );
    let h = Harness::new()
        .backend("m", MockOpts::default(), "")
        .config(&auth)
        .start_in_process()
        .await;
    assert_eq!(
        bearer(&h, &sign(&KEYS.ec, Algorithm::ES256, &claims()))
            .await
            .0,
        200
    );
    assert_eq!(
        bearer(&h, &sign(&KEYS.rsa, Algorithm::RS256, &claims()))
            .await
            .0,
        401
    );
}

/// `jwt:sub` is the `user` dimension of a request whose body names no user (seen through the
/// allow-listed Prometheus label); a body `user` wins over the claim.
#[tokio::test]
async fn the_token_subject_is_the_user_dimension() {
    let jwks = Jwks::start(300).await;
    let h = gateway(
        &jwks,
        "jwt",
        "",
        "[telemetry]\ndimensions = [\"body:user\", \"jwt:sub\"]\nprometheus_dimensions = [\"user\"]",
    )
    .await;
    let mut c = claims();
    c["sub"] = json!("subject-42");
    let t = sign(&KEYS.rsa, Algorithm::RS256, &c);
    assert_eq!(bearer(&h, &t).await.0, 200);
    let mut body = chat();
    body["user"] = json!("from-body");
    let r = client()
        .post(format!("{}/v1/chat/completions", h.url(0)))
        .bearer_auth(&t)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let base = h.url(0);
    let users = |m: &str, v: &str| {
        metric_sum(
            m,
            "tollgate_dimension_requests_total",
            &[("dimension", "user"), ("value", v)],
        )
    };
    let ok = eventually(Duration::from_secs(5), || async {
        let m = metrics(&base).await;
        users(&m, "subject-42") == 1 && users(&m, "from-body") == 1
    })
    .await;
    assert!(ok, "{}", metrics(&base).await);
}
