//! The JetStream streams (uplinks, dead letters), created by whichever pod needs one
//! first with one configuration. A stream that already exists is checked against it:
//! a setting the services cannot work with is an error, any other difference a warning
//! naming the field. Neither is changed by the services: with pods of two versions
//! running at once (a rolling update) they would fight over it, and a stream's
//! configuration is the operator's (`nats stream edit`, or delete it when empty).

use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::{self, context::CreateStreamError, stream};

use crate::names;

/// Replicas of the streams unless configured (`UPLINK_STREAM_REPLICAS`): a single
/// `nats-server` can hold no more.
pub const DEFAULT_REPLICAS: usize = 1;
/// The most replicas JetStream keeps of a stream.
pub const MAX_REPLICAS: usize = 5;

/// How long dead letters are kept, and how many bytes of them at most (the oldest go
/// first).
pub const DEAD_LETTERS_KEPT_FOR: Duration = Duration::from_secs(7 * 24 * 3600);
pub const DEAD_LETTERS_KEPT_BYTES: i64 = 1 << 30;

/// The uplink stream's bytes unless configured (`UPLINK_STREAM_MAX_BYTES`): JetStream
/// reserves a stream's `max_bytes` in its store when the stream is created, so the
/// default must fit a small one (the NATS chart's volume is 10 GiB), with the dead
/// letters' GiB beside it.
pub const DEFAULT_MAX_BYTES: &str = "1GiB";

/// The settings of the streams the services create, the same flags on the edge and the
/// worker: whichever needs a stream first creates it, so they must agree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::Args)]
pub struct StreamSettings {
    /// Copies JetStream keeps of the uplink and dead-letter streams when this process
    /// creates them (3 on a JetStream cluster; 1 on a single server).
    #[arg(long = "stream-replicas", env = "UPLINK_STREAM_REPLICAS", default_value_t = DEFAULT_REPLICAS)]
    pub replicas: usize,
    /// The most bytes the uplink stream keeps (`512MiB`, `10GiB`, `2TiB`, or bytes; 0: no
    /// limit but JetStream's store): past it the oldest envelopes go, which workers have
    /// normally long taken. Size it for the longest worker outage to ride out (uplinks/s
    /// × their size × the outage's seconds); JetStream's store must hold it.
    #[arg(long = "stream-max-bytes", env = "UPLINK_STREAM_MAX_BYTES", default_value = DEFAULT_MAX_BYTES, value_parser = parse_bytes)]
    pub max_bytes: u64,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings { replicas: DEFAULT_REPLICAS, max_bytes: parse_bytes(DEFAULT_MAX_BYTES).unwrap_or(0) }
    }
}

impl StreamSettings {
    /// # Errors
    /// A setting JetStream would refuse.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_REPLICAS).contains(&self.replicas) {
            return Err(format!("--stream-replicas must be between 1 and {MAX_REPLICAS}"));
        }
        if i64::try_from(self.max_bytes).is_err() {
            return Err("--stream-max-bytes is beyond what JetStream can hold".to_owned());
        }
        Ok(())
    }
}

/// A byte count: digits, optionally followed by `KiB`, `MiB`, `GiB` or `TiB`.
///
/// # Errors
/// Anything else, or a count past `u64`.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (count, unit) = text.split_at(digits);
    let shift = match unit.trim() {
        "" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        "TiB" => 40,
        other => return Err(format!("{other:?}: the units are KiB, MiB, GiB and TiB")),
    };
    let count: u64 = count.parse().map_err(|_| format!("{text:?} is not a byte count"))?;
    count.checked_mul(1 << shift).ok_or_else(|| format!("{text:?} is too large"))
}

/// The uplink stream: file storage, its copies, a de-duplication window for retried
/// publishes, a day of retention (limits retention: the hand-over between lease
/// generations and a partition's resume point need envelopes kept after they were
/// taken) within `max_bytes`, past which the oldest go.
pub fn uplink_stream_config(settings: StreamSettings) -> stream::Config {
    stream::Config {
        name: names::UPLINK_STREAM.to_owned(),
        subjects: vec![names::UPLINK_SUBJECTS.to_owned()],
        storage: stream::StorageType::File,
        num_replicas: settings.replicas,
        duplicate_window: names::UPLINK_DUPLICATE_WINDOW,
        max_age: Duration::from_secs(24 * 3600),
        // Zero is JetStream's "no limit" (-1).
        max_bytes: i64::try_from(settings.max_bytes).ok().filter(|&bytes| bytes > 0).unwrap_or(-1),
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    }
}

/// The dead-letter stream: envelopes that can never be delivered, with their reason,
/// for a week and a GiB at most.
pub fn dead_letter_stream_config(replicas: usize) -> stream::Config {
    stream::Config {
        name: names::DEAD_LETTER_STREAM.to_owned(),
        subjects: vec![names::DEAD_LETTER_SUBJECT.to_owned()],
        storage: stream::StorageType::File,
        num_replicas: replicas,
        // JetStream's own default, said here so that it is compared like the rest.
        duplicate_window: names::UPLINK_DUPLICATE_WINDOW,
        max_age: DEAD_LETTERS_KEPT_FOR,
        max_bytes: DEAD_LETTERS_KEPT_BYTES,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    }
}

/// A setting of an existing stream that differs from the one the services create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Difference {
    pub field: &'static str,
    pub ours: String,
    pub theirs: String,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} is {} (expected {})", self.field, self.theirs, self.ours)
    }
}

/// A stream cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("create or look up the stream: {0}")]
    Create(#[source] CreateStreamError),
    #[error("the existing stream {stream} cannot work: {}", list(.differences))]
    Incompatible { stream: String, differences: Vec<Difference> },
}

fn list(differences: &[Difference]) -> String {
    differences.iter().map(Difference::to_string).collect::<Vec<_>>().join(", ")
}

/// What an existing stream's configuration means for the services.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Comparison {
    /// Settings the services cannot work with: publishes that no stream takes, or
    /// envelopes dropped before a worker took them (another retention policy).
    pub fatal: Vec<Difference>,
    /// Settings that work, with other guarantees (fewer replicas, memory storage, other
    /// limits): warned about.
    pub other: Vec<Difference>,
}

/// Compares an existing stream's configuration (`theirs`) with ours.
pub fn compare(ours: &stream::Config, theirs: &stream::Config) -> Comparison {
    let mut comparison = Comparison::default();
    let mut differ = |fatal: bool, field: &'static str, ours: String, theirs: String| {
        if ours != theirs {
            let difference = Difference { field, ours, theirs };
            if fatal { comparison.fatal.push(difference) } else { comparison.other.push(difference) }
        }
    };
    // Every subject of ours must reach the stream (another list that covers them works,
    // e.g. `tcpc.>`).
    let covered =
        ours.subjects.iter().all(|subject| theirs.subjects.iter().any(|pattern| covers(pattern, subject)));
    differ(!covered, "subjects", ours.subjects.join(" "), theirs.subjects.join(" "));
    // Work-queue or interest retention deletes what a consumer acknowledged, or what
    // was published while no consumer existed: the hand-over between lease generations
    // and the resume point need the envelopes kept until their age.
    differ(true, "retention", format!("{:?}", ours.retention), format!("{:?}", theirs.retention));
    differ(false, "storage", format!("{:?}", ours.storage), format!("{:?}", theirs.storage));
    differ(false, "num_replicas", ours.num_replicas.to_string(), theirs.num_replicas.to_string());
    differ(
        false,
        "duplicate_window",
        format!("{:?}", ours.duplicate_window),
        format!("{:?}", theirs.duplicate_window),
    );
    differ(false, "max_age", age(ours.max_age), age(theirs.max_age));
    differ(false, "max_bytes", limit(ours.max_bytes), limit(theirs.max_bytes));
    differ(false, "max_messages", limit(ours.max_messages), limit(theirs.max_messages));
    differ(
        false,
        "max_messages_per_subject",
        limit(ours.max_messages_per_subject),
        limit(theirs.max_messages_per_subject),
    );
    differ(
        false,
        "max_message_size",
        limit(ours.max_message_size.into()),
        limit(theirs.max_message_size.into()),
    );
    differ(false, "discard", format!("{:?}", ours.discard), format!("{:?}", theirs.discard));
    comparison
}

/// A stream limit as JetStream means it: zero or negative is none.
fn limit(value: i64) -> String {
    if value > 0 { value.to_string() } else { "unlimited".to_owned() }
}

fn age(value: Duration) -> String {
    if value.is_zero() { "unlimited".to_owned() } else { format!("{value:?}") }
}

/// Whether the subject `pattern` of a stream takes every subject `subject` matches.
fn covers(pattern: &str, subject: &str) -> bool {
    let mut pattern = pattern.split('.');
    for token in subject.split('.') {
        match pattern.next() {
            Some(">") => return true,
            Some("*") if token != ">" => {}
            Some(literal) if literal == token => {}
            _ => return false,
        }
    }
    pattern.next().is_none()
}

/// One stream as a pod uses it: created if missing, checked if not, its differences
/// warned about once per change (pods look it up every few seconds).
pub struct StreamCheck {
    config: stream::Config,
    reported: Mutex<Vec<Difference>>,
}

impl StreamCheck {
    pub fn new(config: stream::Config) -> Self {
        StreamCheck { config, reported: Mutex::default() }
    }

    /// The stream, created with our configuration unless it exists.
    ///
    /// # Errors
    /// JetStream did not answer or refused, or the existing stream cannot work.
    pub async fn ensure(&self, jetstream: &jetstream::Context) -> Result<stream::Stream, StreamError> {
        let stream =
            jetstream.get_or_create_stream(self.config.clone()).await.map_err(StreamError::Create)?;
        let Comparison { fatal, other } = compare(&self.config, &stream.cached_info().config);
        if !fatal.is_empty() {
            return Err(StreamError::Incompatible { stream: self.config.name.clone(), differences: fatal });
        }
        let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        if *reported != other {
            for Difference { field, ours, theirs } in &other {
                tracing::warn!(
                    stream = %self.config.name, field, theirs, ours,
                    "the existing stream differs from this pod's settings; used as it is \
                     (change it with `nats stream edit`)"
                );
            }
            *reported = other;
        }
        Ok(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_covered_by_wider_patterns() {
        assert!(covers("tcpc.up.>", "tcpc.up.>"));
        assert!(covers("tcpc.>", "tcpc.up.>"));
        assert!(covers(">", "tcpc.dead"));
        assert!(covers("tcpc.*", "tcpc.dead"));
        assert!(!covers("tcpc.*", "tcpc.up.>"));
        assert!(!covers("tcpc.up.*", "tcpc.up.>"), "only one token of what `>` takes");
        assert!(!covers("tcpc.up.1", "tcpc.up.>"));
        assert!(!covers("tcpc.dead.x", "tcpc.dead"));
    }

    #[test]
    fn byte_counts_take_binary_units() {
        assert_eq!(parse_bytes("10GiB"), Ok(10 << 30));
        assert_eq!(parse_bytes(" 512 MiB "), Ok(512 << 20));
        assert_eq!(parse_bytes("0"), Ok(0));
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert!(parse_bytes("10GB").unwrap_err().contains("KiB, MiB, GiB and TiB"));
        assert!(parse_bytes("GiB").is_err());
        assert!(parse_bytes("99999999TiB").is_err());
        assert_eq!(StreamSettings::default().max_bytes, 1 << 30);
        let unlimited = uplink_stream_config(StreamSettings { max_bytes: 0, ..StreamSettings::default() });
        assert_eq!(unlimited.max_bytes, -1);
    }

    #[test]
    fn differences_are_fatal_only_where_the_services_cannot_work() {
        let ours = uplink_stream_config(StreamSettings { replicas: 3, ..StreamSettings::default() });
        assert_eq!(compare(&ours, &ours), Comparison::default());
        let theirs = stream::Config {
            num_replicas: 1,
            storage: stream::StorageType::Memory,
            subjects: vec!["tcpc.>".to_owned()],
            max_bytes: -1,
            ..ours.clone()
        };
        let comparison = compare(&ours, &theirs);
        assert!(comparison.fatal.is_empty());
        let fields: Vec<_> = comparison.other.iter().map(|d| d.field).collect();
        assert_eq!(fields, ["subjects", "storage", "num_replicas", "max_bytes"]);
        assert_eq!(comparison.other[2].to_string(), "num_replicas is 1 (expected 3)");

        let theirs = stream::Config {
            retention: stream::RetentionPolicy::WorkQueue,
            subjects: vec!["other.>".to_owned()],
            ..ours.clone()
        };
        let fatal: Vec<_> = compare(&ours, &theirs).fatal.into_iter().map(|d| d.field).collect();
        assert_eq!(fatal, ["subjects", "retention"]);
    }
}
