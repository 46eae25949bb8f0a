//! Load-testing tools for tollgate: [`mock`], a mock OpenAI / Azure OpenAI backend with exact
//! token usage and PTU-like rate limiting, and [`load`], an open-loop load generator that
//! reports coordinated-omission-corrected latency percentiles.
//!
//! Both binaries (`tollgate-mock`, `tollgate-load`) only parse their command line and call
//! into this library, so tests run the same code in-process.

#![forbid(unsafe_code)]

pub mod load;
pub mod mock;
