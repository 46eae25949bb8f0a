use super::super::names::{generated, glob, sanitize};

/// An operationId keeps `[a-zA-Z0-9_-]`, every other character becomes `_`, cut at 64.
#[test]
fn sanitized_names() {
    assert_eq!(sanitize("orders.get/v2").as_deref(), Some("orders_get_v2"));
    assert_eq!(sanitize("list-Orders_2").as_deref(), Some("list-Orders_2"));
    assert_eq!(sanitize("prüfen").as_deref(), Some("pr_fen"));
    assert_eq!(sanitize(&"x".repeat(100)).map(|n| n.len()), Some(64));
    assert_eq!(sanitize("..."), None, "nothing usable left");
    assert_eq!(sanitize(""), None);
}

/// An operation without an operationId is named from its method and path.
#[test]
fn generated_names() {
    assert_eq!(generated("get", "/orders/{id}"), "get_orders_id");
    assert_eq!(generated("post", "/v1/order-items"), "post_v1_order_items");
    assert_eq!(generated("delete", "/"), "delete");
    assert_eq!(generated("get", &format!("/{}", "a".repeat(100))).len(), 64);
}

/// `*` matches any run, `?` one character, the rest itself.
#[test]
fn globs() {
    assert!(glob("*", "anything"));
    assert!(glob("*", ""));
    assert!(glob("get*", "getOrder"));
    assert!(!glob("get*", "listOrders"));
    assert!(glob("?et*", "setThing"));
    assert!(glob("a*b*c", "axxbyyc"));
    assert!(!glob("a*b*c", "axxbyy"));
    assert!(!glob("getOrder", "getOrders"));
}
