//! `tcp-connectivity`: the all-in-one. Flags and env, logging, bind, run, drain.

use std::process::ExitCode;

use clap::Parser;
use tcp_connectivity::{AllInOneError, Config, Listeners};

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    if let Err(error) = config.validate() {
        eprintln!("tcp-connectivity: {error}");
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
    match tcp_connectivity::run(config, listeners, tcpc_observe::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error @ AllInOneError::Config(_)) => {
            eprintln!("tcp-connectivity: {error}");
            ExitCode::from(64)
        }
        Err(error) => {
            tracing::error!(%error, "tcp-connectivity failed");
            ExitCode::FAILURE
        }
    }
}
