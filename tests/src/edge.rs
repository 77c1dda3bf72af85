//! An edge-gateway run in-process on loopback listeners, stopped on drop.

use std::net::SocketAddr;

use clap::Parser;
use edge_gateway::{Config, Listeners};
use tcpc_proto::v1::edge_gateway_client::EdgeGatewayClient;
use tokio::sync::oneshot;

use crate::auth::AuthDouble;
use crate::servers::{Endpoint, NatsServer, RedisServer};
use crate::wait_until;

/// What an edge test runs on: real nats-server and redis-server, and the workers' auth
/// responder as a test double.
pub struct EdgeWorld {
    pub nats: NatsServer,
    pub redis: RedisServer,
    pub auth: AuthDouble,
}

impl EdgeWorld {
    pub async fn start() -> Self {
        crate::init_logging();
        let (nats, redis) = tokio::join!(NatsServer::spawn(), RedisServer::spawn());
        let auth = AuthDouble::spawn(nats.client().await).await;
        EdgeWorld { nats, redis, auth }
    }
}

pub struct TestEdge {
    pub pod: String,
    pub official: SocketAddr,
    pub custom: SocketAddr,
    /// The TLS ports, when the configuration turned them on.
    pub official_tls: Option<SocketAddr>,
    pub custom_tls: Option<SocketAddr>,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// For load tools: every simulated device connects from 127.0.0.1, which the per-source
/// limits would otherwise read as one address flooding the pod.
pub fn one_address_load(config: &mut Config) {
    config.limits.max_connections_per_source = 0;
    config.limits.auth_rate_per_source = u32::MAX;
    config.limits.auth_burst_per_source = u32::MAX;
    config.limits.ban_after = u32::MAX;
}

impl TestEdge {
    /// Starts an edge named `pod`; `tweak` adjusts its configuration (short timeouts).
    /// Returns once it reports ready.
    pub async fn spawn(
        nats: &dyn Endpoint,
        redis: &dyn Endpoint,
        pod: &str,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let any = "127.0.0.1:0";
        let mut config = Config::try_parse_from([
            "edge-gateway",
            "--pod-name",
            pod,
            "--nats-url",
            &nats.url(),
            "--redis-url",
            &redis.url(),
            "--official-listen",
            any,
            "--custom-listen",
            any,
            "--grpc-listen",
            any,
            "--metrics-listen",
            any,
            "--drain-window",
            "200ms",
            "--publish-timeout",
            "2s",
            "--log-format",
            "pretty",
        ])
        .expect("valid flags");
        tweak(&mut config);
        let listeners = Listeners::bind(&config).await.expect("bind loopback listeners");
        let addr = |l: &tokio::net::TcpListener| l.local_addr().unwrap();
        let devices = &listeners.devices;
        let (official, custom, grpc, metrics) = (
            addr(devices.official.as_ref().expect("a TP port")),
            addr(devices.custom.as_ref().expect("a custom port")),
            addr(&listeners.grpc),
            addr(&listeners.metrics),
        );
        let (official_tls, custom_tls) =
            (devices.official_tls.as_ref().map(addr), devices.custom_tls.as_ref().map(addr));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            edge_gateway::run(config, listeners, async {
                let _ = stopped.await;
            })
            .await
            .expect("edge ran");
        });
        let edge = TestEdge {
            pod: pod.to_owned(),
            official,
            custom,
            official_tls,
            custom_tls,
            grpc,
            metrics,
            stop: Some(stop),
            task: Some(task),
        };
        wait_until("the edge to be ready", || async { edge.http_status("/readyz").await == Some(200) }).await;
        edge
    }

    /// The status code of a GET on the metrics port.
    pub async fn http_status(&self, path: &str) -> Option<u16> {
        let body = self.http_get(path).await?;
        body.split_whitespace().nth(1)?.parse().ok()
    }

    /// A series' value in the edge's `/metrics` (0 when absent), e.g.
    /// `edge_connections{listener="official"}`.
    pub async fn metric(&self, series: &str) -> u64 {
        // Counters and gauges of the edge are whole numbers.
        crate::metric_in(&self.http_get("/metrics").await.unwrap_or_default(), series) as u64
    }

    /// The raw HTTP/1.0 response of a GET on the metrics port.
    pub async fn http_get(&self, path: &str) -> Option<String> {
        crate::http_get(self.metrics, path).await
    }

    pub async fn grpc_client(&self) -> EdgeGatewayClient<tonic::transport::Channel> {
        EdgeGatewayClient::connect(format!("http://{}", self.grpc)).await.expect("gRPC connection")
    }

    /// Drains and stops the edge.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("edge task");
        }
    }
}

impl Drop for TestEdge {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
