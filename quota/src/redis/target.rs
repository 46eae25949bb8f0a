//! Where the store's Redis is and how to log in: one server, a Redis Cluster's seed nodes, or
//! a Sentinel group's sentinels and master name ([`Topology`]); an ACL user, passwords and a
//! private CA ([`Credentials`]). [`Pool`] is what connecting makes of them: the connections
//! the store uses round-robin, and where the breaker listener subscribes ([`Listen`]).

use super::conn::Conn;
use super::sentinel::SentinelConn;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, ConnectionInfo, IntoConnectionInfo as _,
    RedisResult, TlsCertificates, TlsMode,
};
use std::sync::Arc;
use std::time::Duration;

/// The shape of the Redis deployment.
#[derive(Clone, Debug)]
pub enum Topology {
    /// One server: `redis://`, `rediss://` (TLS), `redis+unix://`.
    Single(String),
    /// A Redis Cluster: seed nodes, any live one of which finds the rest.
    Cluster(Vec<String>),
    /// The master the sentinels monitor under `master_name`.
    Sentinel {
        sentinels: Vec<String>,
        master_name: String,
    },
}

/// How to log in. Passwords never appear in `Debug` or in error messages.
#[derive(Clone, Default)]
pub struct Credentials {
    /// ACL user of the data nodes (none: `default`, or the one in the URL).
    pub username: Option<String>,
    /// Password of the data nodes (overrides one in a URL).
    pub password: Option<String>,
    /// Password of the sentinels themselves.
    pub sentinel_password: Option<String>,
    /// PEM of the CA that signed the servers' certificates (`rediss://`); none: system roots.
    pub ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |p: &Option<String>| p.as_ref().map(|_| "***");
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &hidden(&self.password))
            .field("sentinel_password", &hidden(&self.sentinel_password))
            .field("ca_pem", &self.ca_pem.as_ref().map(Vec::len))
            .finish()
    }
}

impl Credentials {
    /// Every password, for scrubbing error messages.
    pub(super) fn secrets(&self) -> Vec<String> {
        [&self.password, &self.sentinel_password]
            .into_iter()
            .flatten()
            .filter(|p| !p.is_empty())
            .cloned()
            .collect()
    }

    fn certs(&self) -> TlsCertificates {
        TlsCertificates {
            client_tls: None,
            root_cert: self.ca_pem.clone(),
        }
    }

    /// `url` with this user and password applied.
    fn info(&self, url: &str) -> RedisResult<ConnectionInfo> {
        let info = url.into_connection_info()?;
        let mut settings = info.redis_settings().clone();
        if let Some(u) = &self.username {
            settings = settings.set_username(u);
        }
        if let Some(p) = &self.password {
            settings = settings.set_password(p);
        }
        Ok(info.set_redis_settings(settings))
    }

    /// A client for one node, trusting the configured CA on TLS.
    fn client(&self, url: &str) -> RedisResult<Client> {
        let info = self.info(url)?;
        if self.ca_pem.is_some() && matches!(info.addr(), ConnectionAddr::TcpTls { .. }) {
            Client::build_with_tls(info, self.certs())
        } else {
            Client::open(info)
        }
    }
}

/// Where the breaker listener subscribes.
#[derive(Clone)]
pub(super) enum Listen {
    /// The one server.
    Server(Box<Client>),
    /// Any node of the cluster: a `PUBLISH` on one node is broadcast over the cluster bus to
    /// the subscribers of every node, so one subscription anywhere hears every change.
    AnyNode(Vec<Client>),
    /// The current master of the sentinel group.
    Master(Arc<tokio::sync::Mutex<SentinelClient>>),
}

impl Listen {
    /// A client to subscribe through; `attempt` rotates over a cluster's nodes.
    pub(super) async fn client(&self, attempt: usize) -> RedisResult<Client> {
        match self {
            Listen::Server(c) => Ok((**c).clone()),
            Listen::AnyNode(nodes) => Ok(nodes[attempt % nodes.len()].clone()),
            Listen::Master(s) => s.lock().await.async_get_client().await,
        }
    }
}

/// The connections a store uses.
pub(super) struct Pool {
    pub conns: Vec<Conn>,
    /// A connection of its own for settle batches: their `WAIT` blocks the connection it runs
    /// on, which must not be one the request path uses.
    pub settle: Conn,
    pub listen: Listen,
    /// Passwords in the URLs, for scrubbing.
    pub url_passwords: Vec<String>,
}

/// Opens the connections of `topology` (lazily where the client allows: nothing is sent yet).
pub(super) async fn open(
    topology: &Topology,
    creds: &Credentials,
    size: usize,
    connect_timeout: Duration,
) -> RedisResult<Pool> {
    let size = size.max(1);
    match topology {
        Topology::Single(url) => {
            let client = creds.client(url)?;
            let url_passwords = client
                .get_connection_info()
                .redis_settings()
                .password()
                .map(str::to_string)
                .into_iter()
                .collect();
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(connect_timeout))
                .set_response_timeout(None)
                // One quick retry: while Redis is down each call fails fast (the gateway falls
                // back), and the next call after a failure starts a fresh reconnect.
                .set_number_of_retries(1)
                .set_min_delay(Duration::from_millis(20))
                .set_max_delay(Duration::from_millis(200));
            let manager =
                || ConnectionManager::new_lazy_with_config(client.clone(), config.clone());
            let conns = (0..size)
                .map(|_| manager().map(Conn::Single))
                .collect::<RedisResult<Vec<_>>>()?;
            Ok(Pool {
                conns,
                settle: Conn::Single(manager()?),
                listen: Listen::Server(Box::new(client)),
                url_passwords,
            })
        }
        Topology::Cluster(urls) => {
            let infos = urls
                .iter()
                .map(|u| creds.info(u))
                .collect::<RedisResult<Vec<_>>>()?;
            let url_passwords = infos
                .iter()
                .filter_map(|i| i.redis_settings().password().map(str::to_string))
                .collect();
            let tls = infos
                .iter()
                .any(|i| matches!(i.addr(), ConnectionAddr::TcpTls { .. }));
            let mut builder = ClusterClientBuilder::new(infos)
                .connection_timeout(connect_timeout)
                // Few retries: a slot whose master died fails fast (the gateway applies
                // `on_error`) instead of waiting out the failover inside one call.
                .retries(2)
                .min_retry_wait(10)
                .max_retry_wait(200);
            if let Some(u) = &creds.username {
                builder = builder.username(u);
            }
            if let Some(p) = &creds.password {
                builder = builder.password(p);
            }
            if tls {
                builder = builder.tls(TlsMode::Secure);
                if creds.ca_pem.is_some() {
                    builder = builder.certs(creds.certs());
                }
            }
            let client = builder.build()?;
            // A cluster connection multiplexes one link per node: a few are plenty.
            let mut conns = Vec::new();
            for _ in 0..size.min(4) {
                conns.push(Conn::Cluster(client.get_async_connection().await?));
            }
            let settle = Conn::Cluster(client.get_async_connection().await?);
            let nodes = urls
                .iter()
                .map(|u| creds.client(u))
                .collect::<RedisResult<Vec<_>>>()?;
            Ok(Pool {
                conns,
                settle,
                listen: Listen::AnyNode(nodes),
                url_passwords,
            })
        }
        Topology::Sentinel {
            sentinels,
            master_name,
        } => {
            let mut addrs = Vec::new();
            let mut url_passwords = Vec::new();
            let mut tls = false;
            for u in sentinels {
                let info = u.as_str().into_connection_info()?;
                url_passwords.extend(info.redis_settings().password().map(str::to_string));
                tls |= matches!(info.addr(), ConnectionAddr::TcpTls { .. });
                addrs.push(info.addr().clone());
            }
            let mut b = SentinelClientBuilder::new(addrs, master_name, SentinelServerType::Master)?;
            if let Some(u) = &creds.username {
                b = b.set_client_to_redis_username(u);
            }
            if let Some(p) = &creds.password {
                b = b.set_client_to_redis_password(p);
            }
            if let Some(p) = creds.sentinel_password.as_ref().or(url_passwords.first()) {
                b = b.set_client_to_sentinel_password(p);
            }
            if tls {
                // Sentinels reached over TLS hand out masters reached over TLS.
                b = b
                    .set_client_to_redis_tls_mode(TlsMode::Secure)
                    .set_client_to_sentinel_tls_mode(TlsMode::Secure);
                if creds.ca_pem.is_some() {
                    b = b
                        .set_client_to_redis_certificates(creds.certs())
                        .set_client_to_sentinel_certificates(creds.certs());
                }
            }
            let client = Arc::new(tokio::sync::Mutex::new(b.build()?));
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(connect_timeout))
                .set_response_timeout(None);
            let conn = || Conn::Sentinel(SentinelConn::new(client.clone(), config.clone()));
            Ok(Pool {
                conns: (0..size).map(|_| conn()).collect(),
                settle: conn(),
                listen: Listen::Master(client.clone()),
                url_passwords,
            })
        }
    }
}
