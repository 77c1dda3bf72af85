//! Why a connection ends, and what the device reads about it.

use bytes::Bytes;
use tcpc_proto::v1::Protocol;

use crate::codec::{self, Frame};
use crate::registry::CloseOrder;
use crate::sources::Refusal;

/// Why a connection ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Close {
    PeerClosed,
    Io(String),
    AuthTimeout,
    AuthRefused(String),
    AuthUnavailable,
    Protocol(String),
    /// The TLS handshake failed (plaintext on a TLS port, an unknown client
    /// certificate, …): there is no channel to tell the device on.
    Tls(String),
    IdleTimeout,
    WriteFailed,
    Order(CloseOrder),
    /// The source address's limits refused it before authentication.
    Refused(Refusal),
}

impl Close {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Close::PeerClosed => "peer_closed",
            Close::Io(_) => "io_error",
            Close::AuthTimeout => "auth_timeout",
            Close::AuthRefused(_) => "auth_refused",
            Close::AuthUnavailable => "auth_unavailable",
            Close::Protocol(_) => "protocol_error",
            Close::Tls(_) => "tls_handshake",
            Close::IdleTimeout => "idle_timeout",
            Close::WriteFailed => "write_failed",
            Close::Order(CloseOrder::Disconnected) => "disconnected",
            Close::Order(CloseOrder::Superseded) => "superseded",
            Close::Order(CloseOrder::Draining) => "draining",
            Close::Refused(refusal) => refusal.label(),
        }
    }

    /// Whether complete messages already read are still handled: everything but
    /// malformed input, after which the rest of the buffer is garbage.
    pub fn keeps_buffer(&self) -> bool {
        !matches!(self, Close::Protocol(_) | Close::Tls(_))
    }

    /// Whether the bytes of a message in progress are a message: a device that sends
    /// and closes at once (the usual pattern of cellular devices) ends its message with
    /// the close.
    pub fn ends_message(&self) -> bool {
        matches!(self, Close::PeerClosed)
    }

    /// What the device is told before the close, if anything.
    pub fn device_message(&self) -> Option<String> {
        Some(match self {
            Close::PeerClosed | Close::Io(_) | Close::WriteFailed | Close::Tls(_) => return None,
            Close::AuthTimeout => "no authentication within the deadline".to_owned(),
            Close::AuthRefused(message) => message.clone(),
            Close::AuthUnavailable => "authentication unavailable, retry later".to_owned(),
            Close::Protocol(message) => message.clone(),
            Close::IdleTimeout => "idle timeout".to_owned(),
            Close::Order(CloseOrder::Disconnected) => "disconnected by the platform".to_owned(),
            Close::Order(CloseOrder::Superseded) => "replaced by a newer connection".to_owned(),
            Close::Order(CloseOrder::Draining) => "server shutting down, reconnect".to_owned(),
            Close::Refused(refusal) => refusal.message().to_owned(),
        })
    }
}

/// The `{"result":1,"message":"…"}` payload of refusals and error frames.
pub(crate) fn error_payload(message: &str) -> Bytes {
    // Written by hand so that `result` comes first, as the protocol documents it.
    let message = serde_json::Value::from(message);
    format!(r#"{{"result":1,"message":{message}}}"#).into()
}

/// What a refusal or error looks like on a listener's wire.
pub(crate) fn error_bytes(protocol: Protocol, during_auth: bool, message: &str) -> Bytes {
    match protocol {
        Protocol::Official => {
            let cmd = if during_auth { codec::cmd::AUTH } else { codec::cmd::ERROR };
            Frame::data(cmd, error_payload(message)).to_bytes()
        }
        // Custom devices speak their own protocol; a JSON line is the least surprising
        // thing to read in a terminal, and the connection closes right after it.
        _ => [&error_payload(message)[..], b"\n"].concat().into(),
    }
}
