//! `edge-gateway`: flags and env, logging, bind, run, drain.

use std::process::ExitCode;

use clap::Parser;
use edge_gateway::config::Config;
use edge_gateway::{EdgeError, Listeners};

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    if let Err(error) = config.validate() {
        eprintln!("edge-gateway: {error}");
        return ExitCode::from(64);
    }
    tcpc_observe::init_logging(config.log_format);
    let listeners = match Listeners::bind(&config).await {
        Ok(listeners) => listeners,
        Err(error) => {
            tracing::error!(%error, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    match edge_gateway::run(config, listeners, tcpc_observe::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error @ EdgeError::Config(_)) => {
            eprintln!("edge-gateway: {error}");
            ExitCode::from(64)
        }
        Err(error) => {
            tracing::error!(%error, "edge-gateway failed");
            ExitCode::FAILURE
        }
    }
}
