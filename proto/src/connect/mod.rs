//! How a pod reaches NATS and Redis, whether each is one server or a cluster: the URLs
//! both services (and the all-in-one) accept, parsed in one place.
//!
//! - NATS: `NATS_URL` is one URL or several, comma-separated (seeds of a cluster; the
//!   client then follows the servers the cluster announces).
//! - Redis: one `redis://` URL is a standalone server; several, comma-separated, are
//!   seeds of a Redis Cluster; `redis+sentinel://host:26379,host2:26379/<master-name>`
//!   asks those Sentinels for the master. [`RedisConnection`] hides which, reconnects by
//!   itself, and follows a failover; [`Batch`] sends many single-slot commands at once
//!   in a way a cluster accepts.

mod batch;
mod sentinel;

use std::time::Duration;

use async_nats::ServerAddr;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

pub use batch::{Batch, Lua};
pub use sentinel::SentinelConnection;

/// A `NATS_URL` or `REDIS_URL` that cannot be used. Messages never repeat the URL,
/// which may hold a password.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("no URL given")]
    Empty,
    #[error("URL {index} of {count}: {source}")]
    Nats {
        index: usize,
        count: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("URL {index} of {count}: {source}")]
    Redis {
        index: usize,
        count: usize,
        #[source]
        source: redis::RedisError,
    },
    #[error(
        "{0} (expected redis+sentinel://[user:password@]host:26379,host2:26379/<master-name>[/<db>]\
         [?sentinel_username=…&sentinel_password=…])"
    )]
    Sentinel(&'static str),
    #[error("Redis client: {0}")]
    Client(#[source] redis::RedisError),
}

/// The servers of a `NATS_URL`: one URL, or several separated by commas (a cluster's
/// seeds, in any order; `user:password@` is taken from each).
///
/// # Errors
/// An empty list, or a URL that does not parse (named by its position).
pub fn nats_servers(urls: &str) -> Result<Vec<ServerAddr>, UrlError> {
    if urls.trim().is_empty() {
        return Err(UrlError::Empty);
    }
    let count = urls.split(',').count();
    urls.split(',')
        .enumerate()
        .map(|(index, url)| {
            url.trim().parse::<ServerAddr>().map_err(|source| UrlError::Nats {
                index: index + 1,
                count,
                source,
            })
        })
        .collect()
}

/// The scheme of a Sentinel `REDIS_URL`.
const SENTINEL_SCHEME: &str = "redis+sentinel://";

/// Checks a `REDIS_URL` without connecting (configuration checks at start).
///
/// # Errors
/// What [`RedisConnection::open`] would refuse.
pub fn check_redis_url(url: &str) -> Result<(), UrlError> {
    RedisTarget::parse(url).map(drop)
}

/// What a `REDIS_URL` names.
enum RedisTarget {
    Standalone(redis::ConnectionInfo),
    Cluster(Vec<redis::ConnectionInfo>),
    Sentinel(sentinel::SentinelTarget),
}

impl RedisTarget {
    fn parse(url: &str) -> Result<Self, UrlError> {
        let url = url.trim();
        if url.is_empty() {
            return Err(UrlError::Empty);
        }
        if let Some(rest) = url.strip_prefix(SENTINEL_SCHEME) {
            return sentinel::SentinelTarget::parse(rest).map(RedisTarget::Sentinel);
        }
        let count = url.split(',').count();
        let mut nodes = url
            .split(',')
            .enumerate()
            .map(|(index, node)| {
                redis::IntoConnectionInfo::into_connection_info(node.trim())
                    .map_err(|source| UrlError::Redis { index: index + 1, count, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(if count == 1 { RedisTarget::Standalone(nodes.remove(0)) } else { RedisTarget::Cluster(nodes) })
    }
}

/// One connection to Redis, shared by clones, whatever the deployment: a standalone
/// server, a Redis Cluster (the client follows MOVED/ASK and re-reads the slot map after
/// a failover) or the master Sentinel names (asked again after the connection breaks).
/// Every variant connects lazily and reconnects by itself: a pod starts and serves while
/// Redis is down, its calls failing until Redis is back.
#[derive(Clone)]
pub enum RedisConnection {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(SentinelConnection),
}

impl RedisConnection {
    /// Opens a connection to what `url` names, each call bounded by `timeout` (to
    /// connect, and to answer).
    ///
    /// # Errors
    /// The URL is invalid.
    pub fn open(url: &str, timeout: Duration) -> Result<Self, UrlError> {
        Ok(match RedisTarget::parse(url)? {
            RedisTarget::Standalone(node) => {
                let client = redis::Client::open(node).map_err(UrlError::Client)?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_max_delay(Duration::from_secs(2));
                RedisConnection::Standalone(
                    ConnectionManager::new_lazy_with_config(client, config).map_err(UrlError::Client)?,
                )
            }
            RedisTarget::Cluster(nodes) => {
                let client = redis::cluster::ClusterClient::new(nodes).map_err(UrlError::Client)?;
                let config = redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(timeout)
                    .set_response_timeout(timeout);
                RedisConnection::Cluster(client.get_pending_async_connection_with_config(config))
            }
            RedisTarget::Sentinel(target) => {
                RedisConnection::Sentinel(target.connect(timeout).map_err(UrlError::Client)?)
            }
        })
    }

    /// Whether commands on keys of different slots must go apart (see [`Batch`]).
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConnection::Cluster(_))
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConnection::Standalone(connection) => connection.req_packed_command(cmd),
            RedisConnection::Cluster(connection) => connection.req_packed_command(cmd),
            RedisConnection::Sentinel(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConnection::Standalone(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
            RedisConnection::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
            RedisConnection::Sentinel(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Standalone(connection) => connection.get_db(),
            RedisConnection::Cluster(connection) => connection.get_db(),
            RedisConnection::Sentinel(connection) => connection.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_takes_one_url_or_several() {
        assert_eq!(nats_servers("nats://127.0.0.1:4222").unwrap().len(), 1);
        let servers = nats_servers("nats://a:4222, nats://b:4222,c:4222").unwrap();
        assert_eq!(servers.len(), 3);
        assert_eq!(servers[2].host(), "c");
        assert!(matches!(nats_servers(" "), Err(UrlError::Empty)));
        let error = nats_servers("nats://user:secret@a:4222,nats://user:secret@b:x").unwrap_err();
        assert!(matches!(error, UrlError::Nats { index: 2, count: 2, .. }), "{error}");
        assert!(!error.to_string().contains("secret"), "the password is not repeated: {error}");
    }

    #[test]
    fn redis_urls_name_a_server_a_cluster_or_sentinels() {
        assert!(matches!(RedisTarget::parse("redis://127.0.0.1:6379"), Ok(RedisTarget::Standalone(_))));
        let Ok(RedisTarget::Cluster(nodes)) = RedisTarget::parse(
            "redis://:pw@10.0.0.1:7000, redis://:pw@10.0.0.2:7000,redis://:pw@10.0.0.3:7000",
        ) else {
            panic!("a cluster")
        };
        assert_eq!(nodes.len(), 3);
        assert_eq!(nodes[1].redis_settings().password(), Some("pw"));
        assert!(matches!(
            RedisTarget::parse("redis+sentinel://s1,s2:26380/main"),
            Ok(RedisTarget::Sentinel(_))
        ));
        let error = RedisTarget::parse("redis://:secret@a:6379,http://:secret@b").err().unwrap();
        assert!(matches!(error, UrlError::Redis { index: 2, count: 2, .. }), "{error}");
        assert!(!error.to_string().contains("secret"), "{error}");
        assert!(matches!(RedisTarget::parse(""), Err(UrlError::Empty)));
    }
}
