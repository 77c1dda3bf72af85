//! What every message carries so that it can be matched and timed wherever it arrives:
//! the run, the device, its sequence number and its send time, as JSON (the worker
//! passes a TP device's JSON to the platform byte for byte; a custom device's script
//! can parse it).
//!
//! Send times are wall-clock microseconds: the sender and the receiver may be different
//! processes of the run (on one machine, so one clock).

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;

/// The key naming the run; a message without it (or of another run) is not ours.
const RUN_KEY: &str = "tcpc_load";

/// One message's identity and send time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub device: u64,
    pub seq: u64,
    /// Wall-clock microseconds when it was sent.
    pub sent_us: u64,
}

/// The wall clock in microseconds.
pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(rename = "tcpc_load")]
    run: &'a str,
    d: u64,
    s: u64,
    t: u64,
}

/// A downlink as published: a command whose params are the stamp (the edge adds the
/// `message_id` for TP devices, which is not needed here).
#[derive(Deserialize)]
struct Command<'a> {
    #[serde(borrow)]
    params: Wire<'a>,
}

impl Stamp {
    /// The JSON object, padded to `size` bytes when that is longer than the stamp and
    /// an empty pad (7 bytes).
    pub fn to_json(self, run: &str, size: usize) -> String {
        let Stamp { device, seq, sent_us } = self;
        let mut json = format!(r#"{{"{RUN_KEY}":"{run}","d":{device},"s":{seq},"t":{sent_us}"#);
        const PAD: &str = ",\"p\":\"";
        // The pad's key and quotes, and the closing brace.
        let fixed = json.len() + PAD.len() + 2;
        if size >= fixed {
            json.push_str(PAD);
            json.extend(std::iter::repeat_n('x', size - fixed));
            json.push('"');
        }
        json.push('}');
        json
    }

    /// The command published to a device: `{"method":"tcpc_load","params":<stamp>}`.
    pub fn to_command(self, run: &str) -> String {
        format!(r#"{{"method":"{RUN_KEY}","params":{}}}"#, self.to_json(run, 0))
    }

    /// The stamp of `json` if it is a message of `run`.
    pub fn read(run: &str, json: &[u8]) -> Option<Stamp> {
        let wire: Wire = serde_json::from_slice(json).ok()?;
        (wire.run == run).then_some(Stamp { device: wire.d, seq: wire.s, sent_us: wire.t })
    }

    /// The stamp of a command a device received, if it is of `run`.
    pub fn read_command(run: &str, json: &[u8]) -> Option<Stamp> {
        let command: Command = serde_json::from_slice(json).ok()?;
        let wire = command.params;
        (wire.run == run).then_some(Stamp { device: wire.d, seq: wire.s, sent_us: wire.t })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAMP: Stamp = Stamp { device: 7, seq: 42, sent_us: 1_764_470_000_000_000 };

    #[test]
    fn round_trips_and_pads_to_the_size() {
        let plain = STAMP.to_json("r1", 0);
        assert_eq!(Stamp::read("r1", plain.as_bytes()), Some(STAMP));
        // The smallest padded size: the stamp and an empty pad `,"p":""`.
        for size in [plain.len() + 7, 200, 1000] {
            let padded = STAMP.to_json("r1", size);
            assert_eq!(padded.len(), size);
            assert_eq!(Stamp::read("r1", padded.as_bytes()), Some(STAMP));
        }
        assert_eq!(STAMP.to_json("r1", 10), plain, "a size below the stamp's is the stamp");
    }

    #[test]
    fn other_runs_and_other_messages_are_not_ours() {
        assert_eq!(Stamp::read("r2", STAMP.to_json("r1", 0).as_bytes()), None);
        assert_eq!(Stamp::read("r1", br#"{"temperature":36.5}"#), None);
        assert_eq!(Stamp::read("r1", b"not json"), None);
    }

    #[test]
    fn commands_carry_the_stamp_in_their_params() {
        let command = STAMP.to_command("r1");
        assert_eq!(Stamp::read_command("r1", command.as_bytes()), Some(STAMP));
        // As a TP device gets it: the edge put the message id first.
        let delivered = command.replacen('{', r#"{"message_id":"m1","#, 1);
        assert_eq!(Stamp::read_command("r1", delivered.as_bytes()), Some(STAMP));
        assert_eq!(Stamp::read_command("r2", delivered.as_bytes()), None);
    }
}
