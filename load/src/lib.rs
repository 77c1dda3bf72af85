//! `tcpc-load`: simulated devices against a tcp-connectivity deployment, measured end to
//! end through the platform's MQTT broker.
//!
//! - [`devices`]: the devices of one process (connect, authenticate, send stamped
//!   uplinks at their pace, receive and time downlinks, answer commands);
//! - [`uplink`]: uplinks as the platform receives them (matched by run, device and
//!   sequence; latency, duplicates, order);
//! - [`downlink`]: commands published as the platform does, and the worker's answers;
//! - [`shard`]: the devices spread over several processes;
//! - [`report`]: the run's figures, as text or JSON.
//!
//! [`run`] drives a run from the command line's [`Args`].

pub mod args;
mod broker;
pub mod devices;
pub mod downlink;
mod error;
mod histogram;
pub mod report;
mod run;
mod seen;
pub mod shard;
mod stamp;
pub mod uplink;

pub use args::Args;
pub use error::Error;
pub use histogram::Percentiles;
pub use report::Report;
pub use run::{run, run_with_program};
