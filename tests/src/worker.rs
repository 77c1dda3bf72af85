//! A script-worker process (its real main), killable with SIGKILL.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use crate::mqtt::Mosquitto;
use crate::platform::FakePlatform;
use crate::servers::{NatsServer, RedisServer, free_port};
use crate::wait_until;

pub struct WorkerProcess {
    pub name: String,
    pub metrics: SocketAddr,
    pub http: SocketAddr,
    child: Option<Child>,
}

impl WorkerProcess {
    /// Starts a worker named `name`; `extra` flags are appended. Returns once ready.
    pub async fn spawn(
        nats: &NatsServer,
        redis: &RedisServer,
        broker: &Mosquitto,
        platform: &FakePlatform,
        name: &str,
        extra: &[&str],
    ) -> Self {
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new(crate::binary("worker-under-test"))
            .args(["--nats-url", &nats.url(), "--redis-url", &redis.url(), "--mqtt-url", &broker.url()])
            .args(["--platform-url", &platform.url(), "--pod-name", name, "--log-format", "pretty"])
            .args(["--metrics-listen", &metrics.to_string(), "--http-listen", &http.to_string()])
            .args(extra)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the worker");
        let worker = WorkerProcess { name: name.to_owned(), metrics, http, child: Some(child) };
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
        let text = self.get("/metrics").await.unwrap_or_default();
        text.lines()
            .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
            .unwrap_or(0.0)
    }

    /// SIGKILL: a crash, not a shutdown.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
