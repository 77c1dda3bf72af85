//! Real `redis-server` and `nats-server` processes on free loopback ports.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::wait_until;

/// A free loopback port (bound, read, released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
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
    process: Process,
}

impl RedisServer {
    pub async fn spawn() -> Self {
        let mut server = RedisServer { port: free_port(), process: Process::default() };
        server.start().await;
        server
    }

    async fn start(&mut self) {
        let port = self.port.to_string();
        // DEBUG SLEEP lets a test make Redis slow (a loaded server, a failover).
        let args = [
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
        .map(String::from);
        self.process = Process::start("redis-server", &args);
        wait_until("redis-server to accept connections", || accepts(self.port)).await;
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

/// A `nats-server -js` with its own store directory; can be stopped and started again
/// on the same port with the same store.
pub struct NatsServer {
    pub port: u16,
    store: PathBuf,
    process: Process,
}

impl NatsServer {
    pub async fn spawn() -> Self {
        let port = free_port();
        let store = std::env::temp_dir().join(format!("tcpc-nats-{}-{port}", std::process::id()));
        let mut server = NatsServer { port, store, process: Process::default() };
        server.start().await;
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) and waits until JetStream answers.
    pub async fn start(&mut self) {
        let args = [
            "-a",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-js",
            "-sd",
            &self.store.display().to_string(),
        ]
        .map(String::from);
        self.process = Process::start("nats-server", &args);
        let url = self.url();
        wait_until("nats-server JetStream to answer", || {
            let url = url.clone();
            async move {
                let Ok(client) = async_nats::connect(&url).await else { return false };
                // The raw API call: its reply shape differs across server versions.
                client.request("$JS.API.INFO", "".into()).await.is_ok_and(|reply| !reply.payload.is_empty())
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

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.process.kill();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}
