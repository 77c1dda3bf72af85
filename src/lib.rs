//! The all-in-one: edge-gateway and script-worker in one process.
//!
//! Same code paths as the two services; only the seams differ, chosen by which URLs are
//! configured:
//! - uplink bus: NATS JetStream with `NATS_URL` (then `REDIS_URL` too, for the
//!   partition leases), else [`local::LocalBus`] — the edge hands envelopes straight to
//!   the pipeline;
//! - route table: Redis with `REDIS_URL`, else [`local::LocalRoutes`];
//! - devices: the platform's HTTP API with `PLATFORM_URL`, else a devices file
//!   (`--devices`, by default the built-in `examples/devices.toml`);
//! - platform messages: MQTT with `MQTT_URL`, else JSON lines on stdout.

pub mod local;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use edge_gateway::routes::RouteStore;
use edge_gateway::uplink::UplinkBus;
use script_worker::platform::client::PlatformClient;
use script_worker::platform::mqtt::MqttConfig;
use script_worker::routes::RouteLookup;
use script_worker::source::{DeviceSource, FileDevices};
use tcpc_observe::{LogFormat, MetricsRegistry};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

/// The devices of `examples/devices.toml`, built in: what `cargo run --release` serves.
pub const EXAMPLE_DEVICES: &str = include_str!("../examples/devices.toml");

/// tcp-connectivity all-in-one: TCP devices (TP on 7653, custom on 7654) to ThingsPanel,
/// in one process.
#[derive(Debug, Parser)]
#[command(name = "tcp-connectivity", version, about, long_about = None)]
pub struct Config {
    #[command(flatten)]
    pub ports: edge_gateway::config::DevicePorts,
    #[arg(long, env = "EDGE_GRPC_LISTEN", default_value = "127.0.0.1:50051")]
    pub grpc_listen: SocketAddr,
    #[arg(long, env = "EDGE_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// NATS JetStream instead of the in-process bus (needs REDIS_URL as well): one URL,
    /// or several of a cluster, comma-separated.
    #[arg(long, env = "NATS_URL", hide_env_values = true)]
    pub nats_url: Option<String>,
    /// Redis instead of the in-process route table: one URL; several, comma-separated,
    /// for a Redis Cluster; or redis+sentinel://host:26379,host2:26379/<master-name>.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// The platform's MQTT broker; without it platform messages are JSON lines on stdout.
    #[arg(long, env = "MQTT_URL")]
    pub mqtt_url: Option<String>,
    /// ThingsPanel's HTTP base; without it devices come from --devices.
    #[arg(long, env = "PLATFORM_URL")]
    pub platform_url: Option<String>,
    /// Devices file (TOML) when there is no PLATFORM_URL; default: the built-in examples.
    #[arg(long, env = "DEVICES_FILE")]
    pub devices: Option<PathBuf>,
    #[arg(long, env = "METRICS_LISTEN", default_value = "0.0.0.0:9100")]
    pub metrics_listen: SocketAddr,
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "pretty")]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub limits: edge_gateway::config::Limits,
    #[command(flatten)]
    pub worker: script_worker::config::Settings,
}

/// The all-in-one could not start.
#[derive(Debug, thiserror::Error)]
pub enum AllInOneError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Edge(#[from] edge_gateway::EdgeError),
    #[error(transparent)]
    Worker(#[from] script_worker::WorkerError),
}

/// The all-in-one's pre-bound listeners.
pub struct Listeners {
    pub edge: edge_gateway::Listeners,
    pub http: TcpListener,
}

impl Listeners {
    /// Binds every listener of `config`.
    ///
    /// # Errors
    /// An address is in use or not allowed.
    pub async fn bind(config: &Config) -> Result<Self, AllInOneError> {
        Ok(Listeners {
            edge: edge_gateway::Listeners {
                devices: edge_gateway::DeviceListeners::bind(&config.ports).await?,
                grpc: edge_gateway::bind(config.grpc_listen).await?,
                metrics: edge_gateway::bind(config.metrics_listen).await?,
            },
            http: edge_gateway::bind(config.worker.http_listen).await?,
        })
    }
}

impl Config {
    /// The edge's configuration within the all-in-one.
    fn edge(&self, pod: &str) -> edge_gateway::Config {
        edge_gateway::Config {
            ports: self.ports.clone(),
            // The all-in-one's worker calls its own edge on loopback.
            grpc_security: edge_gateway::config::GrpcSecurity::default(),
            grpc_listen: self.grpc_listen,
            advertise_addr: self.advertise_addr.clone(),
            pod_name: Some(pod.to_owned()),
            nats_url: self.nats_url.clone().unwrap_or_default(),
            redis_url: self.redis_url.clone().unwrap_or_default(),
            metrics_listen: self.metrics_listen,
            // One process: there is no emptier replica to prefer.
            pod_deletion_cost: edge_gateway::config::KubeSwitch::Off,
            pod_namespace: None,
            uplink_partitions: self.worker.uplink_partitions,
            stream: self.worker.stream,
            limits: self.limits.clone(),
            log_format: self.log_format,
        }
    }

    /// Cross-field checks.
    ///
    /// # Errors
    /// What cannot work.
    pub fn validate(&self) -> Result<(), AllInOneError> {
        self.worker.validate().map_err(AllInOneError::Config)?;
        if self.nats_url.is_some() && self.redis_url.is_none() {
            return Err(AllInOneError::Config(
                "NATS_URL needs REDIS_URL too (uplink partition leases)".into(),
            ));
        }
        if self.platform_url.is_some() && self.devices.is_some() {
            return Err(AllInOneError::Config("give PLATFORM_URL or --devices, not both".into()));
        }
        if let Some(urls) = &self.nats_url {
            tcpc_proto::connect::nats_servers(urls)
                .map_err(|error| AllInOneError::Config(format!("NATS_URL: {error}")))?;
        }
        if let Some(url) = &self.redis_url {
            tcpc_proto::connect::check_redis_url(url)
                .map_err(|error| AllInOneError::Config(format!("REDIS_URL: {error}")))?;
        }
        self.edge("validate").validate().map_err(|e| AllInOneError::Config(e.to_string()))
    }
}

/// Runs the all-in-one until `shutdown`, then drains: the edge first (its sessions
/// flush what they read into the worker's pipeline), then the worker.
///
/// # Errors
/// Invalid configuration, an unreadable devices file, bad URLs.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AllInOneError> {
    config.validate()?;
    let pod = config.pod_name.clone().unwrap_or_else(script_worker::config::host_name);
    let settings = &config.worker;

    let redis = config.redis_url.as_deref().map(script_worker::redis).transpose()?;
    let platform = config.platform_url.as_deref().map(|url| PlatformClient::new(url, Duration::from_secs(5)));
    let devices: Arc<dyn DeviceSource> = match (&platform, &config.devices) {
        (Some(client), _) => {
            script_worker::platform::devices::PlatformDevices::new(client.clone(), redis.clone())
        }
        (None, Some(path)) => {
            Arc::new(FileDevices::load(path).map_err(|e| AllInOneError::Config(e.to_string()))?)
        }
        (None, None) => Arc::new(FileDevices::parse(EXAMPLE_DEVICES).map_err(AllInOneError::Config)?),
    };
    let local_routes = Arc::new(local::LocalRoutes::default());
    let (edge_routes, lookup): (Arc<dyn RouteStore>, Arc<dyn RouteLookup>) = match (&redis, &config.redis_url)
    {
        (Some(redis), Some(url)) => (
            Arc::new(
                edge_gateway::routes::RedisRoutes::connect(url, config.limits.publish_timeout)
                    .map_err(edge_gateway::EdgeError::from)?,
            ),
            Arc::new(script_worker::routes::RedisRoutes::new(redis.clone())),
        ),
        _ => (local_routes.clone(), local_routes),
    };
    let broker = config
        .mqtt_url
        .as_deref()
        .map(|url| {
            MqttConfig::from_url(
                url,
                &format!("tcpc-{pod}"),
                &settings.mqtt_username,
                settings.mqtt_password.clone(),
            )
        })
        .transpose()
        .map_err(AllInOneError::Config)?;
    // On NATS (then with Redis: validated) the worker's side is the service's: it owns
    // uplink partitions among the other replicas and answers auth requests.
    let bus = match (&config.nats_url, redis) {
        (Some(urls), Some(redis)) => {
            let nats = script_worker::nats(urls, "tcpc-all-in-one").await?;
            Some(script_worker::Bus { nats, redis, worker: pod.clone(), edge_pods: None })
        }
        _ => None,
    };
    let shared_bus = config.nats_url.as_deref().filter(|_| bus.is_some());
    // One registry for the process, served on the edge's metrics port.
    let mut registry = MetricsRegistry::default();
    let edge_metrics = Arc::new(edge_gateway::metrics::Metrics::new(&mut registry));
    let worker_metrics = Arc::new(script_worker::metrics::Metrics::new(&mut registry));
    let registry = Arc::new(registry);
    let seams = script_worker::Seams {
        devices,
        routes: lookup,
        edges: Arc::default(),
        broker,
        bus,
        platform,
        metrics: worker_metrics,
        registry: registry.clone(),
    };
    let worker = script_worker::Worker::start(settings, listeners.http, seams)?;
    info!(%pod, "tcp-connectivity all-in-one starting");

    let (ensure_stream, stream_keeper) = (CancellationToken::new(), TaskTracker::new());
    let edge_bus: Arc<dyn UplinkBus> = match shared_bus {
        Some(url) => {
            let bus = Arc::new(
                edge_gateway::uplink::NatsBus::connect(
                    url,
                    config.limits.publish_timeout,
                    config.limits.publish_linger,
                    settings.stream,
                )
                .await
                .map_err(edge_gateway::EdgeError::from)?,
            );
            stream_keeper.spawn({
                let (bus, stop) = (bus.clone(), ensure_stream.clone());
                async move { bus.keep_stream(&stop).await }
            });
            bus
        }
        None => {
            Arc::new(local::LocalBus { pipeline: worker.pipeline(), authenticator: worker.authenticator() })
        }
    };
    let seams = edge_gateway::Seams {
        bus: edge_bus,
        routes: edge_routes,
        metrics: edge_metrics,
        registry,
        also_ready: Some(worker.readiness()),
    };
    let edge = edge_gateway::run_with(config.edge(&pod), listeners.edge, seams, shutdown).await;
    ensure_stream.cancel();
    stream_keeper.close();
    stream_keeper.wait().await;
    worker.stop().await;
    edge.map_err(AllInOneError::from)
}
