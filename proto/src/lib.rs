//! The contracts between tcp-connectivity pods, and every name that crosses a pod.
//!
//! - [`v1`]: the `tcpc.v1` protobuf types and the `EdgeGateway` gRPC service.
//! - [`names`]: NATS subjects, stream and queue names, Redis keys and the route scripts.
//! - [`route`]: a device route as stored in Redis.
//! - [`trace`]: W3C trace-context propagation over NATS headers and gRPC metadata.
//! - [`stream`]: the JetStream streams' definitions (uplinks, dead letters), and how an
//!   existing stream that differs is reported.
//! - [`connect`]: the NATS and Redis URLs (one server or a cluster) and the Redis
//!   connection both services use.
//! - [`secret`]: how AccessTokens and vouchers are shown in logs (never whole).
//! - [`backoff`]: the jittered exponential back-off every retry loop of both services uses.
//!
//! Edge and worker both depend on this crate and on nothing of each other.

pub mod backoff;
pub mod connect;
pub mod names;
pub mod route;
pub mod secret;
pub mod stream;
pub mod trace;

/// The generated `tcpc.v1` types, client and server.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("tcpc.v1");

    impl std::fmt::Debug for AuthRequest {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("AuthRequest")
                .field("protocol", &self.protocol())
                .field("access_token", &crate::secret::Redacted(&self.access_token))
                .field("connection_id", &self.connection_id)
                .field("pod", &self.pod)
                .field("remote_addr", &self.remote_addr)
                .finish()
        }
    }
}

/// Microseconds since the Unix epoch (route epochs).
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

/// Milliseconds since the Unix epoch, as the envelopes carry time.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}
