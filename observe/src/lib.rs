//! What every tcp-connectivity binary shares about how it is run and observed: log
//! set-up, the `/metrics`, `/healthz`, `/readyz` endpoints, the switch of the features
//! that need Kubernetes, and the security flags of the gRPC hop between them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;

/// A process's one metrics registry: each part registers its metrics in it at start.
pub type MetricsRegistry = Registry;

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line (for log collectors).
    Json,
    /// Human-readable lines (for terminals).
    Pretty,
}

/// A feature that needs the Kubernetes API: on when running in a cluster (`auto`), or
/// always, or never.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KubeSwitch {
    Auto,
    On,
    Off,
}

impl KubeSwitch {
    /// Whether the feature runs: `auto` means in a pod, where the kubelet sets
    /// `KUBERNETES_SERVICE_HOST` (the in-cluster inference's own test).
    pub fn enabled(self) -> bool {
        match self {
            KubeSwitch::Auto => std::env::var_os("KUBERNETES_SERVICE_HOST").is_some(),
            KubeSwitch::On => true,
            KubeSwitch::Off => false,
        }
    }
}

/// The gRPC hop between workers and edges: mutual TLS when the three files are given,
/// and a shared token on every call when one is. Both sides take the same flags.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct GrpcSecurity {
    /// This process's certificate (PEM): the edge's as a server, a worker's as a client.
    #[arg(long, env = "GRPC_TLS_CERT_FILE")]
    pub grpc_tls_cert_file: Option<std::path::PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "GRPC_TLS_KEY_FILE")]
    pub grpc_tls_key_file: Option<std::path::PathBuf>,
    /// The CA (PEM) that the other side's certificate must chain to.
    #[arg(long, env = "GRPC_TLS_CA_FILE")]
    pub grpc_tls_ca_file: Option<std::path::PathBuf>,
    /// A token every gRPC call carries (`authorization: Bearer …`), with or without TLS.
    #[arg(long, env = "GRPC_TOKEN", hide_env_values = true,
          value_parser = |s: &str| Ok::<_, std::convert::Infallible>(secrecy::SecretString::from(s)))]
    pub grpc_token: Option<secrecy::SecretString>,
}

/// The gRPC hop's TLS files.
#[derive(Clone, Debug)]
pub struct GrpcTlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub ca: std::path::PathBuf,
}

impl GrpcSecurity {
    /// The TLS files, when mutual TLS is on.
    ///
    /// # Errors
    /// Some of the three files are given, not all.
    pub fn tls(&self) -> Result<Option<GrpcTlsFiles>, String> {
        match (&self.grpc_tls_cert_file, &self.grpc_tls_key_file, &self.grpc_tls_ca_file) {
            (Some(cert), Some(key), Some(ca)) => {
                Ok(Some(GrpcTlsFiles { cert: cert.clone(), key: key.clone(), ca: ca.clone() }))
            }
            (None, None, None) => Ok(None),
            _ => Err("gRPC mutual TLS needs all of --grpc-tls-cert-file, --grpc-tls-key-file and --grpc-tls-ca-file".into()),
        }
    }
}

/// Shows an error with its causes, `outer: inner: root` (errors here name their step
/// and keep the cause as their `source`, which `Display` alone would drop).
pub struct Chain<'a>(pub &'a (dyn std::error::Error + Send + Sync + 'a));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut shown = self.0.to_string();
        let mut cause = self.0.source();
        while let Some(error) = cause {
            // Some errors already show their cause in their own message.
            let text = error.to_string();
            if !shown.ends_with(&text) {
                shown = format!("{shown}: {text}");
            }
            cause = error.source();
        }
        f.write_str(&shown)
    }
}

/// Installs the global subscriber: level from `RUST_LOG` (default info), to stderr so
/// that stdout stays free for data (the all-in-one's JSON lines).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
}

/// Exit status of invalid configuration (EX_USAGE), after its message on stderr.
pub fn usage_error(binary: &str, error: impl std::fmt::Display) -> std::process::ExitCode {
    eprintln!("{binary}: {error}");
    std::process::ExitCode::from(64)
}

/// The exit status of a binary's run: success; invalid configuration (`is_config`) as
/// [`usage_error`]; anything else logged, status 1.
pub fn exit_status<E: std::fmt::Display>(
    binary: &str,
    result: Result<(), E>,
    is_config: impl Fn(&E) -> bool,
) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) if is_config(&error) => usage_error(binary, error),
        Err(error) => {
            tracing::error!(%error, "{binary} failed");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Resolves on the first SIGTERM or Ctrl-C (drain); a second one exits at once.
pub async fn shutdown_signal() {
    wait_for_signal().await;
    tracing::info!("shutdown requested; a second signal exits at once");
    tokio::spawn(async {
        wait_for_signal().await;
        tracing::warn!("second signal: exiting without draining");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler cannot fail on Unix");
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// The text exposition of a registry.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// What the health endpoints look at.
#[derive(Clone)]
pub struct Health {
    /// The process's one metrics registry, which every part registered into.
    pub registry: Arc<Registry>,
    /// Ready to take work (its dependencies answer).
    pub ready: Arc<dyn Fn() -> bool + Send + Sync>,
    /// Set first on shutdown, so that readiness fails before anything stops.
    pub draining: Arc<AtomicBool>,
}

/// `/metrics`, `/healthz` (liveness), `/readyz` (readiness).
pub fn router(health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(health)
}

/// Serves [`router`] on a pre-bound listener until `shutdown` resolves.
///
/// # Errors
/// The listener fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(health)).with_graceful_shutdown(shutdown).await
}

async fn metrics(State(health): State<Health>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        render(&health.registry),
    )
}

async fn readyz(State(health): State<Health>) -> impl IntoResponse {
    if health.draining.load(Ordering::Acquire) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if !(health.ready)() {
        (StatusCode::SERVICE_UNAVAILABLE, "dependencies unavailable")
    } else {
        (StatusCode::OK, "ready")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    fn health(ready: bool) -> Health {
        let mut registry = Registry::default();
        let connections = prometheus_client::metrics::gauge::Gauge::<i64>::default();
        connections.set(3);
        registry.register("edge_connections", "Open device connections", connections);
        Health {
            registry: Arc::new(registry),
            ready: Arc::new(move || ready),
            draining: Arc::new(AtomicBool::new(false)),
        }
    }

    async fn get(router: Router, path: &str) -> (StatusCode, String) {
        let response = router.oneshot(Request::get(path).body(Body::empty()).unwrap()).await.unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[test]
    fn a_chain_shows_every_cause() {
        #[derive(Debug, thiserror::Error)]
        #[error("route lookup")]
        struct Outer(#[source] std::io::Error);
        let error = Outer(std::io::Error::other("connection refused"));
        assert_eq!(Chain(&error).to_string(), "route lookup: connection refused");
        #[derive(Debug, thiserror::Error)]
        #[error("read the resume point: {0}")]
        struct Inline(#[source] std::io::Error);
        let error = Inline(std::io::Error::other("timed out"));
        assert_eq!(Chain(&error).to_string(), "read the resume point: timed out", "not twice");
    }

    #[tokio::test]
    async fn metrics_liveness_readiness() {
        assert!(get(router(health(true)), "/metrics").await.1.contains("\nedge_connections 3\n"));
        assert_eq!(get(router(health(true)), "/healthz").await, (StatusCode::OK, "ok".into()));
        assert_eq!(get(router(health(true)), "/readyz").await, (StatusCode::OK, "ready".into()));
        assert_eq!(get(router(health(false)), "/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
        let draining = health(true);
        draining.draining.store(true, Ordering::Release);
        assert_eq!(
            get(router(draining), "/readyz").await,
            (StatusCode::SERVICE_UNAVAILABLE, "draining".into())
        );
    }
}
