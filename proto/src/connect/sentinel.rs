//! Redis behind Sentinel: the master the Sentinels name, asked again whenever the
//! connection to it breaks or it turns out to be a replica.
//!
//! The redis crate finds the master (`SentinelClient`, each master it is told of checked
//! with `ROLE`) and gives one multiplexed connection to it, but nothing that reconnects
//! by itself, as its `ConnectionManager` does for one server. [`SentinelConnection`] is
//! that part: it keeps the master's connection and, after an error that says the
//! connection or the master is gone (I/O, a timeout, `READONLY` from a demoted master),
//! drops it, so that the next call asks the Sentinels again. The failing call itself is
//! not retried: callers retry on their own schedule (route re-assert, lease rounds).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Cmd, ConnectionInfo, ErrorKind, Pipeline, RedisError, RedisFuture, Value,
};

use super::UrlError;

/// The default Sentinel port, for hosts given without one.
const SENTINEL_PORT: u16 = 26379;

/// What a `redis+sentinel://` URL names.
pub(super) struct SentinelTarget {
    sentinels: Vec<ConnectionInfo>,
    master: String,
    /// The credentials and database of the master (and its replicas).
    node: redis::RedisConnectionInfo,
}

impl SentinelTarget {
    /// Parses what follows `redis+sentinel://`:
    /// `[user:password@]host[:port],host2[:port]…/<master-name>[/<db>][?sentinel_username=…&sentinel_password=…]`.
    /// The credentials before `@` are the master's (and its replicas'); the Sentinels'
    /// own, when they ask for any, are the query's (percent-encoded, as in a URL): a
    /// Sentinel without a password refuses one.
    pub(super) fn parse(rest: &str) -> Result<Self, UrlError> {
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = rest.split_once('/').ok_or(UrlError::Sentinel("no master name"))?;
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (format!("{userinfo}@"), hosts),
            None => (String::new(), authority),
        };
        let mut path = path.split('/');
        let master =
            path.next().filter(|name| !name.is_empty()).ok_or(UrlError::Sentinel("no master name"))?;
        let db: i64 = match path.next() {
            None | Some("") => 0,
            Some(db) => db.parse().map_err(|_| UrlError::Sentinel("the database is not a number"))?,
        };
        if path.next().is_some() {
            return Err(UrlError::Sentinel("a path past the master name and database"));
        }
        let (mut sentinel_username, mut sentinel_password) = ("", "");
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            match pair.split_once('=') {
                Some(("sentinel_username", value)) => sentinel_username = value,
                Some(("sentinel_password", value)) => sentinel_password = value,
                _ => {
                    return Err(UrlError::Sentinel(
                        "a query other than sentinel_username, sentinel_password",
                    ));
                }
            }
        }
        let sentinel_userinfo = if sentinel_username.is_empty() && sentinel_password.is_empty() {
            String::new()
        } else {
            format!("{sentinel_username}:{sentinel_password}@")
        };
        let count = hosts.split(',').count();
        let sentinels = hosts
            .split(',')
            .enumerate()
            .map(|(index, host)| {
                let host = host.trim();
                if host.is_empty() {
                    return Err(UrlError::Sentinel("an empty Sentinel host"));
                }
                // `host`, `host:port`, `[v6]` or `[v6]:port`.
                let has_port = !host.ends_with(']') && host.contains(':');
                let port = if has_port { String::new() } else { format!(":{SENTINEL_PORT}") };
                redis::IntoConnectionInfo::into_connection_info(format!(
                    "redis://{sentinel_userinfo}{host}{port}"
                ))
                .map_err(|source| UrlError::Redis { index: index + 1, count, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // The master's credentials, decoded as the crate decodes a URL's (its address
        // comes from the Sentinels).
        let node = redis::IntoConnectionInfo::into_connection_info(format!("redis://{userinfo}master/{db}"))
            .map_err(|source| UrlError::Redis { index: 1, count, source })?
            .redis_settings()
            .clone();
        Ok(SentinelTarget { sentinels, master: master.to_owned(), node })
    }

    /// A connection to the master, made on first use.
    pub(super) fn connect(self, timeout: Duration) -> Result<SentinelConnection, RedisError> {
        let db = self.node.db();
        let node = SentinelNodeConnectionInfo::default().set_redis_connection_info(self.node);
        let client =
            SentinelClient::build(self.sentinels, self.master, Some(node), SentinelServerType::Master)?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        Ok(SentinelConnection(Arc::new(Shared {
            sentinel: tokio::sync::Mutex::new(client),
            master: std::sync::Mutex::new(None),
            connections: AtomicU64::new(0),
            config,
            db,
        })))
    }
}

/// The master's connection, found through the Sentinels; cheap to clone, shared.
#[derive(Clone)]
pub struct SentinelConnection(Arc<Shared>);

struct Shared {
    /// Asked for the master by one caller at a time (the others then use its answer).
    sentinel: tokio::sync::Mutex<SentinelClient>,
    master: std::sync::Mutex<Option<Master>>,
    /// Connections made so far: which one an error was met on.
    connections: AtomicU64,
    config: AsyncConnectionConfig,
    db: i64,
}

#[derive(Clone)]
struct Master {
    number: u64,
    connection: MultiplexedConnection,
}

impl SentinelConnection {
    fn current(&self) -> Option<Master> {
        self.0.master.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The master's connection: the one held, or a new one to the master the Sentinels
    /// name now.
    async fn master(&self) -> Result<Master, RedisError> {
        if let Some(master) = self.current() {
            return Ok(master);
        }
        let mut sentinel = self.0.sentinel.lock().await;
        // Another caller may have connected while this one waited.
        if let Some(master) = self.current() {
            return Ok(master);
        }
        let client = sentinel.async_get_client().await?;
        let connection = client.get_multiplexed_async_connection_with_config(&self.0.config).await?;
        let master = Master { number: self.0.connections.fetch_add(1, Ordering::Relaxed) + 1, connection };
        *self.0.master.lock().unwrap_or_else(|e| e.into_inner()) = Some(master.clone());
        Ok(master)
    }

    /// After an answer on connection `number`: forgets that connection when the answer
    /// says it or its server is no longer the master's (a newer one is kept).
    fn check(&self, number: u64, broken: bool) {
        if broken {
            let mut master = self.0.master.lock().unwrap_or_else(|e| e.into_inner());
            if master.as_ref().is_some_and(|master| master.number == number) {
                *master = None;
            }
        }
    }
}

/// An error after which the master must be asked for again.
fn breaks(error: &RedisError) -> bool {
    error.is_unrecoverable_error()
        || error.is_timeout()
        || error.kind() == ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
}

/// A reply from a master demoted to a replica.
fn read_only(value: &Value) -> bool {
    matches!(value, Value::ServerError(error) if error.kind() == Some(redis::ServerErrorKind::ReadOnly))
}

impl ConnectionLike for SentinelConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let mut master = self.master().await?;
            let reply = master.connection.req_packed_command(cmd).await;
            self.check(master.number, reply.as_ref().map_or_else(breaks, read_only));
            reply
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let mut master = self.master().await?;
            let replies = master.connection.req_packed_commands(pipeline, offset, count).await;
            self.check(
                master.number,
                replies.as_ref().map_or_else(breaks, |values| values.iter().any(read_only)),
            );
            replies
        })
    }

    fn get_db(&self) -> i64 {
        self.0.db
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls() {
        let target = SentinelTarget::parse(":s3cret@s1,s2:26380,[::1]/main/2").unwrap();
        let ports: Vec<String> = target.sentinels.iter().map(|info| info.addr().to_string()).collect();
        assert_eq!(ports, ["s1:26379", "s2:26380", "::1:26379"]);
        assert_eq!(target.master, "main");
        assert_eq!((target.node.password(), target.node.db()), (Some("s3cret"), 2));
        assert_eq!(target.sentinels[1].redis_settings().password(), None, "the master's, not the Sentinels'");
        let target = SentinelTarget::parse("u:p%40ss@s1/main?sentinel_password=s%2Cp").unwrap();
        assert_eq!((target.node.username(), target.node.password()), (Some("u"), Some("p@ss")));
        assert_eq!(target.sentinels[0].redis_settings().password(), Some("s,p"), "the query's, decoded");
        for (url, why) in [
            ("s1:26379", "no master name"),
            ("s1:26379/", "no master name"),
            ("s1:26379/main/x", "the database is not a number"),
            ("s1,,s2/main", "an empty Sentinel host"),
            ("s1/main?password=x", "a query other than"),
        ] {
            let error = SentinelTarget::parse(url).err().unwrap();
            assert!(error.to_string().starts_with(why), "{url}: {error}");
        }
    }
}
