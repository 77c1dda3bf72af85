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

/// Waits until `ready` says the server answers as the one `process` runs, or until the
/// process exits first: false then. A free port is only free when it is read: another
/// test's server can take it before this one binds it, and this one then exits, while
/// the port answers (as someone else's server). Panics after [`crate::DEADLINE`].
async fn ready_unless_exited<F, Fut>(what: &str, process: &mut Process, mut ready: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + crate::DEADLINE;
    loop {
        if process.exited() {
            return false;
        }
        if ready().await {
            return true;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The process id a Redis on `port` reports (`INFO server`), if one answers without a
/// password.
async fn redis_process_id(port: u16) -> Option<u32> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    let connect = client.get_multiplexed_async_connection();
    let mut connection = tokio::time::timeout(Duration::from_secs(1), connect).await.ok()?.ok()?;
    let info: String = redis::cmd("INFO").arg("server").query_async(&mut connection).await.ok()?;
    info.lines().find_map(|line| line.strip_prefix("process_id:")).and_then(|id| id.trim().parse().ok())
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

    /// Its process id, while it runs.
    pub fn id(&self) -> Option<u32> {
        self.0.as_ref().map(Child::id)
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
        loop {
            let mut server =
                RedisServer { port: free_port(), extra: Vec::new(), process: Process::default() };
            if server.try_start().await {
                return server;
            }
        }
    }

    /// A server on `port` with `extra` arguments; returns once it accepts connections.
    pub(crate) async fn spawn_with(port: u16, extra: Vec<String>) -> Self {
        let mut server = RedisServer { port, extra, process: Process::default() };
        server.start().await;
        server
    }

    async fn start(&mut self) {
        assert!(self.try_start().await, "redis-server exited at start: port {} taken", self.port);
    }

    /// Starts the server and waits until it answers on its port; false if it exited first
    /// (see [`ready_unless_exited`]).
    async fn try_start(&mut self) -> bool {
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
        let (port, pid) = (self.port, self.process.id());
        // Without a password the server must say it is this process; with one, that it
        // listens (and the exit check covers a lost port).
        let password = self.extra.iter().any(|arg| arg == "--requirepass");
        ready_unless_exited("redis-server to answer", &mut self.process, || async move {
            if password { accepts(port).await } else { redis_process_id(port).await == pid }
        })
        .await
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
    /// The name a lone server is given, unique to this test process's servers: the
    /// server on the port must be this one (see [`ready_unless_exited`]).
    name: Option<String>,
    process: Process,
}

/// Lone nats-servers started by this test process, for their unique names.
static NATS_STARTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Whether the NATS on `url` answers JetStream calls without an error, and (given
/// `name`) is the server of that name.
async fn jetstream_answers(url: &str, name: Option<&str>) -> bool {
    let Ok(client) = async_nats::connect(url).await else { return false };
    if name.is_some_and(|name| client.server_info().server_name != name) {
        return false;
    }
    // The raw API call: its reply shape differs across server versions.
    client.request("$JS.API.INFO", "".into()).await.is_ok_and(|reply| {
        !reply.payload.is_empty() && !String::from_utf8_lossy(&reply.payload).contains("\"error\"")
    })
}

impl NatsServer {
    pub async fn spawn() -> Self {
        loop {
            let port = free_port();
            let started = NATS_STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let name = format!("tcpc-test-{}-{started}", std::process::id());
            let mut server = Self::new(port, vec!["--server_name".to_owned(), name.clone()]);
            // Its own store: a server that lost its port to another of this process
            // must not remove that one's store when it is dropped.
            server.store = std::env::temp_dir().join(&name);
            server.name = Some(name);
            server.launch();
            if server.ready().await {
                return server;
            }
        }
    }

    /// A server not yet started, on `port` with `extra` arguments.
    pub(crate) fn new(port: u16, extra: Vec<String>) -> Self {
        NatsServer { port, store: temp_dir("nats", port), extra, name: None, process: Process::default() }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) and waits until JetStream answers.
    pub async fn start(&mut self) {
        self.launch();
        assert!(self.ready().await, "nats-server exited at start: port {} taken", self.port);
    }

    /// Waits until this server answers JetStream calls; false if it exited first.
    async fn ready(&mut self) -> bool {
        let (url, name) = (self.url(), self.name.clone());
        ready_unless_exited("nats-server JetStream to answer", &mut self.process, || {
            let (url, name) = (url.clone(), name.clone());
            async move { jetstream_answers(&url, name.as_deref()).await }
        })
        .await
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
            async move { jetstream_answers(&url, None).await }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_port_another_server_holds_is_not_taken_for_a_new_one() {
        // Listening, never answering: what a port lost to another test's server looks like
        // to this one's readiness check.
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let mut redis = RedisServer { port, extra: Vec::new(), process: Process::default() };
        assert!(!redis.try_start().await, "redis-server could not listen: not ready");
        let mut nats = NatsServer::new(port, Vec::new());
        nats.launch();
        assert!(!nats.ready().await, "nats-server could not listen: not ready");
    }
}
