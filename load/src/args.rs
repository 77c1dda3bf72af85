//! The command line, and what it resolves to.

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Simulated TCP devices against a tcp-connectivity deployment: connects them,
/// authenticates them, sends uplinks and receives downlinks, and measures each message
/// end to end through the platform's MQTT broker.
///
/// Traffic is what you ask for: `--rate` sends uplinks, `--downlink-rate` publishes
/// commands, either or both; `--idle` only connects and holds.
#[derive(Parser, Debug, Clone)]
#[command(name = "tcpc-load", version)]
pub struct Args {
    /// The edge's device port, `host:port` (comma-separated for several: devices are
    /// spread over them in turn). Default: 127.0.0.1:7653 for TP, 127.0.0.1:7654 for
    /// custom, the `--mqtt-url` broker for mqtt.
    #[arg(long, value_delimiter = ',')]
    pub edge: Vec<String>,
    /// The devices' protocol: TP frames, or the custom protocol (a token line, then
    /// newline-delimited messages: configure the devices with the delimiter framing `\n`).
    /// `mqtt` is the peer baseline, no tcp-connectivity involved: the devices are MQTT
    /// clients (the token as user name) publishing each uplink at QoS 1 straight to the
    /// broker, on `devices/telemetry` in the worker's envelope, so that one broker hop is
    /// measured by the same code as the pipeline; with `--idle`, the broker holds them.
    #[arg(long, value_enum, default_value_t = Protocol::Tp)]
    pub protocol: Protocol,
    /// How many devices.
    #[arg(long, default_value_t = 100)]
    pub devices: u64,
    /// The index of the first device (`{i}` in the patterns), so that several runs cover
    /// disjoint ranges.
    #[arg(long, default_value_t = 0)]
    pub first: u64,
    /// The devices' AccessTokens; `{i}` is the device's index.
    #[arg(long, default_value = "load-{i}")]
    pub token: Pattern,
    /// The devices' numbers, which downlink topics name.
    #[arg(long, default_value = "N{i}")]
    pub number: Pattern,
    /// The devices' ids on the platform: when given, every uplink the broker delivers is
    /// checked to carry the id of the device that sent it (MQTT devices put it in their
    /// envelopes, else their token).
    #[arg(long)]
    pub device_id: Option<Pattern>,
    /// Source addresses to connect from: `127.0.0.2-127.0.0.9` or a comma-separated list
    /// (each address has ~28,000 ephemeral ports; devices take them in turn).
    #[arg(long, value_parser = parse_sources)]
    pub source: Option<Sources>,
    /// New connections per second (in total).
    #[arg(long, default_value_t = 1000.0)]
    pub connect_rate: f64,
    /// Uplinks per second, in total over all the devices (each device sends at the same
    /// pace, the devices spread over the period); `max`: each device as fast as the edge
    /// takes them.
    #[arg(long)]
    pub rate: Option<Rate>,
    /// Uplinks per device, after which the device stops sending (implies `--rate max`
    /// unless a rate is given).
    #[arg(long)]
    pub messages: Option<u64>,
    /// Uplink payload size in bytes (at least the ~70 bytes of the stamp every message
    /// carries: run, device, sequence, send time).
    #[arg(long, default_value_t = 0)]
    pub size: usize,
    /// How long traffic runs (idle: how long the connections are held); with
    /// `--messages` or `--downlinks` it ends sooner when every message went.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Connect, authenticate and hold: no traffic.
    #[arg(long, conflicts_with_all = ["rate", "messages", "downlink_rate", "downlinks"])]
    pub idle: bool,
    /// Commands per second published on the broker as the platform does, in total, to
    /// the devices in turn.
    #[arg(long)]
    pub downlink_rate: Option<f64>,
    /// Commands per device, after which publishing stops.
    #[arg(long, requires = "downlink_rate")]
    pub downlinks: Option<u64>,
    /// After the traffic, how long to wait for messages still on their way (what has not
    /// arrived by then is lost).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain: Duration,
    /// A TP device that sent nothing for this long sends a heartbeat (the edge closes
    /// connections silent for its idle timeout, 180 s by default).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub heartbeat: Duration,
    /// The platform's MQTT broker: uplinks are received there (`devices/telemetry`) and
    /// commands published there.
    #[arg(long, env = "MQTT_URL")]
    pub mqtt_url: Option<String>,
    /// A broker user that may subscribe to `devices/telemetry` and publish under the
    /// topic prefix.
    #[arg(long, env = "MQTT_USERNAME")]
    pub mqtt_username: Option<String>,
    #[arg(long, env = "MQTT_PASSWORD", hide_env_values = true)]
    pub mqtt_password: Option<String>,
    /// The plugin's topic prefix, under which downlinks are published (the worker's
    /// TOPIC_PREFIX).
    #[arg(long, env = "TOPIC_PREFIX", default_value = "plugin/TCP/")]
    pub topic_prefix: String,
    /// Processes holding the devices (each a disjoint share; one process may hold about
    /// as many devices as its open-files limit).
    #[arg(long, default_value_t = 1)]
    pub processes: u32,
    /// The final report as JSON on stdout (else text).
    #[arg(long)]
    pub json: bool,
    /// Internal: this process holds a share of the devices for a parent `tcpc-load`,
    /// which it talks to over stdin and stdout.
    #[arg(long, hide = true, requires = "run_id")]
    pub shard: bool,
    /// Internal: the run's id, shared by the parent and its shard processes.
    #[arg(long, hide = true)]
    pub run_id: Option<String>,
}

/// The devices' protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tp,
    Custom,
    Mqtt,
}

/// A name with `{i}` standing for the device's index.
#[derive(Clone, Debug)]
pub struct Pattern(String);

impl Pattern {
    pub fn at(&self, index: u64) -> String {
        self.0.replace("{i}", &index.to_string())
    }

    fn varies(&self) -> bool {
        self.0.contains("{i}")
    }
}

impl std::str::FromStr for Pattern {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Pattern(s.to_owned()))
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An uplink rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rate {
    /// Messages per second in total.
    PerSecond(f64),
    /// Each device as fast as the edge takes its messages.
    Max,
}

impl std::str::FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "max" {
            return Ok(Rate::Max);
        }
        match s.parse::<f64>() {
            Ok(rate) if rate > 0.0 && rate.is_finite() => Ok(Rate::PerSecond(rate)),
            _ => Err(format!("{s:?}: a positive number of messages per second, or max")),
        }
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rate::PerSecond(rate) => write!(f, "{rate}"),
            Rate::Max => f.write_str("max"),
        }
    }
}

/// Source addresses, taken in turn by the devices.
#[derive(Clone, Debug, PartialEq)]
pub struct Sources(pub Vec<IpAddr>);

fn parse_sources(s: &str) -> Result<Sources, String> {
    if let Some((from, to)) = s.split_once('-') {
        let parse = |a: &str| a.trim().parse::<Ipv4Addr>().map_err(|e| format!("{a:?}: {e}"));
        let (from, to) = (u32::from(parse(from)?), u32::from(parse(to)?));
        if from > to || to - from >= 1 << 16 {
            return Err(format!("{s:?}: the range must go up, and hold at most 65,536 addresses"));
        }
        return Ok(Sources((from..=to).map(|a| IpAddr::V4(a.into())).collect()));
    }
    s.split(',')
        .map(|a| a.trim().parse::<IpAddr>().map_err(|e| format!("{a:?}: {e}")))
        .collect::<Result<_, _>>()
        .map(Sources)
}

/// What the traffic phase does.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Traffic {
    pub uplink: Option<Uplinks>,
    pub downlink: Option<Downlinks>,
    /// The phase's longest length.
    pub duration: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Uplinks {
    pub rate: Rate,
    pub per_device: Option<u64>,
    pub size: usize,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Downlinks {
    pub rate: f64,
    pub per_device: Option<u64>,
}

/// The phase's length when no count ends it sooner.
const DEFAULT_DURATION: Duration = Duration::from_secs(10);

impl Args {
    /// What the traffic phase does, checked.
    ///
    /// # Errors
    /// The flags contradict each other or ask for nothing.
    pub fn traffic(&self) -> Result<Traffic, String> {
        if self.devices == 0 {
            return Err("--devices: at least one".into());
        }
        if self.devices > 1 && !self.token.varies() {
            // Every connection would replace the previous one of the same device.
            return Err("--token must contain {i} when there are several devices".into());
        }
        if !(self.connect_rate > 0.0 && self.connect_rate.is_finite()) {
            return Err("--connect-rate must be positive".into());
        }
        if self.processes == 0 || u64::from(self.processes) > self.devices {
            return Err("--processes: between 1 and the number of devices".into());
        }
        let uplink = match (self.rate, self.messages) {
            (None, None) => None,
            (rate, per_device) => {
                Some(Uplinks { rate: rate.unwrap_or(Rate::Max), per_device, size: self.size })
            }
        };
        let downlink = match self.downlink_rate {
            Some(rate) if rate > 0.0 && rate.is_finite() => {
                Some(Downlinks { rate, per_device: self.downlinks })
            }
            Some(_) => return Err("--downlink-rate must be positive".into()),
            None => None,
        };
        if uplink.is_none() && downlink.is_none() && !self.idle && !self.shard {
            return Err("say what to do: --rate or --messages (uplinks), --downlink-rate, or --idle".into());
        }
        if self.protocol == Protocol::Mqtt && downlink.is_some() {
            return Err("--protocol mqtt measures uplinks and idle clients, not downlinks".into());
        }
        if (uplink.is_some() || downlink.is_some()) && self.mqtt_url.is_none() && !self.shard {
            return Err("--mqtt-url: uplinks are received and downlinks published on the broker".into());
        }
        let counted = uplink.is_none_or(|u| u.per_device.is_some())
            && downlink.is_none_or(|d| d.per_device.is_some())
            && !self.idle;
        // Counted traffic ends when the counts are done; the duration is then a bound.
        let duration =
            self.duration.unwrap_or(if counted { Duration::from_secs(3600) } else { DEFAULT_DURATION });
        Ok(Traffic { uplink, downlink, duration })
    }

    /// The device ports, resolved.
    ///
    /// # Errors
    /// A name that does not resolve.
    pub async fn edges(&self) -> Result<Vec<SocketAddr>, (String, std::io::Error)> {
        let mut resolved = Vec::with_capacity(self.edge.len().max(1));
        for name in self.device_ports()? {
            let mut found = tokio::net::lookup_host(name.as_str()).await.map_err(|e| (name.clone(), e))?;
            let addr = found.next().ok_or_else(|| {
                (name.clone(), std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))
            })?;
            resolved.push(addr);
        }
        Ok(resolved)
    }

    /// The ports the devices connect to, as named: `--edge`, else the protocol's default.
    fn device_ports(&self) -> Result<Vec<String>, (String, std::io::Error)> {
        if !self.edge.is_empty() {
            return Ok(self.edge.clone());
        }
        Ok(vec![match self.protocol {
            Protocol::Tp => "127.0.0.1:7653".to_owned(),
            Protocol::Custom => "127.0.0.1:7654".to_owned(),
            Protocol::Mqtt => {
                let url = self.mqtt_url.as_deref().unwrap_or("mqtt://127.0.0.1:1883");
                broker_port(url).ok_or_else(|| {
                    let why = "the MQTT devices take mqtt://host:port (or --edge)";
                    (url.to_owned(), std::io::Error::new(std::io::ErrorKind::InvalidInput, why))
                })?
            }
        }])
    }

    /// The command line of shard `index` of `count`: its share of the devices and of
    /// the rates, and the device-side flags only (the broker, with its password, stays
    /// with the parent).
    pub fn shard_args(&self, traffic: &Traffic, index: u32, count: u32, run: &str) -> Vec<OsString> {
        let (first, devices) = share(self.first, self.devices, index, count);
        let part = devices as f64 / self.devices as f64;
        let mut out: Vec<OsString> = Vec::new();
        let mut flag = |name: &str, value: String| {
            out.push(format!("--{name}").into());
            out.push(value.into());
        };
        // The MQTT devices' broker is named by the URL, which stays with the parent.
        if let Ok(ports) = self.device_ports() {
            flag("edge", ports.join(","));
        }
        if let Some(device_id) = &self.device_id {
            flag("device-id", device_id.to_string());
        }
        flag("protocol", self.protocol.to_possible_value().expect("no skipped variant").get_name().into());
        flag("first", first.to_string());
        flag("devices", devices.to_string());
        flag("token", self.token.to_string());
        if let Some(Sources(sources)) = &self.source {
            flag("source", sources.iter().map(IpAddr::to_string).collect::<Vec<_>>().join(","));
        }
        flag("connect-rate", (self.connect_rate * part).to_string());
        match self.rate {
            Some(Rate::PerSecond(rate)) => flag("rate", (rate * part).to_string()),
            Some(Rate::Max) => flag("rate", "max".into()),
            None => {}
        }
        if let Some(messages) = self.messages {
            flag("messages", messages.to_string());
        }
        flag("size", self.size.to_string());
        flag("duration", humantime::format_duration(traffic.duration).to_string());
        flag("heartbeat", humantime::format_duration(self.heartbeat).to_string());
        flag("run-id", run.to_owned());
        out.push("--shard".into());
        out
    }
}

/// `host:port` of a plain `mqtt://` or `tcp://` URL (the MQTT devices speak no TLS).
fn broker_port(url: &str) -> Option<String> {
    let rest = url.strip_prefix("mqtt://").or_else(|| url.strip_prefix("tcp://"))?;
    let authority = rest.split(['/', '?']).next()?;
    // Credentials in the URL are the platform's, not the devices'.
    let host_port = authority.rsplit('@').next()?;
    Some(if host_port.contains(':') { host_port.to_owned() } else { format!("{host_port}:1883") })
}

/// Shard `index` of `count` of the devices `first..first + devices`: (first, count),
/// contiguous and in order, sizes differing by one at most.
pub fn share(first: u64, devices: u64, index: u32, count: u32) -> (u64, u64) {
    let (index, count) = (u64::from(index), u64::from(count));
    let start = devices * index / count;
    let end = devices * (index + 1) / count;
    (first + start, end - start)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Args {
        Args::try_parse_from(std::iter::once("tcpc-load").chain(line.split_whitespace())).unwrap()
    }

    #[test]
    fn sources_as_a_range_or_a_list() {
        let range = parse_sources("127.0.0.2-127.0.0.9").unwrap();
        assert_eq!(range.0.len(), 8);
        assert_eq!(range.0[7], IpAddr::from([127, 0, 0, 9]));
        assert_eq!(parse_sources("10.0.0.1,::1").unwrap().0.len(), 2);
        assert!(parse_sources("127.0.0.9-127.0.0.2").is_err());
    }

    #[test]
    fn shares_cover_the_devices_once() {
        let shares: Vec<_> = (0..3).map(|i| share(10, 100, i, 3)).collect();
        assert_eq!(shares, [(10, 33), (43, 33), (76, 34)]);
    }

    #[test]
    fn traffic_is_asked_for_explicitly() {
        assert!(args("--devices 5").traffic().unwrap_err().contains("say what to do"));
        assert!(args("--rate 10").traffic().unwrap_err().contains("--mqtt-url"));
        assert!(args("--idle --token t").traffic().unwrap_err().contains("{i}"));
        let counted = args("--messages 50 --mqtt-url mqtt://h").traffic().unwrap();
        assert_eq!(counted.uplink.unwrap().rate, Rate::Max);
        assert!(counted.duration > DEFAULT_DURATION, "counts end it, the duration only bounds it");
        assert_eq!(args("--idle").traffic().unwrap().duration, DEFAULT_DURATION);
    }

    #[test]
    fn mqtt_devices_go_to_the_brokers_port_and_send_no_commands() {
        let parent =
            args("--protocol mqtt --devices 4 --messages 5 --mqtt-url mqtt://user:pw@broker:1884?x=1");
        assert_eq!(parent.device_ports().unwrap(), ["broker:1884"]);
        let line = parent.shard_args(&parent.traffic().unwrap(), 0, 2, "run1");
        let child = Args::try_parse_from(std::iter::once(OsString::from("tcpc-load")).chain(line)).unwrap();
        assert_eq!((child.protocol, child.edge), (Protocol::Mqtt, vec!["broker:1884".to_owned()]));
        assert_eq!(broker_port("mqtt://broker").as_deref(), Some("broker:1883"));
        assert_eq!(broker_port("mqtts://broker:8883"), None, "no TLS devices");
        let downlinks = args("--protocol mqtt --downlink-rate 10 --mqtt-url mqtt://h");
        assert!(downlinks.traffic().unwrap_err().contains("not downlinks"));
    }

    #[test]
    fn a_shard_gets_its_devices_and_its_part_of_the_rates_but_no_broker() {
        let parent = args(
            "--devices 100 --rate 1000 --connect-rate 500 --mqtt-url mqtt://h --mqtt-password pw --processes 4",
        );
        let line = parent.shard_args(&parent.traffic().unwrap(), 1, 4, "run1");
        assert!(!line.iter().any(|arg| arg.to_string_lossy().starts_with("--mqtt")), "{line:?}");
        let child = Args::try_parse_from(std::iter::once(OsString::from("tcpc-load")).chain(line)).unwrap();
        assert_eq!((child.first, child.devices), (25, 25));
        assert_eq!(child.rate, Some(Rate::PerSecond(250.0)));
        assert_eq!(child.connect_rate, 125.0);
        assert!(child.shard);
        assert_eq!(child.edge, ["127.0.0.1:7653"], "the default port, named for the shard");
        assert_eq!(child.run_id.as_deref(), Some("run1"));
    }
}
