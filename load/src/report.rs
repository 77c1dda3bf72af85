//! The run's report: connections, uplinks and downlinks (sent, received, lost,
//! duplicated, out of order, latency percentiles, throughput), errors; as text or JSON.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};

use serde::{Deserialize, Serialize};

use crate::args::Protocol;
use crate::broker::Heard;
use crate::devices::ShardReport;
use crate::downlink::published_for;
use crate::histogram::Percentiles;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub run: String,
    pub protocol: Protocol,
    pub devices: u64,
    pub first: u64,
    pub processes: u32,
    /// How long the traffic phase (idle: the hold) lasted.
    pub traffic_seconds: f64,
    pub connect: Connect,
    pub uplink: Option<Flow>,
    pub downlink: Option<Flow>,
    /// What went wrong, and how often: connections (`connect: …`, `auth refused: …`),
    /// losses of connections (`closed …`), the worker's failure answers to commands
    /// (`downlink answered: …`), the broker connection.
    pub errors: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Connect {
    pub authenticated: u64,
    pub failed: u64,
    /// From the first connection attempt to the last device authenticated.
    pub seconds_to_all: f64,
    /// Per device, from the connection attempt to the edge's answer (custom: the token sent).
    pub latency: Option<Percentiles>,
    /// Still connected when the run ended.
    pub connected_at_end: u64,
}

/// One direction's messages.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Flow {
    pub sent: u64,
    /// Distinct messages received.
    pub received: u64,
    /// Sent and never received, by the end of the drain.
    pub lost: u64,
    pub duplicates: u64,
    /// Received after a later message of the same device.
    pub out_of_order: u64,
    /// Received as another device's (uplinks: the platform message's device id, checked
    /// with `--device-id`; downlinks: delivered to another device's connection).
    pub misattributed: u64,
    /// Received per second, from the start of the traffic to the last one received.
    pub per_second: f64,
    /// From the send to the receipt (uplink: device write → the broker's subscriber;
    /// downlink: the publish → the frame at the device).
    pub latency: Option<Percentiles>,
}

/// What the run knows at its end.
pub struct Parts<'a> {
    pub run: &'a str,
    pub protocol: Protocol,
    pub first: u64,
    pub processes: u32,
    pub traffic_seconds: f64,
    /// Wall-clock microseconds when the traffic began.
    pub traffic_start_us: u64,
    pub devices: ShardReport,
    /// None in idle mode (no broker).
    pub heard: Option<Heard>,
    pub uplinks: bool,
    /// Commands published, when downlinks ran.
    pub published: Option<u64>,
}

impl Report {
    pub fn assemble(parts: Parts) -> Report {
        let Parts { devices: shard, heard, .. } = parts;
        let count = shard.sent.len() as u64;
        let mut errors = shard.errors;
        let per_second = |received: u64, last_us: u64| {
            let seconds = last_us.saturating_sub(parts.traffic_start_us) as f64 / 1e6;
            if seconds > 0.0 { received as f64 / seconds } else { 0.0 }
        };
        let uplink = heard.as_ref().filter(|_| parts.uplinks).map(|heard| {
            let tally = &heard.uplinks;
            let lost =
                shard.sent.iter().zip(&tally.seen).map(|(sent, seen)| sent.saturating_sub(seen.unique)).sum();
            let received = tally.seen.iter().map(|seen| seen.unique).sum();
            Flow {
                sent: shard.sent.iter().sum(),
                received,
                lost,
                duplicates: tally.seen.iter().map(|seen| seen.duplicates).sum(),
                out_of_order: tally.seen.iter().map(|seen| seen.out_of_order).sum(),
                misattributed: tally.misattributed,
                per_second: per_second(received, tally.last_us),
                latency: tally.latency.percentiles(),
            }
        });
        let downlink = parts.published.map(|published| {
            let lost = (0..count)
                .zip(&shard.downlinks_seen)
                .map(|(local, seen)| published_for(published, count, local).saturating_sub(*seen))
                .sum();
            let received = shard.downlinks_seen.iter().sum();
            Flow {
                sent: published,
                received,
                lost,
                duplicates: shard.downlink_duplicates,
                out_of_order: shard.downlink_out_of_order,
                misattributed: shard.downlinks_misdelivered,
                per_second: per_second(received, shard.last_downlink_us),
                latency: shard.downlink_latency.percentiles(),
            }
        });
        if let Some(heard) = heard {
            for (message, count) in heard.answers.failed {
                *errors.entry(format!("downlink answered: {message}")).or_default() += count;
            }
            for (error, count) in heard.errors {
                *errors.entry(error).or_default() += count;
            }
        }
        let progress = shard.progress;
        Report {
            run: parts.run.to_owned(),
            protocol: parts.protocol,
            devices: count,
            first: parts.first,
            processes: parts.processes,
            traffic_seconds: parts.traffic_seconds,
            connect: Connect {
                authenticated: progress.authenticated,
                failed: progress.settled - progress.authenticated,
                seconds_to_all: shard.all_connected_us as f64 / 1e6,
                latency: shard.connect_latency.percentiles(),
                connected_at_end: progress.connected,
            },
            uplink,
            downlink,
            errors,
        }
    }
}

/// `12,345`
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

fn latency_line(latency: &Option<Percentiles>) -> String {
    match latency {
        Some(p) => format!(
            "p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
            p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms
        ),
        None => "none received".to_owned(),
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let protocol = match self.protocol {
            Protocol::Tp => "TP",
            Protocol::Custom => "custom",
            Protocol::Mqtt => "MQTT",
        };
        let last = self.first + self.devices.saturating_sub(1);
        let phase = if self.uplink.is_none() && self.downlink.is_none() { "held" } else { "of traffic" };
        writeln!(
            f,
            "run {}: {} {protocol} devices ({}..={last}) in {} process(es), {:.1} s {phase}",
            self.run,
            thousands(self.devices),
            self.first,
            self.processes,
            self.traffic_seconds
        )?;
        let c = &self.connect;
        writeln!(
            f,
            "connect   {} authenticated, {} failed, all in {:.2} s; {} connected at the end",
            thousands(c.authenticated),
            thousands(c.failed),
            c.seconds_to_all,
            thousands(c.connected_at_end)
        )?;
        writeln!(f, "          per device {}", latency_line(&c.latency))?;
        for (name, flow) in [("uplink", &self.uplink), ("downlink", &self.downlink)] {
            let Some(flow) = flow else { continue };
            let mut line = format!(
                "{name:<9} sent {}  received {} ({}/s)  lost {}  duplicates {}  out of order {}",
                thousands(flow.sent),
                thousands(flow.received),
                thousands(flow.per_second.round() as u64),
                thousands(flow.lost),
                thousands(flow.duplicates),
                thousands(flow.out_of_order)
            );
            if flow.misattributed > 0 {
                let _ = write!(line, "  misattributed {}", thousands(flow.misattributed));
            }
            writeln!(f, "{line}")?;
            writeln!(f, "          latency {}", latency_line(&flow.latency))?;
        }
        if self.errors.is_empty() {
            writeln!(f, "errors    none")?;
        }
        for (i, (error, count)) in self.errors.iter().enumerate() {
            writeln!(f, "{:<9} {:>8}  {error}", if i == 0 { "errors" } else { "" }, thousands(*count))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::downlink::Answers;
    use crate::seen::Seen;
    use crate::uplink::Tally;

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn losses_are_counted_per_device() {
        // Two devices: device 0 sent 3 of which 2 arrived (one twice), device 1 sent 2, both arrived.
        let mut tally = Tally::new("r".into(), 0, 2, None);
        let mut seen = Seen::default();
        for seq in [0, 1, 1] {
            seen.record(seq);
        }
        tally.seen[0] = seen;
        for seq in [0, 1] {
            tally.seen[1].record(seq);
        }
        let devices = ShardReport {
            sent: vec![3, 2],
            downlinks_seen: vec![2, 1],
            errors: BTreeMap::from([("auth refused: no".to_owned(), 1)]),
            ..ShardReport::default()
        };
        let mut answers = Answers::new("r");
        answers.failed.insert("device offline".to_owned(), 2);
        let report = Report::assemble(Parts {
            run: "r",
            protocol: Protocol::Tp,
            first: 0,
            processes: 1,
            traffic_seconds: 1.0,
            traffic_start_us: 0,
            devices,
            heard: Some(Heard { uplinks: tally, answers, errors: BTreeMap::new() }),
            uplinks: true,
            published: Some(4),
        });
        let up = report.uplink.as_ref().unwrap();
        assert_eq!((up.sent, up.received, up.lost, up.duplicates), (5, 4, 1, 1));
        let down = report.downlink.as_ref().unwrap();
        // 4 commands in turn: 2 each; device 1 got one of its two.
        assert_eq!((down.sent, down.received, down.lost), (4, 3, 1));
        assert_eq!(report.errors.len(), 2);
        assert_eq!(report.errors["downlink answered: device offline"], 2);
        let text = report.to_string();
        assert!(text.contains("lost 1"), "{text}");
        assert!(text.contains("downlink answered: device offline"), "{text}");
        let json: Report = serde_json::from_str(&serde_json::to_string(&report).unwrap()).unwrap();
        assert_eq!(json.uplink.unwrap().lost, 1);
    }
}
