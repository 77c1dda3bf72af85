//! Device clients: a TP device (framed) and a raw TCP device.

use std::net::SocketAddr;

use bytes::Bytes;
use edge_gateway::codec::{Frame, TpCodec, cmd};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

use crate::DEADLINE;

/// A device speaking TP.
pub struct TpDevice {
    framed: Framed<TcpStream, TpCodec>,
}

impl TpDevice {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect to the official listener");
        Self::over(stream)
    }

    /// A device on a connection the test set up (socket options, source address).
    pub fn over(stream: TcpStream) -> Self {
        TpDevice { framed: Framed::new(stream, TpCodec::new(1 << 20)) }
    }

    /// Sends an auth frame and returns the answer's payload.
    pub async fn auth(&mut self, token: &str) -> String {
        self.send(Frame::data(cmd::AUTH, Bytes::copy_from_slice(token.as_bytes()))).await;
        let answer = self.next().await.expect("an auth answer");
        assert_eq!((answer.cmd, answer.frame_type), (cmd::AUTH, edge_gateway::codec::FrameType::Data));
        String::from_utf8(answer.payload.to_vec()).unwrap()
    }

    /// Connects and authenticates; panics unless accepted.
    pub async fn online(addr: SocketAddr, token: &str) -> Self {
        let mut device = Self::connect(addr).await;
        assert_eq!(device.auth(token).await, r#"{"result":0}"#);
        device
    }

    pub async fn send(&mut self, frame: Frame) {
        self.framed.send(frame).await.expect("send a frame");
    }

    /// Sends numbered telemetry frames, `{"n":<n>}` for each `n` of `range`, in order.
    pub async fn send_numbered(&mut self, range: std::ops::Range<u32>) {
        for n in range {
            self.send(Frame::data(cmd::TELEMETRY, Bytes::from(format!(r#"{{"n":{n}}}"#)))).await;
        }
    }

    /// The socket, to read or write bytes past the framing (only while the framing
    /// has nothing buffered, e.g. between frames).
    pub fn stream_mut(&mut self) -> &mut TcpStream {
        self.framed.get_mut()
    }

    /// Writes bytes as they are (split, coalesced or malformed frames).
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let stream = self.framed.get_mut();
        stream.write_all(bytes).await.expect("write");
        stream.flush().await.expect("flush");
    }

    /// The next frame; None when the service closed the connection.
    pub async fn next(&mut self) -> Option<Frame> {
        match tokio::time::timeout(DEADLINE, self.framed.next())
            .await
            .expect("a frame or a close within the deadline")
        {
            Some(Ok(frame)) => Some(frame),
            Some(Err(_)) | None => None,
        }
    }

    /// Expects an error frame with `message`, then the close.
    pub async fn expect_closed_with(&mut self, error_cmd: u8, message: &str) {
        let frame = self.next().await.expect("an error frame before the close");
        assert_eq!(frame.cmd, error_cmd);
        let expected = format!(r#"{{"result":1,"message":{}}}"#, serde_json::Value::from(message));
        assert_eq!(String::from_utf8_lossy(&frame.payload), expected);
        assert_eq!(self.next().await, None, "closed after the error frame");
    }
}

/// A TCP connection from a chosen loopback source address (all of 127.0.0.0/8 works):
/// several "clients" on one machine.
pub async fn connect_from(source: std::net::Ipv4Addr, to: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket.bind(SocketAddr::new(source.into(), 0)).expect("bind the source address");
    socket.connect(to).await.expect("connect")
}

/// A device speaking its own bytes.
pub struct RawDevice {
    pub stream: TcpStream,
}

impl RawDevice {
    pub async fn connect(addr: SocketAddr) -> Self {
        RawDevice { stream: TcpStream::connect(addr).await.expect("connect") }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Everything the service writes until it closes.
    pub async fn read_to_close(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        tokio::time::timeout(DEADLINE, self.stream.read_to_end(&mut out))
            .await
            .expect("closed within the deadline")
            .expect("read");
        out
    }
}
