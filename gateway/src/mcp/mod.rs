//! MCP: agents' tool traffic. [`openapi`] turns a REST API described by an OpenAPI document into tools.

pub mod openapi;
