//! The fixtures of the self-contained benchmarks, for `tcpc-load` to run against
//! (`scripts/bench-pipeline`, `scripts/idle-rss.sh`).
//!
//! - `bench-fixtures pipeline --devices N [--protocol tp|custom] [--script FILE] [--edges K]
//!   [--trace-ratio R]` starts its own nats-server, redis-server, mosquitto and fake
//!   ThingsPanel knowing the devices `load-{i}` (id `dev-{i}`, number `N{i}`), one worker
//!   process and K edge processes (the release builds beside this program), with the
//!   edges' per-source limits lifted (the load comes from a few loopback addresses);
//!   with `--trace-ratio`, both services export their traces, sampled at R, to an
//!   OTLP/gRPC collector in this process (the batch processor at its defaults);
//! - `bench-fixtures auth --nats-url URL` answers the edges' auth requests itself,
//!   every token a device (for an edge measured alone).
//!
//! Each prints `KEY=value` lines (`EDGE_TP`, `EDGE_CUSTOM`: comma-separated; `MQTT_URL`),
//! then `ready`, and holds until its stdin closes or a SIGINT/SIGTERM, then stops what it
//! started. While it holds, the line `counts` on stdin is answered with what the fixtures
//! counted so far: `PLATFORM_CALLS=n` (device-config calls the platform answered), with
//! tracing `SPANS=n` (spans the collector received), then `counted`.

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};
use tcpc_tests::auth::AuthDouble;
use tcpc_tests::otlp::Collector;
use tcpc_tests::worker::{EdgeProcess, WorkerProcess};
use tcpc_tests::world::{World, wait_for_partitions};
use tokio::io::AsyncBufReadExt;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Fixtures,
}

#[derive(Subcommand)]
enum Fixtures {
    /// The whole pipeline: brokers, platform, a worker, edges.
    Pipeline {
        /// Devices the platform knows: `load-{i}` for i in 0..N.
        #[arg(long, default_value_t = 1000)]
        devices: u64,
        #[arg(long, value_enum, default_value_t = Protocol::Tp)]
        protocol: Protocol,
        /// The custom devices' uplink script (JavaScript `decode`); none: their bytes
        /// go to the platform as they are.
        #[arg(long)]
        script: Option<std::path::PathBuf>,
        /// Edge processes.
        #[arg(long, default_value_t = 1)]
        edges: u32,
        /// Export both services' traces, sampled at this ratio
        /// (`parentbased_traceidratio`), to a collector here.
        #[arg(long)]
        trace_ratio: Option<f64>,
    },
    /// An auth responder that takes every token.
    Auth {
        #[arg(long)]
        nats_url: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Protocol {
    Tp,
    Custom,
}

/// The edges take the load of many devices from a few addresses.
const NO_SOURCE_LIMITS: [&str; 8] = [
    "--max-connections-per-source",
    "0",
    "--auth-rate-per-source",
    "1000000",
    "--auth-burst-per-source",
    "1000000",
    "--ban-after",
    "1000000",
];

#[tokio::main]
async fn main() {
    match Cli::parse().command {
        Fixtures::Pipeline { devices, protocol, script, edges, trace_ratio } => {
            let w = World::start().await;
            let template = match protocol {
                Protocol::Tp => Value::Null,
                // tcpc-load's custom devices send newline-delimited JSON.
                Protocol::Custom => {
                    let mut settings =
                        json!({"protocol": "custom", "framing": "delimiter", "delimiter": "\\n"});
                    if let Some(script) = script {
                        let source = std::fs::read_to_string(&script).expect("the script file");
                        settings["uplink_script"] = source.into();
                    }
                    settings
                }
            };
            for i in 0..devices {
                w.device(&format!("load-{i}"), &format!("dev-{i}"), &format!("N{i}"), template.clone());
            }
            let collector = match trace_ratio {
                Some(_) => Some(Collector::spawn(tcpc_tests::otlp::Protocol::Grpc).await),
                None => None,
            };
            let env: Vec<(&str, String)> = match (&collector, trace_ratio) {
                (Some(collector), Some(ratio)) => collector
                    .env()
                    .into_iter()
                    // The batch processor as in production: its default delay and queue.
                    .filter(|(name, _)| !name.starts_with("OTEL_BSP_"))
                    .chain([
                        ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio".to_owned()),
                        ("OTEL_TRACES_SAMPLER_ARG", ratio.to_string()),
                    ])
                    .collect(),
                _ => Vec::new(),
            };
            let mut worker = WorkerProcess::spawn_with_env(
                &w.nats,
                &w.redis,
                &w.broker,
                &w.platform,
                "bench-worker",
                &[],
                &env,
            )
            .await;
            wait_for_partitions(&[&worker]).await;
            let mut started = Vec::new();
            for k in 0..edges {
                let pod = format!("bench-edge-{k}");
                started.push(
                    EdgeProcess::spawn_with_env(&w.nats, &w.redis, &pod, &NO_SOURCE_LIMITS, &env).await,
                );
            }
            let list = |port: fn(&EdgeProcess) -> std::net::SocketAddr| {
                started.iter().map(|edge| port(edge).to_string()).collect::<Vec<_>>().join(",")
            };
            println!("EDGE_TP={}", list(|edge| edge.official));
            println!("EDGE_CUSTOM={}", list(|edge| edge.custom));
            println!("MQTT_URL={}", w.broker.url());
            hold(|| {
                println!("PLATFORM_CALLS={}", w.platform.calls().len());
                if let Some(collector) = &collector {
                    println!("SPANS={}", collector.count());
                }
            })
            .await;
            if let Some(collector) = collector {
                // Both services flush their spans as they exit.
                for edge in &mut started {
                    edge.stop().await;
                }
                worker.stop().await;
                eprintln!("bench-fixtures: {} spans at the collector", collector.count());
            }
        }
        Fixtures::Auth { nats_url } => {
            let nats = async_nats::connect(nats_url).await.expect("connect to NATS");
            let auth = AuthDouble::spawn(nats).await;
            auth.accept_any();
            hold(|| {}).await;
        }
    }
}

/// Says `ready`, answers `counts` lines with `counts()` then `counted`, and returns at
/// the end of stdin or a signal; what was started stops when dropped.
async fn hold(counts: impl Fn()) {
    println!("ready");
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("a SIGTERM handler");
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(line)) if line == "counts" => {
                    counts();
                    println!("counted");
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            },
            _ = tokio::signal::ctrl_c() => return,
            _ = terminate.recv() => return,
        }
    }
}
