//! Tool names: an `operationId` sanitized to what agent frameworks accept (`[a-zA-Z0-9_-]`,
//! at most 64 characters, the OpenAI function-name rule), a generated name for an operation
//! without one, and the `operations` globs that select them.

/// The longest tool name (OpenAI function names allow 64 characters).
pub const MAX_NAME: usize = 64;

/// `id` with every character outside `[a-zA-Z0-9_-]` replaced by `_`, cut to [`MAX_NAME`].
/// `None` when nothing usable is left (empty, or only `_`).
pub fn sanitize(id: &str) -> Option<String> {
    let name: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(MAX_NAME)
        .collect();
    name.chars().any(|c| c != '_').then_some(name)
}

/// The name of an operation without an `operationId`: the method in lower case, then the path's
/// segments with braces dropped, every other run of characters outside `[a-zA-Z0-9]` one `_`:
/// `GET /orders/{id}` → `get_orders_id`, `POST /v1/order-items` → `post_v1_order_items`.
pub fn generated(method: &str, path: &str) -> String {
    let mut name = method.to_ascii_lowercase();
    let mut gap = true;
    for c in path.chars() {
        if c.is_ascii_alphanumeric() {
            if gap {
                name.push('_');
                gap = false;
            }
            name.push(c);
        } else {
            gap = true;
        }
    }
    name.truncate(MAX_NAME);
    name
}

/// The `operations` globs are the MCP tool globs ([`crate::mcp::glob`]): `*` any run of
/// characters (also none), `?` exactly one, everything else itself.
pub use crate::mcp::glob::{any as selected, matches as glob};
