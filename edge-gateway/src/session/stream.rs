//! A device's socket, plaintext or TLS, read the way an idle session stays small:
//! wait for readiness without a buffer, then read what is there without awaiting.

use std::io;
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::tls::{Replayed, ServerTls};

pub(crate) enum DeviceStream {
    Plain(TcpStream),
    /// Boxed: TLS state is large, and most connections of a pod are one kind.
    Tls(Box<TlsDevice>),
    /// A handshake failed: the socket is gone.
    Broken,
}

pub(crate) struct TlsDevice {
    tls: TlsStream<Replayed>,
    /// rustls may hold decrypted bytes that the socket's readiness no longer shows:
    /// set after a read that returned bytes, cleared by one that would block.
    more: bool,
}

impl DeviceStream {
    /// Completes a TLS handshake on the plaintext socket, replaying `first` (bytes
    /// already read from it) ahead of the socket.
    pub(crate) async fn start_tls(&mut self, tls: &ServerTls, first: Bytes) -> io::Result<()> {
        let DeviceStream::Plain(tcp) = std::mem::replace(self, DeviceStream::Broken) else {
            return Err(io::Error::other("TLS started twice"));
        };
        let tls = tls.acceptor().accept(Replayed { first, tcp }).await?;
        *self = DeviceStream::Tls(Box::new(TlsDevice { tls, more: false }));
        Ok(())
    }

    /// Resolves when a read may find bytes. Cancel-safe.
    ///
    /// Polled, not `TcpStream::readable`: that future holds a waiter of 150 bytes, which
    /// an idle session's task would carry for its whole life; the socket's own reader
    /// slot takes the waker here (one task reads a session's socket).
    pub(crate) fn readable(&self) -> impl Future<Output = io::Result<()>> + '_ {
        std::future::poll_fn(|cx| match self {
            DeviceStream::Plain(tcp) => tcp.poll_read_ready(cx),
            DeviceStream::Tls(device) if device.more => Poll::Ready(Ok(())),
            DeviceStream::Tls(device) => device.tls.get_ref().0.tcp.poll_read_ready(cx),
            DeviceStream::Broken => Poll::Ready(Err(broken())),
        })
    }

    /// Reads what is there into `buf` without waiting; `WouldBlock` when nothing is.
    pub(crate) fn try_read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            DeviceStream::Plain(tcp) => tcp.try_read_buf(buf),
            DeviceStream::Tls(device) => {
                // A poll with no waker: `readable` is what waits, on the socket.
                let mut cx = Context::from_waker(Waker::noop());
                match tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut device.tls), &mut cx, buf) {
                    Poll::Ready(Ok(read)) => {
                        device.more = read > 0;
                        Ok(read)
                    }
                    Poll::Ready(Err(error)) => Err(error),
                    Poll::Pending => {
                        device.more = false;
                        Err(io::ErrorKind::WouldBlock.into())
                    }
                }
            }
            DeviceStream::Broken => Err(broken()),
        }
    }

    pub(crate) async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            DeviceStream::Plain(tcp) => tcp.write_all(bytes).await,
            DeviceStream::Tls(device) => {
                device.tls.write_all(bytes).await?;
                // rustls keeps records until flushed.
                device.tls.flush().await
            }
            DeviceStream::Broken => Err(broken()),
        }
    }

    /// Closes the write side (TLS: with its close_notify).
    pub(crate) async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            DeviceStream::Plain(tcp) => tcp.shutdown().await,
            DeviceStream::Tls(device) => device.tls.shutdown().await,
            DeviceStream::Broken => Ok(()),
        }
    }
}

fn broken() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the TLS handshake failed")
}
