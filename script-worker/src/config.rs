//! Script-worker configuration: every flag has an env var.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use secrecy::SecretString;
use tcpc_observe::{GrpcSecurity, KubeSwitch, LogFormat};

use crate::scripts::{EngineKind, Limits};

/// The script-worker: authenticates devices for the edges, runs their scripts and talks
/// to ThingsPanel (MQTT and HTTP).
#[derive(Debug, Parser)]
#[command(name = "script-worker", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs a script offline on sample input and prints the result or the error.
    Try(TryArgs),
}

/// `script-worker try`.
#[derive(Debug, Args)]
pub struct TryArgs {
    /// The script file.
    #[arg(long)]
    pub script: PathBuf,
    /// Uplink sample: the message bytes in hex (spaces allowed); runs `decode`.
    #[arg(long, conflicts_with = "json")]
    pub hex: Option<String>,
    /// Downlink sample: the platform message as JSON; runs `encode`.
    #[arg(long)]
    pub json: Option<String>,
    #[arg(long, value_enum, default_value = "quickjs")]
    pub engine: EngineKind,
}

/// The worker's service flags.
#[derive(Clone, Debug, Args)]
pub struct Config {
    /// One NATS URL, or several of a cluster, comma-separated.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222", hide_env_values = true)]
    pub nats_url: String,
    /// One Redis URL; several, comma-separated, for a Redis Cluster; or
    /// redis+sentinel://host:26379,host2:26379/<master-name>.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379", hide_env_values = true)]
    pub redis_url: String,
    /// The platform's MQTT broker (user `plugin`).
    #[arg(long, env = "MQTT_URL", default_value = "mqtt://127.0.0.1:1883")]
    pub mqtt_url: String,
    /// ThingsPanel's HTTP base, e.g. http://thingspanel:9999.
    #[arg(long, env = "PLATFORM_URL", default_value = "http://127.0.0.1:9999")]
    pub platform_url: String,
    /// This worker's name (partition leases, MQTT client id; default: the host name).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// Prometheus metrics, /healthz and /readyz.
    #[arg(long, env = "METRICS_LISTEN", default_value = "0.0.0.0:9100")]
    pub metrics_listen: SocketAddr,
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,
    /// Watch the edge pods in Kubernetes and purge the routes of those gone, sooner
    /// than their liveness keys expire (auto: when running in Kubernetes). Needs
    /// `list` and `watch` on pods.
    #[arg(long, env = "EDGE_POD_WATCH", value_enum, default_value = "auto")]
    pub edge_pod_watch: KubeSwitch,
    /// The label selector of the edge pods.
    #[arg(long, env = "EDGE_POD_SELECTOR", default_value = "app.kubernetes.io/component=edge-gateway")]
    pub edge_pod_selector: String,
    /// The edge pods' namespace (default: the client's, e.g. the service account's).
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
    #[command(flatten)]
    pub grpc_security: GrpcSecurity,
    /// The name the edges' gRPC certificate is issued for (checked whatever the pod's IP).
    #[arg(long, env = "GRPC_TLS_SERVER_NAME", default_value = "edge-gateway")]
    pub grpc_tls_server_name: String,
    #[command(flatten)]
    pub settings: Settings,
}

impl Config {
    /// The settings' checks, and the NATS and Redis URLs'.
    ///
    /// # Errors
    /// What cannot work.
    pub fn validate(&self) -> Result<(), String> {
        self.settings.validate()?;
        tcpc_proto::connect::nats_servers(&self.nats_url).map_err(|error| format!("--nats-url: {error}"))?;
        tcpc_proto::connect::check_redis_url(&self.redis_url).map_err(|error| format!("--redis-url: {error}"))
    }
}

/// Flags the worker shares with the all-in-one.
#[derive(Clone, Debug, Args)]
pub struct Settings {
    /// The plugin's service_identifier on the platform (also the protocol_type).
    #[arg(long, env = "SERVICE_IDENTIFIER", default_value = "TCP")]
    pub service_identifier: String,
    /// The platform's sub_topic_prefix for this plugin (default `plugin/<service-identifier>/`).
    #[arg(long, env = "TOPIC_PREFIX")]
    pub topic_prefix: Option<String>,
    /// The plugin HTTP API the platform calls.
    #[arg(long, env = "HTTP_LISTEN", default_value = "0.0.0.0:8098")]
    pub http_listen: SocketAddr,
    /// MQTT user and password on the platform broker.
    #[arg(long, env = "MQTT_USERNAME", default_value = "plugin")]
    pub mqtt_username: String,
    #[arg(long, env = "MQTT_PASSWORD", default_value = "plugin", hide_env_values = true,
          value_parser = |s: &str| Ok::<_, std::convert::Infallible>(SecretString::from(s)))]
    pub mqtt_password: SecretString,
    /// The script library: `lib:<name>` in a device config names `<dir>/<name>.js`.
    #[arg(long, env = "SCRIPTS_DIR")]
    pub scripts_dir: Option<PathBuf>,
    #[arg(long, env = "SCRIPT_ENGINE", value_enum, default_value = "quickjs")]
    pub script_engine: EngineKind,
    /// CPU time of one script call.
    #[arg(long, env = "SCRIPT_CPU_TIME", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub script_cpu_time: Duration,
    /// Heap of one script, in MiB.
    #[arg(long, env = "SCRIPT_HEAP_MIB", default_value_t = 16)]
    pub script_heap_mib: usize,
    /// Largest script result, in KiB.
    #[arg(long, env = "SCRIPT_OUTPUT_KIB", default_value_t = 64)]
    pub script_output_kib: usize,
    /// Memory for compiled scripts, in MiB, shared out among the engine threads; past
    /// it the least recently used are compiled again when next needed.
    #[arg(long, env = "SCRIPT_CACHE_MIB", default_value_t = 256)]
    pub script_cache_mib: usize,
    /// Script engine threads; each script runs on one of them, chosen by its content
    /// hash (default: the number of cores).
    #[arg(long, env = "SCRIPT_THREADS")]
    pub script_threads: Option<usize>,
    /// Device partitions of the uplink stream (must match the edges').
    #[arg(long, env = "UPLINK_PARTITIONS", default_value_t = tcpc_proto::names::DEFAULT_PARTITIONS)]
    pub uplink_partitions: u32,
    /// The uplink and dead-letter streams, when this process creates them (must equal
    /// the edges').
    #[command(flatten)]
    pub stream: tcpc_proto::stream::StreamSettings,
    /// How downlinks are shared among workers: `owner` — every worker subscribes and the
    /// owner of the device's uplink partition handles it (each device's downlinks in
    /// order); `shared` — an MQTT shared subscription hands each downlink to one
    /// worker (no order across a device's downlinks with several workers).
    #[arg(long, env = "DOWNLINK_SUBSCRIPTION", value_enum, default_value = "owner")]
    pub downlink_subscription: DownlinkSubscription,
    /// Downlink kinds queued for a device that is away, delivered in order when it comes
    /// back (comma-separated: telemetry-control, attribute-set, attribute-get, command;
    /// none by default).
    #[arg(long, env = "OFFLINE_QUEUE", value_delimiter = ',')]
    pub offline_queue: Vec<crate::platform::topics::DownlinkKind>,
    /// Queued downlinks per device at most (the oldest goes first).
    #[arg(long, env = "OFFLINE_QUEUE_MAX", default_value_t = 32)]
    pub offline_queue_max: usize,
    /// How long a queued downlink stays deliverable.
    #[arg(long, env = "OFFLINE_QUEUE_TTL", default_value = "10m", value_parser = humantime::parse_duration)]
    pub offline_queue_ttl: Duration,
    /// Plugin heartbeat to the platform (it shows a plugin inactive after 60 s).
    #[arg(long, env = "HEARTBEAT_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,
}

/// How downlinks are shared among workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DownlinkSubscription {
    Owner,
    Shared,
}

impl Settings {
    /// The MQTT filter downlinks are subscribed with.
    pub fn downlink_filter(&self) -> String {
        match self.downlink_subscription {
            DownlinkSubscription::Owner => format!("{}#", self.topic_prefix()),
            DownlinkSubscription::Shared => format!("$share/tcpc-workers/{}#", self.topic_prefix()),
        }
    }

    /// The offline queue's policy; None when no kind is queued.
    pub fn queue_policy(&self) -> Option<crate::downlink::QueuePolicy> {
        (!self.offline_queue.is_empty()).then(|| crate::downlink::QueuePolicy {
            kinds: self.offline_queue.iter().copied().collect(),
            max: self.offline_queue_max.max(1),
            ttl: self.offline_queue_ttl,
        })
    }

    /// The sub_topic_prefix, ending with `/`.
    pub fn topic_prefix(&self) -> String {
        let prefix =
            self.topic_prefix.clone().unwrap_or_else(|| format!("plugin/{}/", self.service_identifier));
        if prefix.ends_with('/') { prefix } else { format!("{prefix}/") }
    }

    /// Script engine threads: the flag, else one per core.
    pub fn script_threads(&self) -> usize {
        self.script_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get))
            .max(1)
    }

    pub fn script_limits(&self) -> Limits {
        Limits {
            cpu_time: self.script_cpu_time,
            heap: self.script_heap_mib << 20,
            output: self.script_output_kib << 10,
            cache_bytes: (self.script_cache_mib << 20) / self.script_threads(),
        }
    }

    /// Cross-field checks.
    ///
    /// # Errors
    /// What cannot work.
    pub fn validate(&self) -> Result<(), String> {
        if self.service_identifier.is_empty() || self.service_identifier.contains('/') {
            return Err("--service-identifier must be a non-empty name without '/'".to_owned());
        }
        if self.uplink_partitions == 0 {
            return Err("--uplink-partitions must be at least 1".to_owned());
        }
        self.stream.validate()?;
        if self.script_cpu_time.is_zero() || self.script_heap_mib == 0 || self.script_output_kib == 0 {
            return Err("script limits must be positive".to_owned());
        }
        // A result goes out base64-encoded (4/3) in an envelope: past the MQTT packet
        // limit, every message that large would be refused by the broker.
        if (self.script_output_kib << 10).saturating_mul(4) / 3 + ENVELOPE_ROOM
            > crate::platform::mqtt::MAX_PACKET
        {
            return Err(format!(
                "--script-output-kib {} does not fit an MQTT packet of {} bytes once base64-encoded",
                self.script_output_kib,
                crate::platform::mqtt::MAX_PACKET
            ));
        }
        if self.heartbeat_interval > Duration::from_secs(50) {
            return Err(
                "--heartbeat-interval above 50 s makes the platform show the plugin inactive".to_owned()
            );
        }
        Ok(())
    }
}

/// Topic, device id and JSON around a script's base64 result, at most.
const ENVELOPE_ROOM: usize = 1024;

/// This host's name, the default worker and pod name.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "tcpc".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let cli = Cli::try_parse_from(["script-worker"]).unwrap();
        let settings = &cli.config.settings;
        assert_eq!(settings.topic_prefix(), "plugin/TCP/");
        assert_eq!(settings.http_listen.to_string(), "0.0.0.0:8098");
        assert_eq!(settings.script_limits().heap, 16 << 20);
        assert_eq!(settings.stream, tcpc_proto::stream::StreamSettings::default());
        cli.config.validate().unwrap();
        assert_eq!(settings.downlink_filter(), "plugin/TCP/#");
        assert!(settings.queue_policy().is_none());
        let cli = Cli::try_parse_from([
            "script-worker",
            "--topic-prefix",
            "plugin/x",
            "--downlink-subscription",
            "shared",
            "--offline-queue",
            "command,attribute-set",
        ])
        .unwrap();
        assert_eq!(cli.config.settings.topic_prefix(), "plugin/x/");
        assert_eq!(cli.config.settings.downlink_filter(), "$share/tcpc-workers/plugin/x/#");
        assert_eq!(cli.config.settings.queue_policy().unwrap().kinds.len(), 2);
    }

    #[test]
    fn script_output_must_fit_an_mqtt_packet() {
        let with_output = |kib: &str| {
            Cli::try_parse_from(["script-worker", "--script-output-kib", kib])
                .unwrap()
                .config
                .settings
                .validate()
        };
        assert_eq!(with_output("767"), Ok(()));
        assert_eq!(
            with_output("768"),
            Err("--script-output-kib 768 does not fit an MQTT packet of 1048576 bytes once base64-encoded"
                .into())
        );
    }

    #[test]
    fn urls_and_replicas_are_checked() {
        let validate = |args: &[&str]| {
            let mut all = vec!["script-worker"];
            all.extend_from_slice(args);
            Cli::try_parse_from(all).unwrap().config.validate()
        };
        assert_eq!(
            validate(&["--nats-url", "nats://a:4222,nats://b:4222", "--redis-url", "redis://a,redis://b"]),
            Ok(())
        );
        assert_eq!(validate(&["--redis-url", "redis+sentinel://s1,s2/main"]), Ok(()));
        assert!(
            validate(&["--nats-url", "nats://a:4222,nats://b:x"])
                .unwrap_err()
                .starts_with("--nats-url: URL 2 of 2")
        );
        assert!(
            validate(&["--redis-url", "redis+sentinel://s1"])
                .unwrap_err()
                .starts_with("--redis-url: no master name")
        );
        assert!(validate(&["--stream-replicas", "0"]).unwrap_err().contains("--stream-replicas"));
    }

    #[test]
    fn try_subcommand() {
        let cli = Cli::try_parse_from(["script-worker", "try", "--script", "a.js", "--hex", "0a0b"]).unwrap();
        let Some(Command::Try(args)) = cli.command else { panic!() };
        assert_eq!(args.hex.as_deref(), Some("0a0b"));
    }
}
