//! The orders REST service of the OpenAPI tests: an axum app on a free port that records every
//! request (method, raw path, query, headers, body) and answers by raw path, plus the spec and
//! credential the tests load deploy/examples/orders-openapi.yaml with.

use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tollgate::credentials::Credential;
use tollgate::mcp::openapi::{OpenApiSpec, OpenApiTools};

pub const KEY: &str = "orders-upstream-key-123";

/// One request as the service saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    /// The path exactly as sent (not decoded).
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: String,
}

pub type Log = Arc<Mutex<Vec<Seen>>>;

/// The orders service: records, then answers by raw path.
async fn serve(State(log): State<Log>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = to_bytes(body, 1 << 20).await.unwrap_or_default();
    let path = parts.uri.path().to_string();
    // An OAuth2 token endpoint: the n-th fetch gets `tok-n`.
    let fetches = {
        let mut log = log.lock().unwrap();
        log.push(Seen {
            method: parts.method.to_string(),
            path: path.clone(),
            query: parts.uri.query().map(str::to_string),
            headers: parts.headers.clone(),
            body: String::from_utf8_lossy(&body).into_owned(),
        });
        log.iter().filter(|s| s.path == "/token").count()
    };
    let json = |status: StatusCode, v: Value| (status, axum::Json(v)).into_response();
    let bearer = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    match (parts.method.as_str(), path.as_str()) {
        ("GET", "/orders") => json(StatusCode::OK, json!([{"id": "o-1", "status": "open"}])),
        ("POST", "/orders") => {
            let mut order: Value = serde_json::from_slice(&body).unwrap_or(json!({}));
            order["id"] = json!("o-2");
            order["status"] = json!("open");
            json(StatusCode::CREATED, order)
        }
        ("POST", "/token") => json(
            StatusCode::OK,
            json!({"access_token": format!("tok-{fetches}"), "expires_in": 3600, "token_type": "Bearer"}),
        ),
        ("GET", "/orders/reject") if bearer == Some("Bearer tok-1") => {
            json(StatusCode::UNAUTHORIZED, json!({"error": "token refused"}))
        }
        ("GET", "/orders/404") => json(StatusCode::NOT_FOUND, json!({"error": "no such order"})),
        ("GET", "/orders/misshapen") => json(StatusCode::OK, json!({"id": "misshapen"})),
        ("GET", p) if p.starts_with("/orders/") => json(
            StatusCode::OK,
            json!({"id": &p["/orders/".len()..], "status": "shipped"}),
        ),
        ("GET", "/moved") => {
            (StatusCode::FOUND, [(http::header::LOCATION, "/admin")]).into_response()
        }
        ("GET", "/slow") => std::future::pending().await,
        ("GET", "/export") => {
            // 4 MiB in 64 KiB chunks, more than any test's cap.
            let chunks = (0..64).map(|_| Ok::<_, std::io::Error>(vec![b'x'; 64 * 1024]));
            Response::builder()
                .header("content-type", "text/plain")
                .body(Body::from_stream(futures::stream::iter(chunks)))
                .unwrap()
        }
        ("GET", "/admin") => "the admin page".into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

pub struct Orders {
    pub url: String,
    pub log: Log,
}

impl Orders {
    pub async fn start() -> Orders {
        let log: Log = Arc::default();
        let app = axum::Router::new().fallback(serve).with_state(log.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Orders { url, log }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.log.lock().unwrap().clone()
    }
}

pub fn document() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/orders-openapi.yaml")
}

pub fn api_key() -> Credential {
    let mut v = HeaderValue::from_static(KEY);
    v.set_sensitive(true);
    Credential::Header("x-api-key", v)
}

pub fn spec(orders: &Orders) -> OpenApiSpec {
    let mut s = OpenApiSpec::new("orders", document());
    s.base_url = Some(orders.url.clone());
    s.timeout_ms = 500;
    s.max_response_bytes = 64 * 1024;
    s
}

pub async fn setup() -> (Orders, OpenApiTools) {
    let orders = Orders::start().await;
    let tools = OpenApiTools::new(spec(&orders), api_key()).expect("the document loads");
    (orders, tools)
}
