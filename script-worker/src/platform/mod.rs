//! The ThingsPanel adapter: its HTTP API ([`client`]), devices from it with caches
//! ([`devices`]), vouchers ([`voucher`]) and MQTT ([`mqtt`]).

pub mod client;
pub mod devices;
pub mod mqtt;
pub mod topics;
pub mod voucher;
