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
//!   Before authentication, [`sources`] limits each client address (its address from
//!   the [`proxy`] header behind a load balancer).
//! - Workers reach a session through `grpc` (Deliver, Disconnect), which queues into
//!   the session's mailbox in [`registry`].
//! - `healing` re-asserts the pod's routes periodically and reaps dead pods' routes.
//! - [`drain`] closes sessions gradually on shutdown; [`metrics`] holds the Prometheus
//!   metrics (served with `/healthz` and `/readyz` by `tcpc_observe`); [`config`] holds
//!   every flag.

pub mod codec;
pub mod config;
pub mod deletion_cost;
pub mod drain;
pub mod framing;
mod grpc;
mod healing;
mod listener;
pub mod metrics;
pub mod proxy;
pub mod registry;
pub mod routes;
mod session;
mod sources;
pub mod tls;
pub mod uplink;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tcpc_proto::v1::Protocol;
use tcpc_proto::v1::edge_gateway_server::EdgeGatewayServer;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use config::Config;
use metrics::Metrics;
use registry::{ConnectionIds, Registry};
use routes::{RedisRoutes, RouteStore};
use sources::{SourceLimits, SourcePolicy};
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
    /// Authentications waiting on the workers (pod-wide bound).
    pub auth_slots: Semaphore,
    pub sources: SourceLimits,
    /// SIGTERM came: `/readyz` says 503, and sessions that finish authenticating now
    /// close at once.
    pub draining: Arc<AtomicBool>,
    /// When the whole shutdown must be over (set when the drain starts).
    pub shutdown_deadline: OnceLock<Instant>,
}

impl Shared {
    /// The per-connection message rate, if limited.
    pub fn rate_limit(&self) -> Option<session::rate::RateLimit> {
        let limits = &self.config.limits;
        (limits.rate_limit > 0)
            .then_some(session::rate::RateLimit { per_second: limits.rate_limit, burst: limits.rate_burst })
    }

    /// Until when a session that starts closing at `now` may flush what it read: the
    /// close flush budget, and during a shutdown what is left of it before the offline
    /// events must go out.
    pub fn flush_deadline(&self, now: Instant) -> Instant {
        let until = now + self.config.limits.close_flush;
        match self.shutdown_deadline.get() {
            Some(&end) => until.min(end.checked_sub(self.config.limits.publish_timeout).unwrap_or(now)),
            None => until,
        }
    }
}

/// The pod's pre-bound listeners (tests bind port 0 and know the ports up front).
pub struct Listeners {
    pub devices: DeviceListeners,
    pub grpc: TcpListener,
    pub metrics: TcpListener,
}

/// The device listeners; a port turned off has none.
pub struct DeviceListeners {
    pub official: Option<TcpListener>,
    pub custom: Option<TcpListener>,
    pub official_tls: Option<TcpListener>,
    pub custom_tls: Option<TcpListener>,
}

/// Binds a listener.
///
/// # Errors
/// The address is in use or not allowed.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, EdgeError> {
    TcpListener::bind(addr).await.map_err(|source| EdgeError::Bind { addr, source })
}

impl DeviceListeners {
    /// Binds the device ports that are on.
    ///
    /// # Errors
    /// An address is in use or not allowed.
    pub async fn bind(ports: &config::DevicePorts) -> Result<Self, EdgeError> {
        let bind_on = |listen: config::Listen| async move {
            match listen.0 {
                Some(addr) => bind(addr).await.map(Some),
                None => Ok(None),
            }
        };
        Ok(DeviceListeners {
            official: bind_on(ports.official_listen).await?,
            custom: bind_on(ports.custom_listen).await?,
            official_tls: bind_on(ports.official_tls_listen).await?,
            custom_tls: bind_on(ports.custom_tls_listen).await?,
        })
    }
}

impl Listeners {
    /// Binds every listener of `config`.
    ///
    /// # Errors
    /// An address is in use or not allowed.
    pub async fn bind(config: &Config) -> Result<Self, EdgeError> {
        Ok(Listeners {
            devices: DeviceListeners::bind(&config.ports).await?,
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
    #[error("device TLS")]
    Tls(#[from] tls::TlsError),
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
    config.check_urls()?;
    let bus = Arc::new(
        NatsBus::connect(
            &config.nats_url,
            config.limits.publish_timeout,
            config.limits.publish_linger,
            config.stream,
        )
        .await?,
    );
    let routes = Arc::new(RedisRoutes::connect(&config.redis_url, config.limits.publish_timeout)?);
    let ensure = CancellationToken::new();
    let stream_task = tokio::spawn({
        let (bus, ensure) = (bus.clone(), ensure.clone());
        async move { bus.keep_stream(&ensure).await }
    });
    let mut registry = tcpc_observe::MetricsRegistry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let seams = Seams { bus, routes, metrics, registry: Arc::new(registry), also_ready: None };
    let result = run_with(config, listeners, seams, shutdown).await;
    ensure.cancel();
    let _ = stream_task.await;
    result
}

/// What the edge runs on: NATS and Redis, or the all-in-one's in-process seams.
pub struct Seams {
    pub bus: Arc<dyn UplinkBus>,
    pub routes: Arc<dyn RouteStore>,
    /// The edge's metrics, registered in `registry`: the process's one registry, which
    /// the edge serves on its metrics port.
    pub metrics: Arc<Metrics>,
    pub registry: Arc<tcpc_observe::MetricsRegistry>,
    /// Readiness of the rest of the process (the all-in-one's worker), beside the bus's.
    pub also_ready: Option<Arc<dyn Fn() -> bool + Send + Sync>>,
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
    let Seams { bus, routes, metrics, registry: metrics_registry, also_ready } = seams;
    config.validate()?;
    let grpc_addr = config.advertised(listeners.grpc.local_addr().map_err(EdgeError::LocalAddr)?);
    let limits = &config.limits;
    let sources = SourceLimits::new(
        SourcePolicy {
            max_connections: if limits.max_connections_per_source == 0 {
                u32::MAX
            } else {
                limits.max_connections_per_source
            },
            auth_rate: session::rate::RateLimit {
                per_second: limits.auth_rate_per_source,
                burst: limits.auth_burst_per_source,
            },
            ban_after: limits.ban_after,
            ban_window: limits.ban_window,
            ban_for: limits.ban_for,
        },
        metrics.refused.clone(),
    );
    raise_open_files(limits.max_connections);
    let shared = Arc::new(Shared {
        pod: config.pod(),
        grpc_addr,
        bus: bus.clone(),
        routes,
        registry: Registry::default(),
        metrics: metrics.clone(),
        ids: ConnectionIds::default(),
        connection_limit: Arc::new(Semaphore::new(limits.max_connections)),
        auth_slots: Semaphore::new(limits.max_auth_in_flight),
        sources,
        draining: Arc::new(AtomicBool::new(false)),
        shutdown_deadline: OnceLock::new(),
        config,
    });
    info!(pod = %shared.pod, grpc = %shared.grpc_addr, "edge-gateway starting");

    let accepting = CancellationToken::new();
    let sessions = TaskTracker::new();
    let servers = TaskTracker::new();
    let tls = shared
        .config
        .ports
        .tls_files()
        .map(|files| serve_tls(files, &[], &shared, &servers, accepting.clone()))
        .transpose()?;
    let DeviceListeners { official, custom, official_tls, custom_tls } = listeners.devices;
    let ports = [
        (official, Protocol::Official, None),
        (custom, Protocol::Custom, None),
        (official_tls, Protocol::Official, tls.clone()),
        (custom_tls, Protocol::Custom, tls),
    ];
    for (listener, protocol, tls) in ports {
        let Some(listener) = listener else { continue };
        servers.spawn(listener::accept_loop(
            listener,
            protocol,
            tls,
            shared.clone(),
            sessions.clone(),
            accepting.clone(),
        ));
    }
    // Stops the servers once the sessions are gone (or the drain gave up on them).
    let stopped = CancellationToken::new();
    let grpc_tls = shared
        .config
        .grpc_security
        .tls()
        .map_err(config::ConfigError::from)?
        .map(|files| {
            let files = tls::TlsFiles { cert: files.cert, key: files.key, client_ca: Some(files.ca) };
            serve_tls(files, &[b"h2"], &shared, &servers, stopped.clone())
        })
        .transpose()?;
    servers.spawn({
        // A downlink is at most a frame; a larger request is refused before it is decoded.
        let service = EdgeGatewayServer::new(grpc::EdgeGatewayService { shared: shared.clone() })
            .max_decoding_message_size(shared.config.limits.max_frame + GRPC_ENVELOPE);
        let service = tonic::service::interceptor::InterceptedService::new(
            service,
            grpc::token_check(shared.config.grpc_security.grpc_token.clone()),
        );
        let stopped = stopped.clone();
        let server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_service(service);
        async move {
            let served = match grpc_tls {
                Some(tls) => {
                    let incoming = grpc::tls_incoming(listeners.grpc, tls, stopped.clone());
                    server.serve_with_incoming_shutdown(incoming, stopped.cancelled()).await
                }
                None => {
                    // No Nagle: a Deliver answer is one small frame, and delayed ACKs would hold it.
                    let incoming =
                        tonic::transport::server::TcpIncoming::from(listeners.grpc).with_nodelay(Some(true));
                    server.serve_with_incoming_shutdown(incoming, stopped.cancelled()).await
                }
            };
            if let Err(error) = served {
                tracing::error!(%error, "gRPC server failed");
            }
        }
    });
    servers.spawn({
        let health = tcpc_observe::Health {
            registry: metrics_registry,
            ready: Arc::new({
                let bus = bus.clone();
                move || bus.is_ready() && also_ready.as_ref().is_none_or(|ready| ready())
            }),
            draining: shared.draining.clone(),
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
    servers.spawn(healing::reassert_routes(
        shared.clone(),
        shared.config.limits.route_reassert,
        stopped.clone(),
    ));
    servers.spawn(healing::reap_dead_pods(shared.clone(), stopped.clone()));
    servers.spawn({
        let (shared, stopped) = (shared.clone(), stopped.clone());
        async move { sources::sweep_periodically(&shared.sources, SOURCE_SWEEP, stopped).await }
    });
    if shared.config.pod_deletion_cost.enabled() {
        servers.spawn(keep_deletion_cost(shared.clone(), stopped.clone()));
    }
    servers.close();

    shutdown.await;
    // One budget from here to exit: readiness first, so that load balancers stop
    // sending; stop accepting; close the sessions spread over the drain window; each
    // flushes what it read and publishes its offline event; then the bus is flushed.
    let deadline = Instant::now() + shared.config.limits.shutdown_timeout;
    let _ = shared.shutdown_deadline.set(deadline);
    shared.draining.store(true, Ordering::SeqCst);
    accepting.cancel();
    info!(sessions = shared.registry.len(), window = ?shared.config.limits.drain_window, "draining");
    drain::spread_closes(&shared.registry, shared.config.limits.drain_window).await;
    sessions.close();
    // Sessions flush until the deadline minus the offline events' publish timeout, so
    // this wait ends before the deadline unless the bus hangs.
    let flushed = deadline.checked_sub(FLUSH_MARGIN).unwrap_or_else(Instant::now);
    if tokio::time::timeout_at(flushed, sessions.wait()).await.is_err() {
        warn!(left = shared.registry.len(), "sessions still open at the shutdown deadline; abandoning them");
    }
    if let Err(error) = tokio::time::timeout(FLUSH_MARGIN, bus.flush()).await.unwrap_or(Ok(())) {
        warn!(%error, "uplink bus not flushed before exit");
    }
    stopped.cancel();
    servers.wait().await;
    info!("edge-gateway stopped");
    Ok(())
}

/// A TLS server on `files`, kept following them on `servers` until `stop`.
fn serve_tls(
    files: tls::TlsFiles,
    alpn: &[&[u8]],
    shared: &Shared,
    servers: &TaskTracker,
    stop: CancellationToken,
) -> Result<Arc<tls::ServerTls>, tls::TlsError> {
    let tls = Arc::new(tls::ServerTls::load(files, alpn)?);
    let (reloading, reloads) = (tls.clone(), shared.metrics.tls_reloads.clone());
    servers.spawn(async move { reloading.keep_reloading(reloads, stop).await });
    Ok(tls)
}

/// Keeps the pod's deletion cost near its connection count until `stop`; without a
/// Kubernetes client (no in-cluster account, no kubeconfig) it says so once and stops.
async fn keep_deletion_cost(shared: Arc<Shared>, stop: CancellationToken) {
    let client = match kube::Client::try_default().await {
        Ok(client) => client,
        Err(error) => {
            warn!(%error, "no Kubernetes API client; the pod deletion cost is not kept");
            return;
        }
    };
    let namespace =
        shared.config.pod_namespace.clone().unwrap_or_else(|| client.default_namespace().to_owned());
    let annotation = deletion_cost::PodAnnotation::new(client, &namespace, &shared.pod);
    info!(pod = %shared.pod, %namespace, "keeping the pod deletion cost");
    deletion_cost::keep_deletion_cost(&annotation, || shared.registry.len(), stop).await;
}

/// What a Deliver request holds beside its payload, at most (ids, command, deadline).
const GRPC_ENVELOPE: usize = 4096;
/// How often the per-source table drops what no longer counts.
const SOURCE_SWEEP: Duration = Duration::from_secs(10);
/// Files the edge holds beside its device connections (listeners, NATS, Redis, gRPC).
const FILES_BESIDE_CONNECTIONS: u64 = 256;
/// Kept at the end of the shutdown budget for flushing the bus.
const FLUSH_MARGIN: Duration = Duration::from_secs(1);

/// Raises the soft limit of open files to hold `max_connections`, and warns when the
/// hard limit does not allow it.
fn raise_open_files(max_connections: usize) {
    // Containers often start with a soft limit of 1024 under a far higher hard limit:
    // raised as far as allowed, as Go's runtime does for every program.
    let wanted = max_connections as u64 + FILES_BESIDE_CONNECTIONS;
    match rlimit::increase_nofile_limit(wanted) {
        Ok(limit) if limit < wanted => warn!(
            open_files = limit,
            max_connections,
            "the open files limit (hard RLIMIT_NOFILE) is below --max-connections: accepts will fail first"
        ),
        Ok(_) => {}
        Err(error) => warn!(%error, "the open files limit could not be read or raised"),
    }
}
