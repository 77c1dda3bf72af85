//! The worker's composition: one [`Worker`] on the seams a deployment chose, started by
//! the service ([`run`], on NATS, Redis, MQTT and the platform) and by the all-in-one,
//! which hands its edge's envelopes to [`Worker::pipeline`] instead of NATS.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use tcpc_observe::{Health, MetricsRegistry};
use tcpc_proto::connect::{RedisConnection, UrlError};
use tcpc_proto::names;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::auth::Authenticator;
use crate::config::{Config, DownlinkSubscription, Settings};
use crate::dead_letter::{DeadLetters, JetStreamDeadLetters, LoggedDeadLetters};
use crate::downlink::Downlinks;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::platform::client::PlatformClient;
use crate::platform::mqtt::{DISCONNECT_DEADLINE, MqttConfig, MqttSink, Subscription};
use crate::routes::{EdgeClients, RedisRoutes, RouteLookup};
use crate::scripts::{Library, Scripts};
use crate::sink::{JsonLines, PlatformSink};
use crate::source::DeviceSource;
use crate::{api, auth, consume, downlink, platform, uplink};

/// The worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("start the script engine")]
    Scripts(#[source] std::io::Error),
    #[error("redis URL")]
    RedisUrl(#[source] UrlError),
    #[error("NATS URL")]
    NatsUrl(#[source] UrlError),
    #[error("connect to NATS")]
    Nats(#[source] async_nats::ConnectError),
    #[error("bind the worker's listeners")]
    Bind(#[source] std::io::Error),
}

/// What the worker runs on.
pub struct Seams {
    /// Device configs and scripts: the platform's HTTP API, or a devices file.
    pub devices: Arc<dyn DeviceSource>,
    /// Where each device is connected.
    pub routes: Arc<dyn RouteLookup>,
    /// How the edge pods are called (gRPC, with the hop's security).
    pub edges: Arc<EdgeClients>,
    /// The platform's MQTT broker; without it platform messages are JSON lines on stdout.
    pub broker: Option<MqttConfig>,
    /// NATS and Redis: the worker owns uplink partitions, answers the edges' auth
    /// requests and keeps dead letters in JetStream. Without it the caller hands
    /// envelopes to [`Worker::pipeline`] and auth requests to [`Worker::authenticator`].
    pub bus: Option<Bus>,
    /// The platform's HTTP API, when there is one: it gets the plugin heartbeat.
    pub platform: Option<PlatformClient>,
    /// The worker's metrics, registered in `registry`, the process's one registry.
    pub metrics: Arc<Metrics>,
    pub registry: Arc<MetricsRegistry>,
}

/// The shared uplink bus as the worker sees it.
pub struct Bus {
    pub nats: async_nats::Client,
    /// Partition leases.
    pub redis: RedisConnection,
    /// This worker's name among the others (leases, the broker's client id).
    pub worker: String,
    /// Kubernetes runs the edges: watch them, purge the routes of those gone.
    pub edge_pods: Option<EdgePodWatch>,
}

/// Which edge pods to watch.
pub struct EdgePodWatch {
    /// Default: the Kubernetes client's namespace.
    pub namespace: Option<String>,
    pub selector: String,
}

/// A started worker: every task it runs, tracked; [`Worker::stop`] ends them in order.
pub struct Worker {
    pipeline: Arc<Pipeline>,
    authenticator: Arc<Authenticator>,
    registry: Arc<MetricsRegistry>,
    ready: Arc<dyn Fn() -> bool + Send + Sync>,
    nats: Option<async_nats::Client>,
    stop: CancellationToken,
    tasks: TaskTracker,
    /// The broker connection outlives the other tasks: their last batches need its PUBACKs.
    broker_stop: CancellationToken,
    broker_tasks: TaskTracker,
}

/// Downlinks waiting in the lanes, and for the dispatcher, at most (each); more are
/// refused "busy" at once. A downlink waits at most [`downlink::ANSWER_WITHIN`] anyway:
/// a longer queue would only hold answers that are already late.
const DOWNLINK_QUEUE: usize = 1024;

/// How long the consumers and the rest may take to stop before the broker connection
/// is closed anyway: a partition's batch under way gets `consume`'s hand-over time (2 s).
const STOP_DEADLINE: Duration = Duration::from_secs(5);

impl Worker {
    /// Starts every part of the worker on `seams`, with the plugin API on `http`.
    ///
    /// # Errors
    /// The script engine's threads cannot start.
    pub fn start(settings: &Settings, http: TcpListener, seams: Seams) -> Result<Self, WorkerError> {
        let Seams { devices, routes, edges, broker, bus, platform, metrics, registry } = seams;
        let (stop, tasks) = (CancellationToken::new(), TaskTracker::new());
        let (broker_stop, broker_tasks) = (CancellationToken::new(), TaskTracker::new());

        let (deliveries, downlink_queue) = tokio::sync::mpsc::channel(DOWNLINK_QUEUE);
        let subscription = Subscription {
            filter: settings.downlink_filter(),
            deliveries,
            refuse: downlink::busy_refusal(settings.topic_prefix(), metrics.clone()),
            refusals: metrics.subscription_refusals.clone(),
        };
        let (sink, broker_ready): (Arc<dyn PlatformSink>, Option<Arc<MqttSink>>) = match broker {
            Some(config) => {
                let sink =
                    Arc::new(MqttSink::start(config, Some(subscription), broker_stop.clone(), &broker_tasks));
                (sink.clone(), Some(sink))
            }
            None => (Arc::new(JsonLines), None),
        };
        // With every worker subscribed to every downlink, a device's downlinks are its
        // uplink partition owner's, so that each is delivered once.
        let owned = consume::OwnedPartitions::default();
        let handles: Handles = match (&bus, settings.downlink_subscription) {
            (Some(_), DownlinkSubscription::Owner) => {
                owner_handles(owned.clone(), settings.uplink_partitions)
            }
            _ => Arc::new(|_| true),
        };
        let dead_letters: Arc<dyn DeadLetters> = match &bus {
            Some(bus) => Arc::new(JetStreamDeadLetters::new(bus.nats.clone(), settings.stream.replicas)),
            None => Arc::new(LoggedDeadLetters),
        };

        let library = Library::new(settings.scripts_dir.clone());
        let scripts = Arc::new(
            Scripts::start(
                settings.script_engine,
                settings.script_limits(),
                library,
                settings.script_threads(),
            )
            .map_err(WorkerError::Scripts)?
            .measured(metrics.clone()),
        );
        let downlinks = Arc::new(Downlinks::new(
            settings.topic_prefix(),
            devices.clone(),
            routes.clone(),
            edges.clone(),
            scripts.clone(),
            sink.clone(),
            metrics.clone(),
            handles,
            settings.queue_policy(),
            tasks.clone(),
        ));
        let mapper = uplink::Mapper {
            devices: devices.clone(),
            routes: routes.clone(),
            scripts: scripts.clone(),
            metrics: metrics.clone(),
            downlinks: downlinks.clone(),
        };
        let pipeline = Arc::new(Pipeline { mapper, sink, dead_letters, metrics: metrics.clone() });
        let authenticator =
            Arc::new(Authenticator { devices: devices.clone(), scripts, metrics: metrics.clone() });
        tasks.spawn(downlink::lanes::dispatch(
            downlinks.clone(),
            downlink_queue,
            downlink::lanes::LANES,
            DOWNLINK_QUEUE,
            stop.clone(),
        ));
        tasks.spawn({
            let (edges, stop) = (edges.clone(), stop.clone());
            async move { edges.keep_tls_current(stop).await }
        });

        if let Some(bus) = &bus {
            tasks.spawn(auth::serve(bus.nats.clone(), authenticator.clone(), tasks.clone(), stop.clone()));
            tasks.spawn(forget_changed_configs(bus.nats.clone(), devices.clone(), stop.clone()));
            let partitions = consume::Partitions {
                jetstream: async_nats::jetstream::new(bus.nats.clone()),
                stream: tcpc_proto::stream::StreamCheck::new(tcpc_proto::stream::uplink_stream_config(
                    settings.stream,
                )),
                redis: bus.redis.clone(),
                worker: consume::boot_identity(&bus.worker),
                partitions: settings.uplink_partitions,
                pipeline: pipeline.clone(),
                owned,
                kept_order: consume::KeptOrder::default(),
            };
            tasks.spawn(partitions.run(stop.clone()));
            if let Some(watch) = &bus.edge_pods {
                tasks.spawn(watch_edge_pods(
                    watch.namespace.clone(),
                    watch.selector.clone(),
                    bus.redis.clone(),
                    metrics.clone(),
                    stop.clone(),
                ));
            }
        }
        if let Some(platform) = platform {
            let (identifier, every) = (settings.service_identifier.clone(), settings.heartbeat_interval);
            tasks.spawn(platform.keep_heartbeat(identifier, every, stop.clone()));
        }
        let nats = bus.map(|bus| bus.nats);
        let api = api::ApiState {
            devices,
            routes,
            edges,
            broadcast_forget: Arc::new({
                let nats = nats.clone();
                move |device_id: String| {
                    let nats = nats.clone();
                    Box::pin(async move {
                        let Some(nats) = nats else { return };
                        if let Err(error) = nats.publish(names::DEVICE_FORGET_SUBJECT, device_id.into()).await
                        {
                            warn!(%error, "other workers not told to forget a device config");
                        }
                    })
                }
            }),
        };
        tasks.spawn({
            let (router, stop) = (api::router(Arc::new(api)), stop.clone());
            async move {
                if let Err(error) =
                    axum::serve(http, router).with_graceful_shutdown(stop.cancelled_owned()).await
                {
                    tracing::error!(%error, "plugin API failed");
                }
            }
        });

        let ready: Arc<dyn Fn() -> bool + Send + Sync> = Arc::new({
            let nats = nats.clone();
            move || {
                let bus_up = nats
                    .as_ref()
                    .is_none_or(|nats| nats.connection_state() == async_nats::connection::State::Connected);
                bus_up && broker_ready.as_ref().is_none_or(|sink| sink.is_ready())
            }
        });
        Ok(Worker { pipeline, authenticator, registry, ready, nats, stop, tasks, broker_stop, broker_tasks })
    }

    /// Where envelopes go when the caller is the bus.
    pub fn pipeline(&self) -> Arc<Pipeline> {
        self.pipeline.clone()
    }

    /// Who answers auth requests when the caller is the bus.
    pub fn authenticator(&self) -> Arc<Authenticator> {
        self.authenticator.clone()
    }

    /// Whether the worker can take work: its bus connected, its broker connection up,
    /// subscribed and making progress.
    pub fn readiness(&self) -> Arc<dyn Fn() -> bool + Send + Sync> {
        self.ready.clone()
    }

    /// The health endpoints' view of this worker, failing readiness once `draining`.
    fn health(&self, draining: Arc<AtomicBool>) -> Health {
        Health { registry: self.registry.clone(), ready: self.ready.clone(), draining }
    }

    /// The shutdown order: the tasks end (the partition consumers finish and
    /// acknowledge their batches under way), the acknowledgements are flushed to NATS,
    /// and only then is the broker connection closed (DISCONNECT), each step within a
    /// deadline.
    pub async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        if tokio::time::timeout(STOP_DEADLINE, self.tasks.wait()).await.is_err() {
            warn!("tasks not stopped within {STOP_DEADLINE:?}; closing the broker connection anyway");
        }
        if let Some(nats) = &self.nats
            && tokio::time::timeout(STOP_DEADLINE, nats.flush()).await.is_err()
        {
            warn!("acknowledgements not flushed to NATS in time; those batches will come again");
        }
        self.broker_stop.cancel();
        self.broker_tasks.close();
        if tokio::time::timeout(DISCONNECT_DEADLINE + Duration::from_secs(1), self.broker_tasks.wait())
            .await
            .is_err()
        {
            warn!("platform broker connection not closed in time");
        }
    }
}

/// The worker's pre-bound listeners.
pub struct Listeners {
    /// The plugin API the platform calls.
    pub http: TcpListener,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub metrics: TcpListener,
}

/// Runs a worker on `seams` until `shutdown`, serving its health endpoints, then stops
/// it (readiness fails first).
///
/// # Errors
/// The worker cannot start.
pub async fn run_with(
    settings: &Settings,
    listeners: Listeners,
    seams: Seams,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    settings.validate().map_err(WorkerError::Config)?;
    let worker = Worker::start(settings, listeners.http, seams)?;
    let draining = Arc::new(AtomicBool::new(false));
    let health = worker.health(draining.clone());
    let served = CancellationToken::new();
    let server = tokio::spawn({
        let served = served.clone();
        async move {
            if let Err(error) = tcpc_observe::serve(listeners.metrics, health, served.cancelled_owned()).await
            {
                tracing::error!(%error, "metrics server failed");
            }
        }
    });
    shutdown.await;
    draining.store(true, Ordering::Release);
    info!("script-worker stopping");
    worker.stop().await;
    served.cancel();
    let _ = server.await;
    Ok(())
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
    config.validate().map_err(WorkerError::Config)?;
    let settings = &config.settings;
    let worker = config.pod_name.clone().unwrap_or_else(crate::config::host_name);
    let redis = redis(&config.redis_url)?;
    let nats = nats(&config.nats_url, "tcpc-script-worker").await?;
    let broker = MqttConfig::from_url(
        &config.mqtt_url,
        // Two processes with one POD_NAME must not take each other's broker session.
        &consume::boot_identity(&format!("tcpc-worker-{worker}")),
        &settings.mqtt_username,
        settings.mqtt_password.clone(),
    )
    .map_err(WorkerError::Config)?;
    let platform = PlatformClient::new(&config.platform_url, Duration::from_secs(5));
    let devices = platform::devices::PlatformDevices::new(platform.clone(), Some(redis.clone()));
    let edge_pods = config.edge_pod_watch.enabled().then(|| EdgePodWatch {
        namespace: config.pod_namespace.clone(),
        selector: config.edge_pod_selector.clone(),
    });
    let mut registry = MetricsRegistry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    info!(%worker, "script-worker starting");
    let edges =
        EdgeClients::new(&config.grpc_security, &config.grpc_tls_server_name).map_err(WorkerError::Config)?;
    let seams = Seams {
        devices,
        routes: Arc::new(RedisRoutes::new(redis.clone())),
        edges: Arc::new(edges),
        broker: Some(broker),
        bus: Some(Bus { nats, redis, worker, edge_pods }),
        platform: Some(platform),
        metrics,
        registry: Arc::new(registry),
    };
    run_with(settings, listeners, seams, shutdown).await
}

/// Whether this process handles a device's downlinks.
pub type Handles = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Downlinks handled by the owner of the device's uplink partition (`owned` is kept by
/// [`consume::Partitions`]), when every worker sees every downlink.
fn owner_handles(owned: consume::OwnedPartitions, partitions: u32) -> Handles {
    Arc::new(move |device_id| {
        let partition = names::partition_of(device_id, partitions);
        owned.holds(partition)
    })
}

/// A lazily connecting, self-reconnecting Redis connection: one server, a Redis
/// Cluster or Sentinel's master (see `tcpc_proto::connect`).
///
/// # Errors
/// The URL is invalid.
pub fn redis(url: &str) -> Result<RedisConnection, WorkerError> {
    RedisConnection::open(url, Duration::from_secs(2)).map_err(WorkerError::RedisUrl)
}

/// A NATS client named `name` on `urls` (one server, or a cluster's, comma-separated),
/// connecting in the background: the worker starts while NATS is down.
///
/// # Errors
/// A URL is invalid.
pub async fn nats(urls: &str, name: &str) -> Result<async_nats::Client, WorkerError> {
    let servers = tcpc_proto::connect::nats_servers(urls).map_err(WorkerError::NatsUrl)?;
    async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .connect(servers)
        .await
        .map_err(WorkerError::Nats)
}

/// Purges the routes of edge pods gone from Kubernetes until `stop`; without a
/// Kubernetes client (no in-cluster account, no kubeconfig) it says so once and stops.
async fn watch_edge_pods(
    namespace: Option<String>,
    selector: String,
    redis: RedisConnection,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let client = match kube::Client::try_default().await {
        Ok(client) => client,
        Err(error) => {
            warn!(%error, "no Kubernetes API client; gone edge pods are left to their liveness keys");
            return;
        }
    };
    let namespace = namespace.unwrap_or_else(|| client.default_namespace().to_owned());
    crate::edge_pods::purge_gone_edge_pods(client, &namespace, &selector, redis, metrics, stop).await;
}

/// Drops a device's cached config when another worker was told it changed.
async fn forget_changed_configs(
    nats: async_nats::Client,
    devices: Arc<dyn DeviceSource>,
    stop: CancellationToken,
) {
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
