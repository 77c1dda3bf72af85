//! Certificates made by the test (rcgen), written as the PEM files the services read,
//! and TLS clients that trust them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A certificate authority of the test.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
}

/// A certificate and its key, signed by a [`TestCa`].
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("a CA key");
        let mut params = CertificateParams::new(Vec::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert_pem = params.self_signed(&key).expect("a CA certificate").pem();
        TestCa { issuer: Issuer::new(params, key), cert_pem }
    }

    /// A certificate for `names` (DNS names or IP addresses).
    pub fn issue(&self, names: &[&str]) -> Issued {
        let key = KeyPair::generate().expect("a key");
        let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("params");
        params.distinguished_name.push(DnType::CommonName, "tcpc-test");
        let cert = params.signed_by(&key, &self.issuer).expect("a certificate");
        Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() }
    }

    /// A client configuration trusting this CA, presenting `identity` if given.
    pub fn client_config(&self, identity: Option<&Issued>) -> Arc<rustls::ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der_certificate(&self.cert_pem)).expect("the CA as a root");
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots);
        Arc::new(match identity {
            Some(issued) => builder
                .with_client_auth_cert(vec![der_certificate(&issued.cert_pem)], der_key(&issued.key_pem))
                .expect("a client identity"),
            None => builder.with_no_client_auth(),
        })
    }
}

fn der_certificate(pem: &str) -> CertificateDer<'static> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).expect("a PEM certificate")
}

fn der_key(pem: &str) -> PrivateKeyDer<'static> {
    use rustls_pki_types::pem::PemObject;
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).expect("a PEM key")
}

/// PEM files in a directory of their own, replaced the way a Kubernetes Secret volume
/// does it: new files, then one rename.
pub struct PemFiles {
    dir: PathBuf,
}

impl PemFiles {
    pub fn new(label: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tcpc-tls-{label}-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&dir).expect("a directory for the PEM files");
        PemFiles { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Writes `name` atomically (a new file renamed over the old one).
    pub fn write(&self, name: &str, contents: &str) {
        let staged = self.dir.join(format!(".{name}.new"));
        std::fs::write(&staged, contents).expect("write a PEM file");
        std::fs::rename(&staged, self.path(name)).expect("swap it in");
    }

    /// The server's certificate and key (`cert.pem`, `key.pem`).
    pub fn serve(&self, issued: &Issued) {
        self.write("key.pem", &issued.key_pem);
        self.write("cert.pem", &issued.cert_pem);
    }
}

impl Drop for PemFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A TLS connection to `addr` as `localhost`.
pub async fn connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").expect("a server name");
    tokio_rustls::TlsConnector::from(config).connect(name, tcp).await
}
