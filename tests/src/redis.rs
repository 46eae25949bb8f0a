//! A real `redis-server` owned by one test: started in a fresh temp dir, listening on a unix
//! socket in that dir and on a free TCP port of 127.0.0.1 (never 6379), with persistence off,
//! and killed when the [`RedisServer`] is dropped. Tests reach it with [`Node::url`] /
//! [`Node::unix_url`] and run operator commands through [`Node::cli`]; everything a server
//! process can do lives on [`Node`], which a `RedisServer` derefs to.

use std::ops::{Deref, DerefMut};

use crate::server::{Flavor, Node};

/// A running `redis-server` (the system's Redis 7).
pub struct RedisServer {
    node: Node,
}

impl RedisServer {
    /// Starts a server and waits until it answers PING.
    pub fn start() -> anyhow::Result<RedisServer> {
        Ok(RedisServer {
            node: Node::start(Flavor::Redis, &[])?,
        })
    }

    /// Starts a server that keeps every write on disk (`appendfsync always`), so a
    /// [`stop`](Node::stop) and [`restart`](Node::restart) lose no data, like a production
    /// Redis with persistence.
    pub fn start_persistent() -> anyhow::Result<RedisServer> {
        Ok(RedisServer {
            node: Node::start(Flavor::Redis, &["--appendonly".into(), "yes".into()])?,
        })
    }
}

impl Deref for RedisServer {
    type Target = Node;

    fn deref(&self) -> &Node {
        &self.node
    }
}

impl DerefMut for RedisServer {
    fn deref_mut(&mut self) -> &mut Node {
        &mut self.node
    }
}
