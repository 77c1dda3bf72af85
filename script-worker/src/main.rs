//! `script-worker`: flags and env, logging, bind, run; and `script-worker try`.

use std::process::ExitCode;

use clap::Parser;
use script_worker::WorkerError;
use script_worker::config::{Cli, Command, TryArgs};
use script_worker::scripts::{self, Call, CallContext, Output};
use tcpc_observe::{exit_status, usage_error};
use tokio::net::TcpListener;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Try(args)) = cli.command {
        return try_script(&args);
    }
    let config = cli.config;
    if let Err(error) = config.validate() {
        return usage_error("script-worker", error);
    }
    // Flushes the last spans when `main` returns.
    let _telemetry = match tcpc_observe::telemetry::init("script-worker", config.log_format) {
        Ok(telemetry) => telemetry,
        Err(error) => return usage_error("script-worker", error),
    };
    let result = match bind(&config).await {
        Ok(listeners) => script_worker::run(config, listeners, tcpc_observe::shutdown_signal()).await,
        Err(error) => Err(WorkerError::Bind(error)),
    };
    exit_status("script-worker", result, |error| matches!(error, WorkerError::Config(_)))
}

async fn bind(config: &script_worker::config::Config) -> std::io::Result<script_worker::Listeners> {
    Ok(script_worker::Listeners {
        http: TcpListener::bind(config.settings.http_listen).await?,
        metrics: TcpListener::bind(config.metrics_listen).await?,
    })
}

/// `try`: one call of a script on sample input; the result on stdout, or the error
/// (with its line) on stderr and exit status 1.
fn try_script(args: &TryArgs) -> ExitCode {
    let source = match std::fs::read_to_string(&args.script) {
        Ok(source) => source,
        Err(error) => {
            eprintln!("{}: {error}", args.script.display());
            return ExitCode::from(66);
        }
    };
    let context = CallContext {
        device_id: "try-device".to_owned(),
        device_number: "TRY".to_owned(),
        kind: if args.json.is_some() { "command" } else { "uplink" }.to_owned(),
        topic: String::new(),
    };
    let call = match (&args.hex, &args.json) {
        (Some(hex), _) => match script_worker::devices::parse_hex(hex) {
            Ok(bytes) => Call::Decode { bytes, context },
            Err(error) => {
                eprintln!("--hex: {error}");
                return ExitCode::from(64);
            }
        },
        (None, Some(json)) => match serde_json::from_str(json) {
            Ok(message) => Call::Encode { message, context },
            Err(error) => {
                eprintln!("--json: {error}");
                return ExitCode::from(64);
            }
        },
        (None, None) => {
            eprintln!("give --hex (runs decode) or --json (runs encode)");
            return ExitCode::from(64);
        }
    };
    let name = args.script.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut engine = args.engine.build(scripts::Limits::default());
    match scripts::run_call(engine.as_mut(), &source, &name, &call) {
        Ok(Output::Json(json)) => {
            println!("{}", serde_json::to_string_pretty(&json).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Ok(Output::Bytes(bytes)) => {
            let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
            println!("{}", hex.join(" "));
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{name}: {error}");
            ExitCode::FAILURE
        }
    }
}
