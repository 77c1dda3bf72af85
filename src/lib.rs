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
use script_worker::dead_letter::{DeadLetters, JetStreamDeadLetters, LoggedDeadLetters};
use script_worker::platform::client::PlatformClient;
use script_worker::routes::RouteLookup;
use script_worker::sink::{JsonLines, PlatformSink};
use script_worker::source::{DeviceSource, FileDevices};
use tcpc_observe::LogFormat;
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
    #[arg(long, env = "EDGE_OFFICIAL_LISTEN", default_value = "0.0.0.0:7653")]
    pub official_listen: SocketAddr,
    #[arg(long, env = "EDGE_CUSTOM_LISTEN", default_value = "0.0.0.0:7654")]
    pub custom_listen: SocketAddr,
    #[arg(long, env = "EDGE_GRPC_LISTEN", default_value = "127.0.0.1:50051")]
    pub grpc_listen: SocketAddr,
    #[arg(long, env = "EDGE_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// NATS JetStream instead of the in-process bus (needs REDIS_URL as well).
    #[arg(long, env = "NATS_URL")]
    pub nats_url: Option<String>,
    /// Redis instead of the in-process route table.
    #[arg(long, env = "REDIS_URL")]
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
    #[error("bind {0}: {1}")]
    Bind(SocketAddr, #[source] std::io::Error),
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
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr).await.map_err(|e| AllInOneError::Bind(addr, e))
        };
        Ok(Listeners {
            edge: edge_gateway::Listeners {
                official: bind(config.official_listen).await?,
                custom: bind(config.custom_listen).await?,
                grpc: bind(config.grpc_listen).await?,
                metrics: bind(config.metrics_listen).await?,
            },
            http: bind(config.worker.http_listen).await?,
        })
    }
}

impl Config {
    /// The edge's configuration within the all-in-one.
    fn edge(&self, pod: &str) -> edge_gateway::Config {
        edge_gateway::Config {
            official_listen: self.official_listen,
            custom_listen: self.custom_listen,
            grpc_listen: self.grpc_listen,
            advertise_addr: self.advertise_addr.clone(),
            pod_name: Some(pod.to_owned()),
            nats_url: self.nats_url.clone().unwrap_or_default(),
            redis_url: self.redis_url.clone().unwrap_or_default(),
            metrics_listen: self.metrics_listen,
            uplink_partitions: self.worker.uplink_partitions,
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
        self.edge("validate").validate().map_err(|e| AllInOneError::Config(e.to_string()))
    }
}

/// Runs the all-in-one until `shutdown`, then drains.
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
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();

    let redis = config.redis_url.as_deref().map(script_worker::redis).transpose()?;
    let platform = config.platform_url.as_deref().map(|url| PlatformClient::new(url, Duration::from_secs(5)));
    let devices: Arc<dyn DeviceSource> = match (&platform, &config.devices) {
        (Some(client), _) => {
            Arc::new(script_worker::platform::devices::PlatformDevices::new(client.clone(), redis.clone()))
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
    let metrics = Arc::new(script_worker::metrics::Metrics::default());
    // Every replica subscribes every downlink; on the shared bus (NATS and Redis: one
    // replica among several) a device's downlinks are its uplink partition owner's, as
    // in the worker, so that each is delivered once; alone, this replica handles all.
    let owned: script_worker::consume::OwnedPartitions = Arc::default();
    let handles: script_worker::Handles = match (&config.nats_url, &redis) {
        (Some(_), Some(_)) => script_worker::owner_handles(owned.clone(), settings.uplink_partitions),
        _ => Arc::new(|_| true),
    };
    let (subscription, downlink_queue) = script_worker::downlink_subscription(
        format!("{}#", settings.topic_prefix()),
        settings.topic_prefix(),
        metrics.clone(),
    );
    // The broker connection outlives the worker's tasks: their last batches need it.
    let (mqtt_stop, mqtt_tasks) = (CancellationToken::new(), TaskTracker::new());
    let sink: Arc<dyn PlatformSink> = match &config.mqtt_url {
        Some(url) => {
            let mqtt = script_worker::platform::mqtt::MqttConfig::from_url(
                url,
                &format!("tcpc-{pod}"),
                &settings.mqtt_username,
                &settings.mqtt_password,
            )
            .map_err(AllInOneError::Config)?;
            Arc::new(script_worker::platform::mqtt::MqttSink::start(
                mqtt,
                Some(subscription),
                mqtt_stop.clone(),
                &mqtt_tasks,
            ))
        }
        None => Arc::new(JsonLines),
    };
    // The worker's side of NATS, when the bus is JetStream; connected before the core,
    // which keeps dead letters there.
    let nats = match (&config.nats_url, &redis) {
        (Some(url), Some(_)) => Some(
            async_nats::ConnectOptions::new()
                .retry_on_initial_connect()
                .connect(url)
                .await
                .map_err(|e| script_worker::WorkerError::Connect("nats", e.to_string()))?,
        ),
        _ => None,
    };
    let dead_letters: Arc<dyn DeadLetters> = match &nats {
        Some(nats) => Arc::new(JetStreamDeadLetters::new(nats.clone())),
        None => Arc::new(LoggedDeadLetters),
    };
    let core = script_worker::Core::new(
        settings,
        metrics,
        devices.clone(),
        lookup.clone(),
        sink,
        dead_letters,
        handles,
    )?;
    tasks.spawn(script_worker::Core::dispatch_downlinks(
        core.downlinks.clone(),
        downlink_queue,
        stop.clone(),
    ));

    let bus: Arc<dyn UplinkBus> = match (&config.nats_url, redis, &nats) {
        (Some(url), Some(redis), Some(nats)) => {
            let bus = Arc::new(
                edge_gateway::uplink::NatsBus::connect(url, config.limits.publish_timeout)
                    .await
                    .map_err(edge_gateway::EdgeError::from)?,
            );
            tasks.spawn({
                let (bus, stop) = (bus.clone(), stop.clone());
                async move { bus.keep_stream(&stop).await }
            });
            script_worker::spawn_bus_tasks(
                &tasks,
                &core,
                &devices,
                nats,
                redis,
                pod.clone(),
                settings.uplink_partitions,
                owned,
                &stop,
            );
            bus
        }
        _ => Arc::new(local::LocalBus {
            pipeline: core.pipeline.clone(),
            authenticator: core.authenticator.clone(),
        }),
    };

    let api = script_worker::api::ApiState {
        devices,
        routes: lookup,
        edges: core.downlinks.edges.clone(),
        broadcast_forget: Arc::new({
            let nats = nats.clone();
            move |device_id: String| {
                let nats = nats.clone();
                Box::pin(async move {
                    if let Some(nats) = nats {
                        let _ =
                            nats.publish(tcpc_proto::names::DEVICE_FORGET_SUBJECT, device_id.into()).await;
                    }
                })
            }
        }),
    };
    tasks.spawn({
        let (router, stop) = (script_worker::api::router(Arc::new(api)), stop.clone());
        async move {
            if let Err(error) =
                axum::serve(listeners.http, router).with_graceful_shutdown(stop.cancelled_owned()).await
            {
                tracing::error!(%error, "plugin API failed");
            }
        }
    });
    if let Some(client) = platform {
        tasks.spawn(script_worker::heartbeat(
            client,
            settings.service_identifier.clone(),
            settings.heartbeat_interval,
            stop.clone(),
        ));
    }
    tasks.close();
    info!(%pod, "tcp-connectivity all-in-one starting");

    let worker_metrics = core.metrics.clone();
    let seams = edge_gateway::Seams {
        bus,
        routes: edge_routes,
        extra_metrics: Some(Arc::new(move || worker_metrics.render())),
    };
    let edge = edge_gateway::run_with(config.edge(&pod), listeners.edge, seams, shutdown).await;
    stop.cancel();
    script_worker::drain(&tasks, nats.as_ref(), &mqtt_stop, &mqtt_tasks).await;
    edge.map_err(AllInOneError::from)
}
