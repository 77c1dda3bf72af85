//! The edge-gateway: terminates device TCP, and knows framing, sessions, limits and
//! back-pressure — nothing of ThingsPanel or scripts.
//!
//! Data flow:
//! - `listener` accepts on the official (TP) and custom ports and spawns a
//!   `session` per connection, within the pod's connection limit.
//! - A session cuts the byte stream with [`codec`] (TP) or [`framing`] (custom),
//!   authenticates the device through the [`uplink`] bus (a worker answers), registers
//!   its route in [`routes`], and publishes each message as an envelope on the uplink
//!   bus, keeping a bounded window of unacknowledged publishes.
//! - Workers reach a session through `grpc` (Deliver, Disconnect), which queues into
//!   the session's mailbox in [`registry`].
//! - [`drain`] closes sessions gradually on shutdown; [`metrics`] holds the Prometheus
//!   metrics (served with `/healthz` and `/readyz` by `tcpc_observe`); [`config`] holds
//!   every flag.

pub mod codec;
pub mod config;
pub mod drain;
pub mod framing;
mod grpc;
mod listener;
pub mod metrics;
pub mod registry;
pub mod routes;
mod session;
pub mod uplink;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tcpc_proto::v1::Protocol;
use tcpc_proto::v1::edge_gateway_server::EdgeGatewayServer;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use config::Config;
use metrics::Metrics;
use registry::{ConnectionIds, Registry};
use routes::{RedisRoutes, RouteStore};
use uplink::{NatsBus, UplinkBus};

/// What every session and server of the pod shares.
pub(crate) struct Shared {
    pub config: Config,
    pub pod: String,
    pub grpc_addr: String,
    pub bus: Arc<dyn UplinkBus>,
    pub routes: Arc<dyn RouteStore>,
    pub registry: Registry,
    pub metrics: Arc<Metrics>,
    pub ids: ConnectionIds,
    pub connection_limit: Arc<Semaphore>,
}

/// The pod's pre-bound listeners (tests bind port 0 and know the ports up front).
pub struct Listeners {
    pub official: TcpListener,
    pub custom: TcpListener,
    pub grpc: TcpListener,
    pub metrics: TcpListener,
}

impl Listeners {
    /// Binds every listener of `config`.
    ///
    /// # Errors
    /// An address is in use or not allowed.
    pub async fn bind(config: &Config) -> Result<Self, EdgeError> {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr).await.map_err(|source| EdgeError::Bind { addr, source })
        };
        Ok(Listeners {
            official: bind(config.official_listen).await?,
            custom: bind(config.custom_listen).await?,
            grpc: bind(config.grpc_listen).await?,
            metrics: bind(config.metrics_listen).await?,
        })
    }
}

/// The edge could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("uplink bus: {0}")]
    Bus(#[from] uplink::BusError),
    #[error("route store: {0}")]
    Routes(#[from] routes::RouteError),
    #[error("local address: {0}")]
    LocalAddr(#[source] std::io::Error),
}

/// Runs the edge with NATS and Redis until `shutdown` resolves, then drains.
///
/// # Errors
/// Invalid configuration or URLs. Outages of NATS or Redis are not errors: the edge
/// starts and degrades (see the crate README's failure rules).
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), EdgeError> {
    config.validate()?;
    let bus = Arc::new(NatsBus::connect(&config.nats_url, config.limits.publish_timeout).await?);
    let routes = Arc::new(RedisRoutes::connect(&config.redis_url, config.limits.publish_timeout)?);
    let ensure = CancellationToken::new();
    let stream_task = tokio::spawn({
        let (bus, ensure) = (bus.clone(), ensure.clone());
        async move { bus.ensure_stream(&ensure).await }
    });
    let result = run_with(config, listeners, Seams { bus, routes, extra_metrics: None }, shutdown).await;
    ensure.cancel();
    let _ = stream_task.await;
    result
}

/// What the edge runs on: NATS and Redis, or the all-in-one's in-process seams.
pub struct Seams {
    pub bus: Arc<dyn UplinkBus>,
    pub routes: Arc<dyn RouteStore>,
    /// More metrics for the same `/metrics` (the all-in-one's worker).
    pub extra_metrics: Option<Arc<dyn Fn() -> String + Send + Sync>>,
}

/// Runs the edge on `seams` until `shutdown` resolves, then drains.
///
/// # Errors
/// A listener's local address cannot be read.
pub async fn run_with(
    config: Config,
    listeners: Listeners,
    seams: Seams,
    shutdown: impl Future<Output = ()>,
) -> Result<(), EdgeError> {
    let Seams { bus, routes, extra_metrics } = seams;
    config.validate()?;
    let grpc_addr = config.advertised(listeners.grpc.local_addr().map_err(EdgeError::LocalAddr)?);
    let metrics = Arc::new(Metrics::default());
    let shared = Arc::new(Shared {
        pod: config.pod(),
        grpc_addr,
        bus: bus.clone(),
        routes,
        registry: Registry::default(),
        metrics: metrics.clone(),
        ids: ConnectionIds::default(),
        connection_limit: Arc::new(Semaphore::new(config.limits.max_connections)),
        config,
    });
    info!(pod = %shared.pod, grpc = %shared.grpc_addr, "edge-gateway starting");

    let accepting = CancellationToken::new();
    let sessions = TaskTracker::new();
    let servers = TaskTracker::new();
    let draining = Arc::new(AtomicBool::new(false));
    for (listener, protocol) in
        [(listeners.official, Protocol::Official), (listeners.custom, Protocol::Custom)]
    {
        servers.spawn(listener::accept_loop(
            listener,
            protocol,
            shared.clone(),
            sessions.clone(),
            accepting.clone(),
        ));
    }
    // Stops the servers once the sessions are gone (or the drain gave up on them).
    let stopped = CancellationToken::new();
    servers.spawn({
        let service = EdgeGatewayServer::new(grpc::EdgeGatewayService { shared: shared.clone() });
        // No Nagle: a Deliver answer is one small frame, and delayed ACKs would hold it.
        let incoming = tonic::transport::server::TcpIncoming::from(listeners.grpc).with_nodelay(Some(true));
        let stopped = stopped.clone();
        async move {
            let served = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, stopped.cancelled())
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "gRPC server failed");
            }
        }
    });
    servers.spawn({
        let health = tcpc_observe::Health {
            metrics: Arc::new(move || {
                let mut text = metrics.render();
                if let Some(extra) = &extra_metrics {
                    // One exposition: a single `# EOF`, at the end.
                    text.truncate(text.rfind("# EOF").unwrap_or(text.len()));
                    text.push_str(&extra());
                }
                text
            }),
            ready: Arc::new({
                let bus = bus.clone();
                move || bus.is_ready()
            }),
            draining: draining.clone(),
        };
        let stopped = stopped.clone();
        async move {
            let served = tcpc_observe::serve(listeners.metrics, health, stopped.cancelled_owned()).await;
            if let Err(error) = served {
                tracing::error!(%error, "metrics server failed");
            }
        }
    });
    servers.spawn({
        let (shared, stopped) = (shared.clone(), stopped.clone());
        async move {
            routes::keep_pod_alive(&*shared.routes, &shared.pod, &shared.grpc_addr, stopped).await;
        }
    });
    servers.close();

    shutdown.await;
    // Readiness first, so that load balancers stop sending; then stop accepting and
    // close the sessions gradually; then a hard deadline.
    draining.store(true, Ordering::Release);
    accepting.cancel();
    info!(sessions = shared.registry.len(), window = ?shared.config.limits.drain_window, "draining");
    drain::spread_closes(&shared.registry, shared.config.limits.drain_window).await;
    sessions.close();
    // A closing session flushes its window for at most 10 s; past that it is abandoned
    // (its uplinks were not stored, which it logged) and dies with the process.
    if tokio::time::timeout(Duration::from_secs(15), sessions.wait()).await.is_err() {
        warn!(left = shared.registry.len(), "sessions still open after the drain; abandoning them");
    }
    stopped.cancel();
    servers.wait().await;
    info!("edge-gateway stopped");
    Ok(())
}
