//! Accept loops of the official (TP) and custom listeners.
//!
//! A connection is refused at accept, with an error frame, when the pod is at its
//! connection limit or the uplink bus cannot take publishes (new devices would only
//! add to what the pod cannot deliver). Accept errors are logged and the loop goes on.

use std::sync::Arc;
use std::time::Duration;

use tcpc_proto::v1::Protocol;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::Shared;
use crate::metrics::ReasonLabel;
use crate::session;
use crate::tls::ServerTls;

/// TCP keepalive of device sockets: probes after 60 s of silence, every 10 s, 6 times.
const KEEPALIVE: socket2::TcpKeepalive = socket2::TcpKeepalive::new()
    .with_time(Duration::from_secs(60))
    .with_interval(Duration::from_secs(10))
    .with_retries(6);

/// Accepts connections until `accepting` is cancelled; each session runs on `tracker`.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    protocol: Protocol,
    tls: Option<Arc<ServerTls>>,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    accepting: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = accepting.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(%error, listener = session::listener_label(protocol), "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // On a TLS port the refusal is the close: plaintext would be garbage to it.
        let explain = if tls.is_none() { Some(protocol) } else { None };
        if !shared.bus.is_ready() {
            refuse(&shared, stream, explain, "service unavailable, retry later", "bus_unavailable");
            continue;
        }
        let Ok(permit) = shared.connection_limit.clone().try_acquire_owned() else {
            refuse(&shared, stream, explain, "too many connections", "connection_limit");
            continue;
        };
        let _ = stream.set_nodelay(true);
        // A device that vanished (power cut, NAT timeout) is noticed by keepalive, not
        // only by the idle timeout.
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&KEEPALIVE);
        tracker.spawn(session::serve(shared.clone(), stream, peer, protocol, tls.clone(), permit));
    }
}

/// Tells the device why (on a plaintext port) and closes, without blocking the accept loop: a fresh socket's
/// send buffer takes the few bytes at once, and if it does not, the device loses only
/// the explanation.
fn refuse(
    shared: &Shared,
    stream: TcpStream,
    explain: Option<Protocol>,
    message: &str,
    reason: &'static str,
) {
    shared.metrics.refused.get_or_create(&ReasonLabel { reason }).inc();
    if let Some(protocol) = explain {
        let _ = stream.try_write(&session::error_bytes(protocol, true, message));
    }
}
