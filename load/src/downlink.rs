//! Downlinks as the platform sends them: commands published on the broker at the rate,
//! to the devices in turn (`{prefix}devices/command/{number}/{message_id}`), each
//! carrying its stamp; the devices time them on arrival. The worker's failure answers
//! on `devices/command/response/{message_id}` say why one was not delivered.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rumqttc::{AsyncClient, QoS};
use serde::Deserialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::args::Pattern;
use crate::error::Error;
use crate::stamp::{Stamp, now_us};

/// Where the worker answers commands (ours included: the devices answer them).
pub const ANSWER_TOPIC: &str = "devices/command/response/+";

/// What to publish.
pub struct Plan {
    pub run: Arc<str>,
    pub topic_prefix: String,
    pub number: Pattern,
    pub first: u64,
    pub count: u64,
    /// Commands per second in total.
    pub rate: f64,
    pub per_device: Option<u64>,
}

/// Publishes commands from `start` at the plan's rate until `until`, the counts are done
/// or `stop`; how many were handed to the broker client (counted in `published` as it goes).
///
/// # Errors
/// The MQTT client stopped.
pub async fn publish(
    client: AsyncClient,
    plan: Plan,
    start: Instant,
    until: Instant,
    stop: CancellationToken,
    published: Arc<AtomicU64>,
) -> Result<u64, Error> {
    let total = plan.per_device.map(|each| each * plan.count);
    let every = Duration::from_secs_f64(1.0 / plan.rate);
    let mut k: u64 = 0;
    while total.is_none_or(|total| k < total) {
        let at = start + every.mul_f64(k as f64);
        if at >= until {
            break;
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep_until(at) => {}
        }
        let (device, seq) = (plan.first + k % plan.count, k / plan.count);
        let topic = format!(
            "{}devices/command/{}/{}-{device}-{seq}",
            plan.topic_prefix,
            plan.number.at(device),
            plan.run
        );
        // Stamped as it is handed over: a client that makes it wait counts.
        let mut command = Stamp { device, seq, sent_us: now_us() }.to_command(&plan.run);
        // A custom device without a downlink script gets the bytes as published: one
        // line each (still JSON for the worker, which frames a TP device's anew).
        command.push('\n');
        client.publish(topic, QoS::AtLeastOnce, false, command).await.map_err(Error::Client)?;
        published.fetch_add(1, Ordering::Relaxed);
        k += 1;
    }
    Ok(k)
}

/// How many of `total` commands, published in turn to `count` devices, went to device
/// `local` (0-based).
pub fn published_for(total: u64, count: u64, local: u64) -> u64 {
    total / count + u64::from(local < total % count)
}

/// The worker's answers to the run's commands.
#[derive(Default)]
pub struct Answers {
    /// `{run}-`: the run's message ids start with it.
    prefix: String,
    /// Answered `result: 0` (by the devices).
    pub ok: u64,
    /// Answered with a failure, by message.
    pub failed: BTreeMap<String, u64>,
}

impl Answers {
    pub fn new(run: &str) -> Self {
        Answers { prefix: format!("{run}-"), ..Answers::default() }
    }

    /// A message on the answer topic.
    pub fn take(&mut self, topic: &str, payload: &[u8]) {
        #[derive(Deserialize)]
        struct Answer {
            result: i64,
            #[serde(default)]
            message: String,
        }
        let ours = topic
            .strip_prefix(ANSWER_TOPIC.trim_end_matches('+'))
            .is_some_and(|message_id| message_id.starts_with(&self.prefix));
        let answer = crate::broker::envelope(payload)
            .and_then(|(_, values)| serde_json::from_slice::<Answer>(&values).ok());
        match answer {
            Some(answer) if ours && answer.result == 0 => self.ok += 1,
            Some(answer) if ours => *self.failed.entry(answer.message).or_default() += 1,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    #[test]
    fn commands_go_to_the_devices_in_turn() {
        // 7 commands to 3 devices: 3, 2, 2.
        let each: Vec<_> = (0..3).map(|local| published_for(7, 3, local)).collect();
        assert_eq!(each, [3, 2, 2]);
        assert_eq!(each.iter().sum::<u64>(), 7);
    }

    #[test]
    fn failure_answers_are_counted_by_message() {
        let envelope = |values: &str| {
            let values = base64::engine::general_purpose::STANDARD.encode(values);
            serde_json::json!({"device_id": "d", "values": values}).to_string().into_bytes()
        };
        let mut answers = Answers::new("r1");
        answers.take("devices/command/response/r1-3-0", &envelope(r#"{"result":0}"#));
        answers
            .take("devices/command/response/r1-4-0", &envelope(r#"{"result":1,"message":"device offline"}"#));
        answers
            .take("devices/command/response/r2-4-0", &envelope(r#"{"result":1,"message":"device offline"}"#));
        assert_eq!(answers.ok, 1);
        assert_eq!(answers.failed, BTreeMap::from([("device offline".to_owned(), 1)]));
    }
}
