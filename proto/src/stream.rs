//! The uplink stream's definition, created by whichever pod needs it first (edges
//! publish to it, workers consume it) with the same configuration.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use crate::names;

/// The uplink stream's configuration: file storage, a de-duplication window for retried
/// publishes, a day of retention for envelopes no worker took.
pub fn uplink_stream_config() -> stream::Config {
    stream::Config {
        name: names::UPLINK_STREAM.to_owned(),
        subjects: vec![names::UPLINK_SUBJECTS.to_owned()],
        storage: stream::StorageType::File,
        duplicate_window: names::UPLINK_DUPLICATE_WINDOW,
        max_age: Duration::from_secs(24 * 3600),
        ..Default::default()
    }
}

/// Creates the uplink stream unless it exists; its handle.
///
/// # Errors
/// JetStream did not answer or refused.
pub async fn ensure_uplink_stream(
    jetstream: &jetstream::Context,
) -> Result<jetstream::stream::Stream, String> {
    jetstream.get_or_create_stream(uplink_stream_config()).await.map_err(|e| e.to_string())
}
