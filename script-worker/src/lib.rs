//! The script-worker: everything platform-facing.
//!
//! Data flow:
//! - [`auth`] answers the edges' auth requests from a [`source::DeviceSource`]: the
//!   platform's HTTP API with caches ([`platform::devices`]), or a devices file.
//! - [`consume`] owns uplink partitions of JetStream and feeds each envelope, in
//!   order, to the [`pipeline`]: [`uplink`] maps it (running the device's script from
//!   [`scripts`]) to platform messages for the [`sink::PlatformSink`] — the platform's
//!   MQTT broker ([`platform::mqtt`]) or JSON lines — and the envelope is acknowledged
//!   only after the broker acknowledged its messages. One that can never be delivered
//!   goes to the [`dead_letter`] stream with its reason, and is then acknowledged.
//! - [`downlink`] takes the platform's downlinks from the broker subscription, encodes
//!   them (TP frame or the device's downlink script), and delivers them through the edge
//!   pod that holds the device ([`routes`]: route lookups and one gRPC channel per pod);
//!   what cannot be delivered is answered at once.
//! - [`api`] is the plugin HTTP API the platform calls. [`metrics`], [`config`],
//!   [`devices`] (the device model) complete it.

pub mod api;
pub mod auth;
pub mod config;
pub mod consume;
pub mod dead_letter;
pub mod devices;
pub mod downlink;
pub mod metrics;
pub mod pipeline;
pub mod platform;
pub mod routes;
pub mod scripts;
pub mod sink;
pub mod source;
pub mod uplink;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tcpc_proto::names;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use auth::Authenticator;
use config::{Config, Settings};
use dead_letter::DeadLetters;
use metrics::Metrics;
use pipeline::Pipeline;
use platform::client::PlatformClient;
use platform::mqtt::Downlink;
use routes::RouteLookup;
use scripts::{Library, Scripts};
use sink::PlatformSink;
use source::DeviceSource;

/// The worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("start the script engine: {0}")]
    Scripts(#[source] std::io::Error),
    #[error("{0}: {1}")]
    Connect(&'static str, String),
    #[error("serve: {0}")]
    Serve(#[source] std::io::Error),
}

/// The pieces every deployment shares, on the seams it chose.
pub struct Core {
    pub metrics: Arc<Metrics>,
    pub scripts: Arc<Scripts>,
    pub pipeline: Arc<Pipeline>,
    pub authenticator: Arc<Authenticator>,
    pub downlinks: Arc<downlink::Downlinks>,
}

impl Core {
    /// Builds the core on a device source, a route lookup, a platform sink and a
    /// keeper of dead letters; `handles` says whether this worker handles a device's downlinks.
    ///
    /// # Errors
    /// The script engine's thread cannot start.
    pub fn new(
        settings: &Settings,
        metrics: Arc<Metrics>,
        devices: Arc<dyn DeviceSource>,
        routes: Arc<dyn RouteLookup>,
        sink: Arc<dyn PlatformSink>,
        dead_letters: Arc<dyn DeadLetters>,
        handles: Arc<dyn Fn(&str) -> bool + Send + Sync>,
    ) -> Result<Self, WorkerError> {
        let library = Library::new(settings.scripts_dir.clone());
        let scripts = Arc::new(
            Scripts::start(
                settings.script_engine,
                settings.script_limits(),
                library,
                settings.script_threads(),
            )
            .map_err(WorkerError::Scripts)?,
        );
        let downlinks = Arc::new(downlink::Downlinks::new(
            settings.topic_prefix(),
            devices.clone(),
            routes.clone(),
            Arc::default(),
            scripts.clone(),
            sink.clone(),
            metrics.clone(),
            handles,
            settings.queue_policy(),
        ));
        let mapper = uplink::Mapper {
            devices: devices.clone(),
            routes,
            scripts: scripts.clone(),
            metrics: metrics.clone(),
            downlinks: downlinks.clone(),
        };
        let pipeline = Arc::new(Pipeline { mapper, sink, dead_letters, metrics: metrics.clone() });
        let authenticator =
            Arc::new(Authenticator { devices, scripts: scripts.clone(), metrics: metrics.clone() });
        Ok(Core { metrics, scripts, pipeline, authenticator, downlinks })
    }

    /// Handles downlinks from the broker, one at a time in arrival order, until the
    /// channel closes or `stop`.
    pub async fn dispatch_downlinks(
        downlinks: Arc<downlink::Downlinks>,
        mut deliveries: tokio::sync::mpsc::Receiver<Downlink>,
        stop: CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                delivery = deliveries.recv() => match delivery {
                    Some(downlink) => downlinks.handle(downlink).await,
                    None => return,
                },
            }
        }
    }
}

/// Whether this process handles a device's downlinks.
pub type Handles = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Downlinks handled by the owner of the device's uplink partition (`owned` is kept by
/// [`consume::Partitions`]), when every worker sees every downlink.
pub fn owner_handles(owned: consume::OwnedPartitions, partitions: u32) -> Handles {
    Arc::new(move |device_id| {
        let partition = names::partition_of(device_id, partitions);
        owned.read().unwrap_or_else(|e| e.into_inner()).contains(&partition)
    })
}

/// Downlinks waiting for the dispatcher, at most; more are refused "busy" at once. A
/// downlink waits at most [`downlink::ANSWER_WITHIN`] anyway: a longer queue would only
/// hold answers that are already late.
const DOWNLINK_QUEUE: usize = 1024;

/// The broker subscription on `filter` and the dispatcher's end of its queue; what
/// does not fit is refused "busy" on the response topic under `prefix`.
pub fn downlink_subscription(
    filter: String,
    prefix: String,
    metrics: Arc<Metrics>,
) -> (platform::mqtt::Subscription, tokio::sync::mpsc::Receiver<Downlink>) {
    let (deliveries, queue) = tokio::sync::mpsc::channel(DOWNLINK_QUEUE);
    let refusals = metrics.subscription_refusals.clone();
    let refuse = downlink::busy_refusal(prefix, metrics);
    (platform::mqtt::Subscription { filter, deliveries, refuse, refusals }, queue)
}

/// The worker's pre-bound listeners.
pub struct Listeners {
    pub http: TcpListener,
    pub metrics: TcpListener,
}

/// Sends the plugin heartbeat until `shutdown`.
pub async fn heartbeat(
    client: PlatformClient,
    service_identifier: String,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {
                if let Err(error) = client.heartbeat(&service_identifier).await {
                    warn!(%error, "plugin heartbeat not accepted");
                }
            }
        }
    }
}

/// A lazily connecting, self-reconnecting Redis connection.
///
/// # Errors
/// The URL is invalid.
pub fn redis(url: &str) -> Result<ConnectionManager, WorkerError> {
    let client = redis::Client::open(url).map_err(|e| WorkerError::Connect("redis", e.to_string()))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_max_delay(Duration::from_secs(2));
    ConnectionManager::new_lazy_with_config(client, config)
        .map_err(|e| WorkerError::Connect("redis", e.to_string()))
}

/// Runs the distributed worker (NATS, Redis, MQTT, the platform) until `shutdown`.
///
/// # Errors
/// Invalid configuration or URLs. Outages are not errors: the worker starts and waits.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    let settings = &config.settings;
    settings.validate().map_err(WorkerError::Config)?;
    let worker = config.pod_name.clone().unwrap_or_else(config::host_name);
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();

    let redis = redis(&config.redis_url)?;
    let nats = async_nats::ConnectOptions::new()
        .name("tcpc-script-worker")
        .retry_on_initial_connect()
        .connect(&config.nats_url)
        .await
        .map_err(|e| WorkerError::Connect("nats", e.to_string()))?;
    let mqtt = platform::mqtt::MqttConfig::from_url(
        &config.mqtt_url,
        // Two processes with one POD_NAME must not take each other's broker session.
        &consume::boot_identity(&format!("tcpc-worker-{worker}")),
        &settings.mqtt_username,
        &settings.mqtt_password,
    )
    .map_err(WorkerError::Config)?;
    let platform = PlatformClient::new(&config.platform_url, Duration::from_secs(5));
    let devices: Arc<dyn DeviceSource> =
        Arc::new(platform::devices::PlatformDevices::new(platform.clone(), Some(redis.clone())));
    let routes: Arc<dyn RouteLookup> = Arc::new(routes::RedisRoutes::new(redis.clone()));
    let metrics = Arc::new(Metrics::default());
    let (subscription, downlink_queue) =
        downlink_subscription(settings.downlink_filter(), settings.topic_prefix(), metrics.clone());
    // The broker connection outlives the consumers: their last batches need its PUBACKs.
    let (mqtt_stop, mqtt_tasks) = (CancellationToken::new(), TaskTracker::new());
    let sink =
        Arc::new(platform::mqtt::MqttSink::start(mqtt, Some(subscription), mqtt_stop.clone(), &mqtt_tasks));
    let mqtt_sink = sink.clone();
    // With every worker subscribed, a device's downlinks are the partition owner's.
    let owned: consume::OwnedPartitions = Arc::default();
    let handles: Handles = match settings.downlink_subscription {
        config::DownlinkSubscription::Shared => Arc::new(|_| true),
        config::DownlinkSubscription::Owner => owner_handles(owned.clone(), settings.uplink_partitions),
    };
    let dead_letters = Arc::new(dead_letter::JetStreamDeadLetters::new(nats.clone()));
    let core = Core::new(settings, metrics, devices.clone(), routes.clone(), sink, dead_letters, handles)?;
    tasks.spawn(Core::dispatch_downlinks(core.downlinks.clone(), downlink_queue, stop.clone()));
    info!(%worker, "script-worker starting");

    spawn_bus_tasks(&tasks, &core, &devices, &nats, redis, worker, settings.uplink_partitions, owned, &stop);
    tasks.spawn(heartbeat(
        platform,
        settings.service_identifier.clone(),
        settings.heartbeat_interval,
        stop.clone(),
    ));
    let api = api::ApiState {
        devices,
        routes,
        edges: core.downlinks.edges.clone(),
        broadcast_forget: {
            let nats = nats.clone();
            Arc::new(move |device_id: String| {
                let nats = nats.clone();
                Box::pin(async move {
                    if let Err(error) = nats.publish(names::DEVICE_FORGET_SUBJECT, device_id.into()).await {
                        warn!(%error, "other workers not told to forget a device config");
                    }
                })
            })
        },
    };
    tasks.spawn({
        let stop = stop.clone();
        let router = api::router(Arc::new(api));
        async move {
            if let Err(error) =
                axum::serve(listeners.http, router).with_graceful_shutdown(stop.cancelled_owned()).await
            {
                tracing::error!(%error, "plugin API failed");
            }
        }
    });
    let draining = Arc::new(AtomicBool::new(false));
    let ready_nats = nats.clone();
    let health = tcpc_observe::Health {
        metrics: Arc::new({
            let metrics = core.metrics.clone();
            move || metrics.render()
        }),
        ready: Arc::new(move || {
            ready_nats.connection_state() == async_nats::connection::State::Connected && mqtt_sink.is_ready()
        }),
        draining: draining.clone(),
    };
    tasks.spawn({
        let stop = stop.clone();
        async move {
            if let Err(error) = tcpc_observe::serve(listeners.metrics, health, stop.cancelled_owned()).await {
                tracing::error!(%error, "metrics server failed");
            }
        }
    });
    tasks.close();

    shutdown.await;
    draining.store(true, Ordering::Release);
    info!("script-worker stopping");
    stop.cancel();
    drain(&tasks, Some(&nats), &mqtt_stop, &mqtt_tasks).await;
    Ok(())
}

/// How long the consumers and the rest may take to stop before the broker connection
/// is closed anyway: a partition's batch under way gets `consume`'s hand-over time (2 s).
const STOP_DEADLINE: Duration = Duration::from_secs(5);

/// The shutdown order, once `tasks` were told to stop: they end (the partition
/// consumers finish and acknowledge their batches under way), the acknowledgements are
/// flushed to NATS, and only then is the broker connection closed (DISCONNECT), each
/// step within a deadline.
pub async fn drain(
    tasks: &TaskTracker,
    nats: Option<&async_nats::Client>,
    mqtt_stop: &CancellationToken,
    mqtt_tasks: &TaskTracker,
) {
    tasks.close();
    if tokio::time::timeout(STOP_DEADLINE, tasks.wait()).await.is_err() {
        warn!("tasks not stopped within {STOP_DEADLINE:?}; closing the broker connection anyway");
    }
    if let Some(nats) = nats
        && tokio::time::timeout(STOP_DEADLINE, nats.flush()).await.is_err()
    {
        warn!("acknowledgements not flushed to NATS in time; those batches will come again");
    }
    mqtt_stop.cancel();
    mqtt_tasks.close();
    let deadline = platform::mqtt::DISCONNECT_DEADLINE + Duration::from_secs(1);
    if tokio::time::timeout(deadline, mqtt_tasks.wait()).await.is_err() {
        warn!("platform broker connection not closed in time");
    }
}

/// The worker's side of NATS: the auth responder, config invalidations, and the
/// uplink partitions it owns.
#[allow(clippy::too_many_arguments)]
pub fn spawn_bus_tasks(
    tasks: &TaskTracker,
    core: &Core,
    devices: &Arc<dyn DeviceSource>,
    nats: &async_nats::Client,
    redis: ConnectionManager,
    worker: String,
    partitions: u32,
    owned: consume::OwnedPartitions,
    stop: &CancellationToken,
) {
    tasks.spawn(auth_task(nats.clone(), core.authenticator.clone(), stop.clone()));
    tasks.spawn(forget_task(nats.clone(), devices.clone(), stop.clone()));
    let partitions = consume::Partitions {
        jetstream: async_nats::jetstream::new(nats.clone()),
        redis,
        worker: consume::boot_identity(&worker),
        partitions,
        pipeline: core.pipeline.clone(),
        owned,
    };
    tasks.spawn(partitions.run(stop.clone()));
}

async fn auth_task(nats: async_nats::Client, authenticator: Arc<Authenticator>, stop: CancellationToken) {
    if let Err(error) = auth::serve(nats, authenticator, stop).await {
        tracing::error!(%error, "auth responder could not subscribe");
    }
}

/// Drops a device's cached config when another worker was told it changed.
async fn forget_task(nats: async_nats::Client, devices: Arc<dyn DeviceSource>, stop: CancellationToken) {
    let mut forgets = match nats.subscribe(names::DEVICE_FORGET_SUBJECT).await {
        Ok(subscription) => subscription,
        Err(error) => {
            tracing::error!(%error, "cannot subscribe to config invalidations");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            message = forgets.next() => match message {
                Some(message) => devices.forget(&String::from_utf8_lossy(&message.payload)).await,
                None => return,
            },
        }
    }
}
