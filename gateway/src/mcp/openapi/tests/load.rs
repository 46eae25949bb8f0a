use super::super::{OpenApiSpec, load};

/// Writes `text` as `name` in a temp dir and returns the spec reading it.
fn spec_for(dir: &tempfile::TempDir, name: &str, text: &str) -> OpenApiSpec {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    OpenApiSpec::new("orders", path)
}

const JSON_DOC: &str = r#"{"openapi": "3.1.0", "servers": [{"url": "https://orders.example/api/"}],
  "paths": {"/orders": {"get": {"operationId": "listOrders", "responses": {}}}}}"#;

/// A `.json` document is read as JSON, its server URL is the base (trailing `/` dropped), and
/// `base_url` overrides it.
#[test]
fn json_documents_and_base_urls() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = spec_for(&dir, "orders.json", JSON_DOC);
    let c = load(&spec, None).unwrap();
    assert_eq!(c.base_url, "https://orders.example/api");
    assert_eq!(c.tools.keys().collect::<Vec<_>>(), ["listOrders"]);
    spec.base_url = Some("http://127.0.0.1:9200/".into());
    assert_eq!(load(&spec, None).unwrap().base_url, "http://127.0.0.1:9200");
}

/// Server URLs that cannot be a base are refused, naming where they came from.
#[test]
fn unusable_base_urls_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("/api", None, "/servers/0/url", "relative"),
        (
            "https://{region}.example",
            None,
            "/servers/0/url",
            "server variables",
        ),
        (
            "https://x.example",
            Some("ftp://x.example"),
            "(base_url)",
            "http://",
        ),
        (
            "https://x.example",
            Some("https://u:p@x.example"),
            "(base_url)",
            "credentials",
        ),
        (
            "https://x.example",
            Some("https://x.example/?a=1"),
            "(base_url)",
            "no query",
        ),
    ];
    for (server, base, at, what) in cases {
        let text = JSON_DOC.replace("https://orders.example/api/", server);
        let mut spec = spec_for(&dir, "doc.json", &text);
        spec.base_url = base.map(str::to_string);
        let e = load(&spec, None).unwrap_err().to_string();
        assert!(
            e.contains(&format!("at {at}")) && e.contains(what),
            "{server} {base:?}: {e}"
        );
    }
    let spec = spec_for(&dir, "none.json", r#"{"openapi": "3.1.0", "paths": {}}"#);
    assert!(
        load(&spec, None)
            .unwrap_err()
            .to_string()
            .contains("set base_url")
    );
}

/// A document that does not parse names the file and the parser's place; a missing file is
/// an error, not a panic.
#[test]
fn unreadable_documents_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_for(&dir, "bad.yaml", "openapi: 3.1.0\npaths: [\n");
    let e = load(&spec, None).unwrap_err().to_string();
    assert!(
        e.contains("bad.yaml") && e.contains("not valid YAML") && e.contains("line"),
        "{e}"
    );
    let missing = OpenApiSpec::new("orders", dir.path().join("nope.yaml"));
    assert!(format!("{:#}", load(&missing, None).unwrap_err()).contains("nope.yaml"));
}
