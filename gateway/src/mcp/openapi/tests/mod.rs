//! Unit tests of the OpenAPI → MCP conversion.
