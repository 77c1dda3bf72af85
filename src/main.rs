//! `tcp-connectivity`: the all-in-one. Flags and env, logging, bind, run, drain.

use std::process::ExitCode;

use clap::Parser;
use tcp_connectivity::{AllInOneError, Config, Listeners};
use tcpc_observe::{exit_status, usage_error};

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    if let Err(error) = config.validate() {
        return usage_error("tcp-connectivity", error);
    }
    // Flushes the last spans when `main` returns.
    let _telemetry = match tcpc_observe::telemetry::init("tcp-connectivity", config.log_format) {
        Ok(telemetry) => telemetry,
        Err(error) => return usage_error("tcp-connectivity", error),
    };
    let result = match Listeners::bind(&config).await {
        Ok(listeners) => tcp_connectivity::run(config, listeners, tcpc_observe::shutdown_signal()).await,
        Err(error) => Err(error),
    };
    exit_status("tcp-connectivity", result, |error| matches!(error, AllInOneError::Config(_)))
}
