//! TLS servers (rustls, ring): the device ports, beside or instead of the plaintext
//! ones, and the gRPC port (mutual TLS with the workers).
//!
//! The certificate and key are PEM files, read again every [`RELOAD_POLL`]: when their
//! bytes change (a Kubernetes Secret update swaps them through a symlink), new
//! handshakes get the new pair; connections already open keep theirs. A new pair that
//! does not parse or does not match is logged and the old one kept. With a client CA,
//! devices must present a certificate it signed (transport admission; the AccessToken
//! still names the device).

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::ReasonLabel;

/// How often the certificate files are read again.
pub const RELOAD_POLL: Duration = Duration::from_secs(2);

/// A TLS configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("read {0}")]
    Read(PathBuf, #[source] io::Error),
    #[error("{0}: no PEM certificate in it")]
    NoCertificate(PathBuf),
    #[error("{0}: PEM")]
    Pem(PathBuf, #[source] rustls_pki_types::pem::Error),
    #[error("certificate and key")]
    Key(#[source] rustls::Error),
    #[error("client CA")]
    ClientCa(#[source] rustls::server::VerifierBuilderError),
}

/// Where a server's certificate, key and optional client CA are.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// A TLS server: an acceptor whose certificate follows the files.
pub struct ServerTls {
    acceptor: tokio_rustls::TlsAcceptor,
    current: Arc<CurrentCert>,
    files: TlsFiles,
}

impl ServerTls {
    /// Loads the files; `alpn` are the application protocols offered (gRPC: `h2`).
    ///
    /// # Errors
    /// A file cannot be read or parsed, the key does not match the certificate.
    pub fn load(files: TlsFiles, alpn: &[&[u8]]) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let pair = read_pair(&files)?;
        let current =
            Arc::new(CurrentCert { key: RwLock::new(Arc::new(certified(&pair, &provider)?)), provider });
        let builder = rustls::ServerConfig::builder_with_provider(current.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Key)?;
        let builder = match &files.client_ca {
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in pem_certificates(path, &read(path)?)? {
                    roots.add(cert).map_err(TlsError::Key)?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(roots.into(), current.provider.clone())
                        .build()
                        .map_err(TlsError::ClientCa)?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(current.clone());
        config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
        Ok(ServerTls { acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)), current, files })
    }

    pub fn acceptor(&self) -> &tokio_rustls::TlsAcceptor {
        &self.acceptor
    }

    /// Reads the files every [`RELOAD_POLL`] until `stop`, and serves a changed pair
    /// from the next handshake on; each change is counted in `reloads` by outcome.
    pub async fn keep_reloading(&self, reloads: Family<ReasonLabel, Counter>, stop: CancellationToken) {
        let mut seen = read_pair(&self.files).ok();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(RELOAD_POLL) => {}
            }
            let Ok(pair) = read_pair(&self.files) else { continue };
            if seen.as_ref() == Some(&pair) {
                continue;
            }
            // Mid-swap one file may be new and the other old: refused now, the complete
            // pair is taken at the next poll.
            let outcome = match certified(&pair, &self.current.provider) {
                Ok(key) => {
                    *self.current.key.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
                    info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                    "reloaded"
                }
                Err(error) => {
                    warn!(%error, cert = %self.files.cert.display(), "new TLS certificate not usable; the last good one is kept");
                    "refused"
                }
            };
            reloads.get_or_create(&ReasonLabel { reason: outcome }).inc();
            seen = Some(pair);
        }
    }
}

/// The pair served to new handshakes.
#[derive(Debug)]
struct CurrentCert {
    key: RwLock<Arc<CertifiedKey>>,
    provider: Arc<CryptoProvider>,
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.key.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// The bytes of the certificate and key files.
#[derive(PartialEq, Eq)]
struct Pair {
    cert: (PathBuf, Vec<u8>),
    key: (PathBuf, Vec<u8>),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read(path.to_owned(), e))
}

fn read_pair(files: &TlsFiles) -> Result<Pair, TlsError> {
    Ok(Pair { cert: (files.cert.clone(), read(&files.cert)?), key: (files.key.clone(), read(&files.key)?) })
}

fn pem_certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(path.to_owned(), e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

fn certified(pair: &Pair, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let (cert_path, cert_pem) = &pair.cert;
    let (key_path, key_pem) = &pair.key;
    let chain = pem_certificates(cert_path, cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Pem(key_path.clone(), e))?;
    CertifiedKey::from_der(chain, key, provider).map_err(TlsError::Key)
}

/// A TCP stream whose first bytes were already read (a PROXY header's buffer held the
/// start of the TLS handshake): they are read again first.
pub struct Replayed {
    pub(crate) first: Bytes,
    pub(crate) tcp: TcpStream,
}

impl AsyncRead for Replayed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.first.has_remaining() {
            let n = self.first.len().min(buf.remaining());
            buf.put_slice(&self.first[..n]);
            self.first.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Replayed {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}
