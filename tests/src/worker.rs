//! A script-worker process (its real main), killable with SIGKILL.

use std::net::SocketAddr;
use std::process::{Command, Stdio};

use crate::mqtt::Mosquitto;
use crate::platform::FakePlatform;
use crate::servers::{Endpoint, Process, free_port};
use crate::wait_until;

/// A free loopback address.
fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// One of the services' binaries, logging to the test's stderr at `RUST_LOG` (warn).
fn service(binary: &str) -> Command {
    let mut command = Command::new(crate::binary(binary));
    command
        .args(["--log-format", "pretty"])
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    command
}

pub struct WorkerProcess {
    pub name: String,
    pub metrics: SocketAddr,
    pub http: SocketAddr,
    process: Process,
}

impl WorkerProcess {
    /// Starts a worker named `name`; `extra` flags are appended. Returns once ready.
    pub async fn spawn(
        nats: &dyn Endpoint,
        redis: &dyn Endpoint,
        broker: &Mosquitto,
        platform: &FakePlatform,
        name: &str,
        extra: &[&str],
    ) -> Self {
        Self::spawn_with_env(nats, redis, broker, platform, name, extra, &[]).await
    }

    /// [`WorkerProcess::spawn`] with environment variables set for the process.
    pub async fn spawn_with_env(
        nats: &dyn Endpoint,
        redis: &dyn Endpoint,
        broker: &Mosquitto,
        platform: &FakePlatform,
        name: &str,
        extra: &[&str],
        env: &[(&str, String)],
    ) -> Self {
        let (metrics, http) = (loopback(), loopback());
        let mut command = service("worker-under-test");
        command
            .envs(env.iter().map(|(key, value)| (*key, value.as_str())))
            .args(["--nats-url", &nats.url(), "--redis-url", &redis.url(), "--mqtt-url", &broker.url()])
            .args(["--platform-url", &platform.url(), "--pod-name", name])
            .args(["--metrics-listen", &metrics.to_string(), "--http-listen", &http.to_string()])
            .args(extra);
        let process = Process::adopt(command.spawn().expect("start the worker"));
        let worker = WorkerProcess { name: name.to_owned(), metrics, http, process };
        wait_until("the worker to be ready", || async {
            worker.get("/readyz").await.is_some_and(|r| r.contains("200 OK"))
        })
        .await;
        worker
    }

    /// The raw response of a GET on the metrics port.
    pub async fn get(&self, path: &str) -> Option<String> {
        crate::http_get(self.metrics, path).await
    }

    /// A counter or gauge's value from /metrics (0 when absent).
    pub async fn metric(&self, series: &str) -> f64 {
        crate::metric_in(&self.get("/metrics").await.unwrap_or_default(), series)
    }

    /// SIGKILL: a crash, not a shutdown.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// SIGSTOP: alive but frozen (its leases expire while it holds them).
    pub fn freeze(&self) {
        self.process.signal("STOP");
    }

    /// SIGCONT: it resumes where it was frozen.
    pub fn thaw(&self) {
        self.process.signal("CONT");
    }

    /// SIGTERM, and wait until the worker has drained and exited.
    pub async fn stop(&mut self) {
        self.process.terminate();
        wait_until("the worker to drain and exit", || std::future::ready(self.process.exited())).await;
    }
}

/// An edge-gateway process (its real main), killable with SIGKILL.
pub struct EdgeProcess {
    pub pod: String,
    pub official: SocketAddr,
    pub custom: SocketAddr,
    pub metrics: SocketAddr,
    process: Process,
}

impl EdgeProcess {
    /// Starts an edge named `pod`; `extra` flags are appended. Returns once ready.
    pub async fn spawn(nats: &dyn Endpoint, redis: &dyn Endpoint, pod: &str, extra: &[&str]) -> Self {
        Self::spawn_with_env(nats, redis, pod, extra, &[]).await
    }

    /// [`EdgeProcess::spawn`] with environment variables set for the process.
    pub async fn spawn_with_env(
        nats: &dyn Endpoint,
        redis: &dyn Endpoint,
        pod: &str,
        extra: &[&str],
        env: &[(&str, String)],
    ) -> Self {
        let (official, custom, grpc, metrics) = (loopback(), loopback(), loopback(), loopback());
        let mut command = service("edge-under-test");
        command
            .envs(env.iter().map(|(key, value)| (*key, value.as_str())))
            .args(["--nats-url", &nats.url(), "--redis-url", &redis.url(), "--pod-name", pod])
            .args(["--official-listen", &official.to_string(), "--custom-listen", &custom.to_string()])
            .args(["--grpc-listen", &grpc.to_string(), "--metrics-listen", &metrics.to_string()])
            .args(["--drain-window", "200ms"])
            .args(extra);
        let process = Process::adopt(command.spawn().expect("start the edge"));
        let edge = EdgeProcess { pod: pod.to_owned(), official, custom, metrics, process };
        wait_until("the edge to be ready", || async {
            crate::http_get(edge.metrics, "/readyz").await.is_some_and(|r| r.contains("200 OK"))
        })
        .await;
        edge
    }

    /// SIGKILL: the pod dies with its sessions.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// SIGTERM, and wait until the edge has drained and exited.
    pub async fn stop(&mut self) {
        self.process.terminate();
        wait_until("the edge to drain and exit", || std::future::ready(self.process.exited())).await;
    }
}
