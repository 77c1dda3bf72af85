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
//!   [`reorder`] puts each connection's envelopes back in sequence order where an edge
//!   with several publishes in flight had them stored out of order.
//! - [`downlink`] takes the platform's downlinks from the broker subscription, encodes
//!   them (TP frame or the device's downlink script), and delivers them through the edge
//!   pod that holds the device ([`routes`]: route lookups and one gRPC channel per pod);
//!   what cannot be delivered is answered at once.
//! - [`api`] is the plugin HTTP API the platform calls. [`metrics`], [`config`],
//!   [`devices`] (the device model) complete it.
//! - [`service`] composes them: a [`Worker`] on the [`Seams`] a deployment chose (the
//!   service's NATS, Redis and MQTT, or the all-in-one's in-process bus and routes).

pub mod api;
pub mod auth;
pub mod config;
pub mod consume;
pub mod dead_letter;
pub mod devices;
pub mod downlink;
pub mod edge_pods;
pub mod metrics;
pub mod pipeline;
pub mod platform;
pub mod reorder;
pub mod routes;
pub mod scripts;
pub mod service;
pub mod sink;
pub mod source;
pub mod uplink;

pub use service::{Bus, EdgePodWatch, Listeners, Seams, Worker, WorkerError, nats, redis, run, run_with};

/// Lower-case hex of `bytes`: the digests in cache keys, script identities and
/// downlink claims, one allocation each (a downlink's claim is written per message).
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        hex.push(char::from(DIGITS[usize::from(byte >> 4)]));
        hex.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    hex
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_is_lower_case_two_digits_a_byte() {
        assert_eq!(super::hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
    }
}
