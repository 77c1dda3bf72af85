//! The script-worker.

pub mod devices;
pub mod platform;
pub mod scripts;
pub mod source;
