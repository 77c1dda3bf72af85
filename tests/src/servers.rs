//! Real `redis-server` and `nats-server` processes on free loopback ports: single
//! servers, and clusters of them (a JetStream cluster, a Redis Cluster, Redis behind
//! Sentinel, see `clusters`).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::wait_until;

/// Where the services under test find a NATS or a Redis: its `NATS_URL` or `REDIS_URL`,
/// one server's or a cluster's.
pub trait Endpoint {
    fn url(&self) -> String;
}

/// A free loopback port (bound, read, released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// A temporary directory of this test process, named after `what` and a port.
pub(crate) fn temp_dir(what: &str, port: u16) -> PathBuf {
    std::env::temp_dir().join(format!("tcpc-{what}-{}-{port}", std::process::id()))
}

async fn accepts(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
}

/// A child process, killed (SIGKILL: a crash, not a shutdown) on drop.
#[derive(Default)]
pub struct Process(Option<Child>);

impl Process {
    /// Starts `program` with its output discarded.
    pub fn start(program: impl AsRef<std::ffi::OsStr>, args: &[String]) -> Self {
        let program = program.as_ref();
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {program:?} (see README: the test command installs it): {e}")
            });
        Process(Some(child))
    }

    /// Takes over a child started otherwise.
    pub fn adopt(child: Child) -> Self {
        Process(Some(child))
    }

    /// SIGTERM (a shutdown, not a crash); the process then drains and exits by itself.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Sends a signal by name (`TERM`, `STOP`, `CONT`).
    pub fn signal(&self, name: &str) {
        if let Some(child) = &self.0 {
            let sent = Command::new("kill").args([&format!("-{name}"), &child.id().to_string()]).status();
            assert!(sent.is_ok_and(|status| status.success()), "SIG{name} sent");
        }
    }

    /// Whether the process has exited (reaped if so).
    pub fn exited(&mut self) -> bool {
        self.0.as_mut().is_none_or(|child| child.try_wait().ok().flatten().is_some())
    }

    /// SIGKILL, and wait for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `redis-server` that keeps nothing on disk (a restart comes back empty).
pub struct RedisServer {
    pub port: u16,
    /// Arguments beyond the standalone server's (cluster mode, replication).
    extra: Vec<String>,
    process: Process,
}

impl RedisServer {
    pub async fn spawn() -> Self {
        Self::spawn_with(free_port(), Vec::new()).await
    }

    /// A server on `port` with `extra` arguments; returns once it accepts connections.
    pub(crate) async fn spawn_with(port: u16, extra: Vec<String>) -> Self {
        let mut server = RedisServer { port, extra, process: Process::default() };
        server.start().await;
        server
    }

    async fn start(&mut self) {
        let port = self.port.to_string();
        // DEBUG SLEEP lets a test make Redis slow (a loaded server, a failover).
        let mut args = [
            "--port",
            &port,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--enable-debug-command",
            "local",
        ]
        .map(String::from)
        .to_vec();
        args.extend(self.extra.iter().cloned());
        self.process = Process::start("redis-server", &args);
        wait_until("redis-server to accept connections", || accepts(self.port)).await;
    }

    /// SIGKILL: the server dies (a crash, not a shutdown).
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Kills the server (SIGKILL) and starts it again on the same port, empty: what a
    /// failover to a replica that had nothing, or a restart without persistence, does.
    pub async fn restart_empty(&mut self) {
        self.process.kill();
        self.start().await;
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A connection for the test's own checks.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("valid url")
            .get_multiplexed_async_connection()
            .await
            .expect("redis connection")
    }
}

impl Endpoint for RedisServer {
    fn url(&self) -> String {
        RedisServer::url(self)
    }
}

/// A `nats-server -js` with its own store directory; can be stopped and started again
/// on the same port with the same store.
pub struct NatsServer {
    pub port: u16,
    store: PathBuf,
    /// Arguments beyond a lone server's (its name and routes in a cluster).
    extra: Vec<String>,
    process: Process,
}

impl NatsServer {
    pub async fn spawn() -> Self {
        let mut server = Self::new(free_port(), Vec::new());
        server.start().await;
        server
    }

    /// A server not yet started, on `port` with `extra` arguments.
    pub(crate) fn new(port: u16, extra: Vec<String>) -> Self {
        NatsServer { port, store: temp_dir("nats", port), extra, process: Process::default() }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) and waits until JetStream answers.
    pub async fn start(&mut self) {
        self.launch();
        self.wait_for_jetstream().await;
    }

    /// Starts the process without waiting: a cluster's JetStream answers only once a
    /// majority of its servers runs.
    pub(crate) fn launch(&mut self) {
        let mut args = [
            "-a",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-js",
            "-sd",
            &self.store.display().to_string(),
        ]
        .map(String::from)
        .to_vec();
        args.extend(self.extra.iter().cloned());
        self.process = Process::start("nats-server", &args);
    }

    /// Waits until JetStream answers without an error (in a cluster: a meta leader is
    /// elected).
    pub(crate) async fn wait_for_jetstream(&self) {
        let url = self.url();
        wait_until("nats-server JetStream to answer", || {
            let url = url.clone();
            async move {
                let Ok(client) = async_nats::connect(&url).await else { return false };
                // The raw API call: its reply shape differs across server versions.
                client.request("$JS.API.INFO", "".into()).await.is_ok_and(|reply| {
                    !reply.payload.is_empty()
                        && !String::from_utf8_lossy(&reply.payload).contains("\"error\"")
                })
            }
        })
        .await;
    }

    /// Kills the server (SIGKILL: an outage, not a shutdown) and waits for it.
    pub fn stop(&mut self) {
        self.process.kill();
    }

    /// A client for the test's own checks.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(self.url())
            .await
            .expect("nats connection")
    }
}

impl Endpoint for NatsServer {
    fn url(&self) -> String {
        NatsServer::url(self)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.process.kill();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}
