//! `edge-gateway`: flags and env, logging, bind, run, drain.

use std::process::ExitCode;

use edge_gateway::config::Config;
use edge_gateway::{EdgeError, Listeners};
use tcpc_observe::{exit_status, usage_error};

#[tokio::main]
async fn main() -> ExitCode {
    let (config, warning) = Config::load();
    if let Err(error) = config.validate().and_then(|()| config.check_urls()) {
        return usage_error("edge-gateway", error);
    }
    // Flushes the last spans when `main` returns.
    let _telemetry = match tcpc_observe::telemetry::init("edge-gateway", config.log_format) {
        Ok(telemetry) => telemetry,
        Err(error) => return usage_error("edge-gateway", error),
    };
    if let Some(warning) = warning {
        tracing::warn!("{warning}");
    }
    let result = match Listeners::bind(&config).await {
        Ok(listeners) => edge_gateway::run(config, listeners, tcpc_observe::shutdown_signal()).await,
        Err(error) => Err(error),
    };
    exit_status("edge-gateway", result, |error| matches!(error, EdgeError::Config(_)))
}
