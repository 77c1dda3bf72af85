//! Edge-gateway configuration: every flag has an env var; durations and sizes are parsed
//! once at start-up and cross-checked in [`Config::validate`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
pub use tcpc_observe::{GrpcSecurity, KubeSwitch, LogFormat};

/// The longest `--publish-linger`: a wait every envelope may pay, meant to be a
/// millisecond or so, not a fraction of the publish timeout.
const MAX_PUBLISH_LINGER: Duration = Duration::from_millis(100);

/// The edge-gateway: terminates device TCP (TP and custom), publishes uplinks to NATS
/// JetStream, routes sessions in Redis, and serves downlinks over gRPC.
#[derive(Clone, Debug, Parser)]
#[command(name = "edge-gateway", version, about, long_about = None)]
pub struct Config {
    #[command(flatten)]
    pub ports: DevicePorts,
    /// gRPC listener of the EdgeGateway service (workers deliver downlinks here).
    #[arg(long, env = "EDGE_GRPC_LISTEN", default_value = "0.0.0.0:50051")]
    pub grpc_listen: SocketAddr,
    #[command(flatten)]
    pub grpc_security: GrpcSecurity,
    /// host:port at which workers reach this pod's gRPC (default: the gRPC listener,
    /// with 127.0.0.1 for an unspecified address).
    #[arg(long, env = "EDGE_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,
    /// This pod's name: the owner recorded in routes (default: the host name).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// One NATS URL, or several of a cluster, comma-separated.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222", hide_env_values = true)]
    pub nats_url: String,
    /// One Redis URL; several, comma-separated, for a Redis Cluster; or
    /// redis+sentinel://host:26379,host2:26379/<master-name>.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379", hide_env_values = true)]
    pub redis_url: String,
    /// Prometheus metrics, /healthz and /readyz.
    #[arg(long, env = "METRICS_LISTEN", default_value = "0.0.0.0:9100")]
    pub metrics_listen: SocketAddr,
    /// Keep this pod's `controller.kubernetes.io/pod-deletion-cost` annotation near its
    /// connection count (auto: when running in Kubernetes). Needs `patch` on pods.
    #[arg(long, env = "EDGE_POD_DELETION_COST", value_enum, default_value = "auto")]
    pub pod_deletion_cost: KubeSwitch,
    /// This pod's namespace (default: the client's, e.g. the service account's).
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,

    /// Device partitions of the uplink stream (must match the workers'). The old name
    /// EDGE_UPLINK_PARTITIONS is still read, with a warning.
    #[arg(long, env = "UPLINK_PARTITIONS", default_value_t = tcpc_proto::names::DEFAULT_PARTITIONS)]
    pub uplink_partitions: u32,
    /// The uplink stream, when this pod creates it (must equal the workers').
    #[command(flatten)]
    pub stream: tcpc_proto::stream::StreamSettings,
    #[command(flatten)]
    pub limits: Limits,
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,
}

/// The device ports: plaintext and TLS, each protocol (also flags of the all-in-one).
#[derive(Clone, Debug, clap::Args)]
pub struct DevicePorts {
    /// Listener for the official TP protocol (empty: none).
    #[arg(long, env = "EDGE_OFFICIAL_LISTEN", default_value = "0.0.0.0:7653")]
    pub official_listen: Listen,
    /// Listener for the custom (pass-through) protocol (empty: none).
    #[arg(long, env = "EDGE_CUSTOM_LISTEN", default_value = "0.0.0.0:7654")]
    pub custom_listen: Listen,
    /// Listener for TP over TLS (needs --tls-cert-file and --tls-key-file).
    #[arg(long, env = "EDGE_OFFICIAL_TLS_LISTEN", default_value = "")]
    pub official_tls_listen: Listen,
    /// Listener for the custom protocol over TLS.
    #[arg(long, env = "EDGE_CUSTOM_TLS_LISTEN", default_value = "")]
    pub custom_tls_listen: Listen,
    /// The TLS ports' certificate chain (PEM); re-read when it changes.
    #[arg(long, env = "EDGE_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// The TLS ports' private key (PEM); re-read when it changes.
    #[arg(long, env = "EDGE_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// CA (PEM) whose client certificates devices must present on the TLS ports.
    #[arg(long, env = "EDGE_TLS_CLIENT_CA_FILE")]
    pub tls_client_ca_file: Option<PathBuf>,
}

impl DevicePorts {
    /// The TLS files, when the TLS ports are configured.
    pub fn tls_files(&self) -> Option<crate::tls::TlsFiles> {
        Some(crate::tls::TlsFiles {
            cert: self.tls_cert_file.clone()?,
            key: self.tls_key_file.clone()?,
            client_ca: self.tls_client_ca_file.clone(),
        })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let fail = |message: &str| Err(ConfigError(message.to_owned()));
        let tls_ports = self.official_tls_listen.0.is_some() || self.custom_tls_listen.0.is_some();
        if tls_ports && self.tls_files().is_none() {
            return fail("a TLS listener needs --tls-cert-file and --tls-key-file");
        }
        if !tls_ports && (self.tls_cert_file.is_some() || self.tls_client_ca_file.is_some()) {
            return fail(
                "TLS files are given but no TLS listener (--official-tls-listen, --custom-tls-listen)",
            );
        }
        let all =
            [&self.official_listen, &self.custom_listen, &self.official_tls_listen, &self.custom_tls_listen];
        if all.iter().all(|listen| listen.0.is_none()) {
            return fail("no device listener: give at least one of the four");
        }
        Ok(())
    }
}

/// A listen address, or none (an empty value turns a listener off).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listen(pub Option<SocketAddr>);

impl std::str::FromStr for Listen {
    type Err = std::net::AddrParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if text.is_empty() { Ok(Listen(None)) } else { text.parse().map(|addr| Listen(Some(addr))) }
    }
}

/// Limits and timings of sessions (also flags of the all-in-one).
#[derive(Clone, Debug, clap::Args)]
pub struct Limits {
    /// Connections this pod holds at most; more are refused.
    #[arg(long, env = "EDGE_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,
    /// Largest frame payload (TP LENGTH) or custom message, e.g. 65536 or 64KiB.
    #[arg(long, env = "EDGE_MAX_FRAME", default_value = "64KiB", value_parser = parse_size)]
    pub max_frame: usize,
    /// Time from connect to a successful authentication.
    #[arg(long, env = "EDGE_AUTH_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub auth_timeout: Duration,
    /// A connection that sends no frame for this long is closed (3x a 60 s heartbeat).
    #[arg(long, env = "EDGE_IDLE_TIMEOUT", default_value = "180s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// Messages per second one connection may send; past it the edge stops reading that
    /// socket until the budget refills (0 = unlimited).
    #[arg(long, env = "EDGE_RATE_LIMIT", default_value_t = 1000)]
    pub rate_limit: u32,
    /// Messages one connection may send in a burst above the rate.
    #[arg(long, env = "EDGE_RATE_BURST", default_value_t = 1000)]
    pub rate_burst: u32,
    /// Publishes of one connection awaiting JetStream's ack; past it the edge stops
    /// reading that socket. Above 1, frames in flight when the NATS connection breaks
    /// may be stored out of order (never lost), and the worker puts each connection's
    /// back in sequence; 1 keeps the stream itself in order, at one round trip per
    /// frame (5,600–7,200 frames/s for one device on a 2-core box).
    #[arg(long, env = "EDGE_MAX_IN_FLIGHT", default_value_t = 32)]
    pub max_in_flight: usize,
    /// The pod's publishes go to NATS at most once per linger, together: one write,
    /// read and store in nats-server for all those of that moment rather than one each
    /// (the CPU per message at moderate rates), for at most this much added latency
    /// (none after a quiet spell). The timer's resolution is 1 ms; 0 sends what is
    /// queued at once.
    #[arg(long, env = "EDGE_PUBLISH_LINGER", default_value = "1ms", value_parser = humantime::parse_duration)]
    pub publish_linger: Duration,
    /// Downlinks queued for one connection; past it a delivery fails at once.
    #[arg(long, env = "EDGE_DOWNLINK_QUEUE", default_value_t = 64)]
    pub downlink_queue: usize,
    /// Bytes of downlinks queued for one connection; past it a delivery fails at once.
    #[arg(long, env = "EDGE_DOWNLINK_QUEUE_BYTES", default_value = "256KiB", value_parser = parse_size)]
    pub downlink_queue_bytes: usize,
    /// Deadline of a write to a device.
    #[arg(long, env = "EDGE_WRITE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub write_timeout: Duration,
    /// Deadline of a publish to JetStream, and of each Redis call.
    #[arg(long, env = "EDGE_PUBLISH_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub publish_timeout: Duration,
    /// Custom protocol: a silence this long after the first bytes ends the AccessToken
    /// (devices that send no newline).
    #[arg(long, env = "EDGE_TOKEN_GAP", default_value = "200ms", value_parser = humantime::parse_duration)]
    pub token_gap: Duration,
    /// Custom protocol: longest AccessToken line.
    #[arg(long, env = "EDGE_MAX_TOKEN", default_value_t = 256)]
    pub max_token: usize,
    /// On SIGTERM, connections are closed spread over this window so that the fleet
    /// reconnects elsewhere without a thundering herd.
    #[arg(long, env = "EDGE_DRAIN_WINDOW", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_window: Duration,
    /// A closing connection publishes what it already read and waits for the
    /// acknowledgements this long at most.
    #[arg(long, env = "EDGE_CLOSE_FLUSH", default_value = "5s", value_parser = humantime::parse_duration)]
    pub close_flush: Duration,
    /// SIGTERM to exit, everything included (drain window, flushes, offline events);
    /// give the pod a termination grace period a few seconds longer.
    #[arg(long, env = "EDGE_SHUTDOWN_TIMEOUT", default_value = "45s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,

    /// Open connections per client address; more are refused (0 = no limit).
    #[arg(long, env = "EDGE_MAX_CONNECTIONS_PER_SOURCE", default_value_t = 1000)]
    pub max_connections_per_source: u32,
    /// Authentication attempts per second per client address.
    #[arg(long, env = "EDGE_AUTH_RATE_PER_SOURCE", default_value_t = 10)]
    pub auth_rate_per_source: u32,
    /// Authentication attempts one client address may make in a burst.
    #[arg(long, env = "EDGE_AUTH_BURST_PER_SOURCE", default_value_t = 20)]
    pub auth_burst_per_source: u32,
    /// Refused authentications of one address within --ban-window that ban it.
    #[arg(long, env = "EDGE_BAN_AFTER", default_value_t = 30)]
    pub ban_after: u32,
    #[arg(long, env = "EDGE_BAN_WINDOW", default_value = "60s", value_parser = humantime::parse_duration)]
    pub ban_window: Duration,
    /// How long a banned address is refused.
    #[arg(long, env = "EDGE_BAN_FOR", default_value = "60s", value_parser = humantime::parse_duration)]
    pub ban_for: Duration,
    /// Authentications of the pod waiting on the workers at once; more wait their turn.
    #[arg(long, env = "EDGE_MAX_AUTH_IN_FLIGHT", default_value_t = 1024)]
    pub max_auth_in_flight: usize,
    /// How often every session's route is written again to Redis (jittered), so that
    /// routes lost in a Redis failover or restart come back.
    #[arg(long, env = "EDGE_ROUTE_REASSERT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub route_reassert: Duration,
    /// Device listeners expect a PROXY protocol (v1 or v2) header first, and limits and
    /// logs use the client address it carries (behind a load balancer that sends it).
    #[arg(long, env = "EDGE_PROXY_PROTOCOL")]
    pub proxy_protocol: bool,
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

impl From<String> for ConfigError {
    fn from(message: String) -> Self {
        ConfigError(message)
    }
}

impl Config {
    /// Cross-field checks; a message for the operator when the configuration cannot work.
    ///
    /// # Errors
    /// The first inconsistency found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.ports.validate()?;
        self.grpc_security.tls().map_err(ConfigError)?;
        let fail = |message: &str| Err(ConfigError(message.to_owned()));
        if self.limits.max_connections == 0 {
            return fail("--max-connections must be at least 1");
        }
        if self.limits.max_frame == 0 || self.limits.max_frame > u32::MAX as usize {
            return fail("--max-frame must be between 1 byte and 4 GiB");
        }
        if self.limits.max_in_flight == 0 || self.limits.downlink_queue == 0 {
            return fail("--max-in-flight and --downlink-queue must be at least 1");
        }
        if self.uplink_partitions == 0 {
            return fail("--uplink-partitions must be at least 1");
        }
        // Every envelope may wait this long before its publish even starts.
        if self.limits.publish_linger > MAX_PUBLISH_LINGER {
            return fail("--publish-linger must be at most 100ms");
        }
        if let Err(error) = self.stream.validate() {
            return fail(&error);
        }
        if self.limits.auth_timeout.is_zero() || self.limits.idle_timeout.is_zero() {
            return fail("--auth-timeout and --idle-timeout must be positive");
        }
        if self.limits.rate_limit > 0 && self.limits.rate_burst == 0 {
            return fail("--rate-burst must be at least 1 when --rate-limit is set");
        }
        if self.limits.auth_rate_per_source == 0 || self.limits.auth_burst_per_source == 0 {
            return fail("--auth-rate-per-source and --auth-burst-per-source must be at least 1");
        }
        if self.limits.ban_after == 0 || self.limits.max_auth_in_flight == 0 {
            return fail("--ban-after and --max-auth-in-flight must be at least 1");
        }
        if self.limits.route_reassert < Duration::from_millis(100) {
            return fail("--route-reassert must be at least 100ms");
        }
        if self.limits.drain_window + self.limits.close_flush + self.limits.publish_timeout
            > self.limits.shutdown_timeout
        {
            return fail(
                "--shutdown-timeout must cover --drain-window + --close-flush + --publish-timeout \
                 (the drain, the last flushes and the offline events)",
            );
        }
        Ok(())
    }

    /// Checks the NATS and Redis URLs (the service's; the all-in-one checks its own).
    ///
    /// # Errors
    /// A URL that cannot be used.
    pub fn check_urls(&self) -> Result<(), ConfigError> {
        tcpc_proto::connect::nats_servers(&self.nats_url)
            .map_err(|error| ConfigError(format!("--nats-url: {error}")))?;
        tcpc_proto::connect::check_redis_url(&self.redis_url)
            .map_err(|error| ConfigError(format!("--redis-url: {error}")))
    }

    /// Parses flags and env. The second value is a warning to log once logging is set
    /// up (a deprecated name was used).
    pub fn load() -> (Self, Option<String>) {
        use clap::{CommandFactory, FromArgMatches, parser::ValueSource};
        let matches = Self::command().get_matches();
        let mut config = Self::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        let mut warning = None;
        if matches.value_source("uplink_partitions") == Some(ValueSource::DefaultValue)
            && let Ok(legacy) = std::env::var("EDGE_UPLINK_PARTITIONS")
        {
            match legacy.parse() {
                Ok(partitions) => {
                    config.uplink_partitions = partitions;
                    warning = Some("EDGE_UPLINK_PARTITIONS is deprecated: use UPLINK_PARTITIONS".to_owned());
                }
                Err(_) => warning = Some(format!("EDGE_UPLINK_PARTITIONS={legacy:?} ignored: not a number")),
            }
        }
        (config, warning)
    }

    /// This pod's name: --pod-name, else the host name.
    pub fn pod(&self) -> String {
        self.pod_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|name| name.trim().to_owned())
                .unwrap_or_else(|_| "edge".to_owned())
        })
    }

    /// Where workers reach this pod's gRPC, given the address the listener got.
    pub fn advertised(&self, bound: SocketAddr) -> String {
        match &self.advertise_addr {
            Some(addr) => addr.clone(),
            None if bound.ip().is_unspecified() => format!("127.0.0.1:{}", bound.port()),
            None => bound.to_string(),
        }
    }
}

/// Parses `65536`, `64KiB`, `1MiB` (also `KB`/`MB`, read as binary units).
pub fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: usize = digits.parse().map_err(|_| format!("not a size: {text:?}"))?;
    let factor = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        _ => return Err(format!("unknown size unit in {text:?} (use KiB or MiB)")),
    };
    number.checked_mul(factor).ok_or_else(|| format!("size too large: {text:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1 MiB"), Ok(1 << 20));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("KiB").is_err());
    }

    #[test]
    fn defaults_are_the_documented_contract() {
        let config = Config::try_parse_from(["edge-gateway"]).unwrap();
        assert_eq!(config.ports.official_listen, Listen(Some("0.0.0.0:7653".parse().unwrap())));
        assert_eq!(config.ports.custom_listen, Listen(Some("0.0.0.0:7654".parse().unwrap())));
        assert_eq!(config.ports.official_tls_listen, Listen(None), "TLS off unless set");
        assert_eq!(config.grpc_listen.to_string(), "0.0.0.0:50051");
        assert_eq!(config.metrics_listen.to_string(), "0.0.0.0:9100");
        assert_eq!(config.limits.max_frame, 64 * 1024);
        assert_eq!(config.limits.auth_timeout, Duration::from_secs(10));
        assert_eq!(config.limits.idle_timeout, Duration::from_secs(180));
        assert_eq!(config.stream, tcpc_proto::stream::StreamSettings::default());
        config.validate().unwrap();
        config.check_urls().unwrap();
        assert_eq!(config.advertised("0.0.0.0:50051".parse().unwrap()), "127.0.0.1:50051");
    }

    #[test]
    fn validate_refuses_nonsense() {
        let config = Config::try_parse_from(["edge-gateway", "--max-in-flight", "0"]).unwrap();
        assert!(config.validate().unwrap_err().to_string().contains("--max-in-flight"));
        let config = Config::try_parse_from(["edge-gateway", "--publish-linger", "1s"]).unwrap();
        assert!(config.validate().unwrap_err().to_string().contains("--publish-linger"));
        let config = Config::try_parse_from(["edge-gateway", "--drain-window", "60s"]).unwrap();
        assert!(config.validate().unwrap_err().to_string().contains("--shutdown-timeout"));
        let config =
            Config::try_parse_from(["edge-gateway", "--official-tls-listen", "0.0.0.0:7655"]).unwrap();
        assert!(config.validate().unwrap_err().to_string().contains("--tls-cert-file"));
        let none = ["edge-gateway", "--official-listen", "", "--custom-listen", ""];
        let config = Config::try_parse_from(none).unwrap();
        assert!(config.validate().unwrap_err().to_string().contains("no device listener"));
        let config = Config::try_parse_from(["edge-gateway", "--stream-replicas", "6"]).unwrap();
        assert!(config.validate().unwrap_err().to_string().contains("--stream-replicas"));
        let config =
            Config::try_parse_from(["edge-gateway", "--redis-url", "redis://a:1,mysql://b"]).unwrap();
        assert!(config.check_urls().unwrap_err().to_string().contains("--redis-url: URL 2 of 2"));
    }

    #[test]
    fn an_empty_listen_address_turns_a_listener_off() {
        let config = Config::try_parse_from([
            "edge-gateway",
            "--official-listen",
            "",
            "--custom-tls-listen",
            "[::]:7656",
        ]);
        let ports = config.unwrap().ports;
        assert_eq!(ports.official_listen, Listen(None));
        assert_eq!(ports.custom_tls_listen, Listen(Some("[::]:7656".parse().unwrap())));
    }
}
