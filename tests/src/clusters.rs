//! Clustered servers on loopback: a JetStream cluster of `nats-server`s, a Redis Cluster
//! (masters with a replica each) and a Redis master and replica watched by Sentinels.
//! Each returns once it works as a whole (a meta leader elected, every slot served and
//! every replica in sync, the Sentinels aware of each other and of the replica), and
//! dies with the test (SIGKILL, its files removed).

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

use crate::servers::{Endpoint, NatsServer, Process, RedisServer, free_port, temp_dir};
use crate::wait_until;

/// `nats-server -js` in a cluster, each with its own store, named `n0`, `n1`…
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// `size` servers routed to each other; returns once each answers JetStream calls.
    pub async fn spawn(size: usize) -> Self {
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        // Every server gets every route, its own included (a server ignores a route to
        // itself): the cluster forms whichever starts first.
        let routes: Vec<String> =
            ports.iter().map(|(_, route)| format!("nats://127.0.0.1:{route}")).collect();
        let mut nodes: Vec<NatsServer> = ports
            .iter()
            .enumerate()
            .map(|(index, (client, route))| {
                let args = [
                    "--server_name",
                    &format!("n{index}"),
                    "--cluster",
                    &format!("nats://127.0.0.1:{route}"),
                    "--cluster_name",
                    "tcpc-test",
                    "--routes",
                    &routes.join(","),
                ];
                NatsServer::new(*client, args.map(String::from).to_vec())
            })
            .collect();
        for node in &mut nodes {
            node.launch();
        }
        for node in &nodes {
            node.wait_for_jetstream().await;
        }
        NatsCluster { nodes }
    }

    /// The node a JetStream server name (`n1`) is.
    pub fn index_of(&self, server_name: &str) -> usize {
        server_name
            .strip_prefix('n')
            .and_then(|index| index.parse().ok())
            .filter(|&index| index < self.nodes.len())
            .unwrap_or_else(|| panic!("{server_name:?} is not a server of this cluster"))
    }

    /// A client of the cluster for the test's own checks.
    pub async fn client(&self) -> async_nats::Client {
        let servers = tcpc_proto::connect::nats_servers(&self.url()).expect("the cluster's URLs");
        async_nats::ConnectOptions::new().connect(servers).await.expect("nats connection")
    }
}

impl Endpoint for NatsCluster {
    fn url(&self) -> String {
        self.nodes.iter().map(NatsServer::url).collect::<Vec<_>>().join(",")
    }
}

/// A free loopback port whose Redis Cluster bus port (the port + 10000) is free too.
fn cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port < 55535 && TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
}

/// The `INFO replication` fields of the node at `url`, or none if it does not answer.
async fn replication(url: String) -> HashMap<String, String> {
    let Ok(client) = redis::Client::open(url) else { return HashMap::new() };
    let Ok(mut connection) = client.get_multiplexed_async_connection().await else { return HashMap::new() };
    let info: String =
        redis::cmd("INFO").arg("replication").query_async(&mut connection).await.unwrap_or_default();
    info.lines()
        .filter_map(|line| line.trim().split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// A Redis Cluster of masters with a replica each, made by `redis-cli --cluster
/// create`. A master is failed over a node timeout after it stops answering.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    killed: Vec<usize>,
    dirs: Vec<PathBuf>,
}

impl RedisCluster {
    /// `masters` masters and as many replicas; `node_timeout` is how long a master may
    /// not answer before its replica takes over (Redis's default is 15 s).
    pub async fn spawn(masters: usize, node_timeout: Duration) -> Self {
        let mut nodes = Vec::new();
        let mut dirs = Vec::new();
        for _ in 0..masters * 2 {
            let port = cluster_port();
            let dir = temp_dir("redis-cluster", port);
            std::fs::create_dir_all(&dir).expect("the node's directory");
            let args = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                &node_timeout.as_millis().to_string(),
                "--dir",
                &dir.display().to_string(),
            ];
            nodes.push(RedisServer::spawn_with(port, args.map(String::from).to_vec()).await);
            dirs.push(dir);
        }
        let mut create: Vec<String> = ["--cluster", "create"].map(String::from).to_vec();
        create.extend(nodes.iter().map(|node| format!("127.0.0.1:{}", node.port)));
        create.extend(["--cluster-replicas", "1", "--cluster-yes"].map(String::from));
        let created = tokio::process::Command::new("redis-cli")
            .args(&create)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .status()
            .await
            .expect("run redis-cli (package redis-tools)");
        assert!(created.success(), "redis-cli --cluster create");
        let cluster = RedisCluster { nodes, killed: Vec::new(), dirs };
        wait_until("every node to see the cluster ok and every replica in sync", || async {
            for node in &cluster.nodes {
                let fields = replication(node.url()).await;
                let in_sync = match fields.get("role").map(String::as_str) {
                    Some("master") => fields.get("connected_slaves").is_some_and(|n| n == "1"),
                    Some("slave") => fields.get("master_link_status").is_some_and(|s| s == "up"),
                    _ => false,
                };
                if !in_sync || !cluster.info(node.port).await.contains("cluster_state:ok") {
                    return false;
                }
            }
            true
        })
        .await;
        cluster
    }

    async fn info(&self, port: u16) -> String {
        let Ok(mut connection) = self.connection_to(port).await else { return String::new() };
        redis::cmd("CLUSTER").arg("INFO").query_async(&mut connection).await.unwrap_or_default()
    }

    async fn connection_to(&self, port: u16) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        redis::Client::open(format!("redis://127.0.0.1:{port}"))?.get_multiplexed_async_connection().await
    }

    /// The node that serves `key` as master now; none while its master has failed and
    /// no replica took over yet.
    pub async fn master_of(&self, key: &str) -> Option<usize> {
        let live = (0..self.nodes.len()).find(|index| !self.killed.contains(index)).expect("a live node");
        let mut connection = self.connection_to(self.nodes[live].port).await.expect("a connection");
        let slot: u16 =
            redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).query_async(&mut connection).await.unwrap();
        let nodes: String = redis::cmd("CLUSTER").arg("NODES").query_async(&mut connection).await.unwrap();
        // `<id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch> <link> <slot ranges…>`
        let port = nodes
            .lines()
            .map(|line| line.split_whitespace().collect::<Vec<_>>())
            .filter(|fields| fields.len() > 8 && fields[2].contains("master") && !fields[2].contains("fail"))
            .find(|fields| {
                fields[8..].iter().any(|range| {
                    let (first, last) = range.split_once('-').unwrap_or((range, range));
                    first.parse::<u16>().is_ok_and(|first| first <= slot)
                        && last.parse::<u16>().is_ok_and(|last| slot <= last)
                })
            })
            .and_then(|fields| fields[1].split(['@', ':']).nth(1)?.parse::<u16>().ok())?;
        Some(self.nodes.iter().position(|node| node.port == port).expect("one of ours"))
    }

    /// SIGKILL on one node.
    pub fn kill(&mut self, index: usize) {
        self.nodes[index].kill();
        self.killed.push(index);
    }
}

impl Endpoint for RedisCluster {
    fn url(&self) -> String {
        self.nodes.iter().map(RedisServer::url).collect::<Vec<_>>().join(",")
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        for dir in &self.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The master's name the Sentinels watch.
pub const SENTINEL_MASTER: &str = "tcpc";
/// The password of the master and the replica, and the Sentinels' own: the services
/// must give each to the right server.
const NODE_PASSWORD: &str = "node-pw";
const SENTINEL_PASSWORD: &str = "sentinel-pw";

/// A Redis master and its replica, watched by three Sentinels (quorum 2) that fail the
/// master over a second after it stops answering; each asks for a password.
pub struct RedisSentinels {
    pub master: RedisServer,
    pub replica: RedisServer,
    sentinels: Vec<(u16, Process)>,
    dir: PathBuf,
}

impl RedisSentinels {
    pub async fn spawn() -> Self {
        let auth = ["--requirepass", NODE_PASSWORD, "--masterauth", NODE_PASSWORD].map(String::from);
        let master = RedisServer::spawn_with(free_port(), auth.to_vec()).await;
        let mut replica_of =
            ["--replicaof", "127.0.0.1", &master.port.to_string()].map(String::from).to_vec();
        replica_of.extend(auth);
        let replica = RedisServer::spawn_with(free_port(), replica_of).await;
        let dir = temp_dir("sentinels", master.port);
        std::fs::create_dir_all(&dir).expect("the Sentinels' directory");
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            // A Sentinel rewrites its configuration file: one each.
            let config = dir.join(format!("sentinel-{port}.conf"));
            let text = format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\nrequirepass {SENTINEL_PASSWORD}\n\
                 sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {master} 2\n\
                 sentinel auth-pass {SENTINEL_MASTER} {NODE_PASSWORD}\n\
                 sentinel sentinel-pass {SENTINEL_PASSWORD}\n\
                 sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
                 sentinel failover-timeout {SENTINEL_MASTER} 5000\n",
                dir = dir.display(),
                master = master.port,
            );
            std::fs::write(&config, text).expect("a Sentinel's configuration");
            let process =
                Process::start("redis-server", &[config.display().to_string(), "--sentinel".to_owned()]);
            sentinels.push((port, process));
        }
        let set = RedisSentinels { master, replica, sentinels, dir };
        wait_until("the replica in sync and each Sentinel aware of the others and of it", || async {
            let replica = format!("redis://:{NODE_PASSWORD}@127.0.0.1:{}", set.replica.port);
            if replication(replica).await.get("master_link_status").is_none_or(|s| s != "up") {
                return false;
            }
            for (port, _) in &set.sentinels {
                let fields = set.watched(*port).await;
                if fields.get("num-other-sentinels").is_none_or(|n| n != "2")
                    || fields.get("num-slaves").is_none_or(|n| n != "1")
                {
                    return false;
                }
            }
            true
        })
        .await;
        set
    }

    /// What a Sentinel knows of the master (`SENTINEL MASTER`), or nothing.
    async fn watched(&self, port: u16) -> HashMap<String, String> {
        let url = format!("redis://:{SENTINEL_PASSWORD}@127.0.0.1:{port}");
        let Ok(client) = redis::Client::open(url) else { return HashMap::new() };
        let Ok(mut connection) = client.get_multiplexed_async_connection().await else {
            return HashMap::new();
        };
        redis::cmd("SENTINEL")
            .arg("MASTER")
            .arg(SENTINEL_MASTER)
            .query_async(&mut connection)
            .await
            .unwrap_or_default()
    }
}

impl Endpoint for RedisSentinels {
    fn url(&self) -> String {
        let sentinels: Vec<String> =
            self.sentinels.iter().map(|(port, _)| format!("127.0.0.1:{port}")).collect();
        format!(
            "redis+sentinel://:{NODE_PASSWORD}@{}/{SENTINEL_MASTER}?sentinel_password={SENTINEL_PASSWORD}",
            sentinels.join(",")
        )
    }
}

impl Drop for RedisSentinels {
    fn drop(&mut self) {
        for (_, sentinel) in &mut self.sentinels {
            sentinel.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
