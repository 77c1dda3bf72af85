//! `tcpc-load --help`; see the README's Load testing.

use clap::Parser;
use tcpc_load::Args;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let (json, shard) = (args.json, args.shard);
    let result = if shard {
        tcpc_load::shard::serve(args).await.map(|()| None)
    } else {
        tcpc_load::run(args).await.map(Some)
    };
    match result {
        Ok(Some(report)) if json => {
            println!("{}", serde_json::to_string_pretty(&report).expect("a report serializes"));
        }
        Ok(Some(report)) => print!("{report}"),
        Ok(None) => {}
        Err(error) => {
            // The error and its causes, one line.
            let mut message = error.to_string();
            let mut cause = std::error::Error::source(&error);
            while let Some(source) = cause {
                message.push_str(&format!(": {source}"));
                cause = source.source();
            }
            eprintln!("tcpc-load: {message}");
            return std::process::ExitCode::from(if matches!(error, tcpc_load::Error::Settings(_)) {
                64
            } else {
                1
            });
        }
    }
    std::process::ExitCode::SUCCESS
}
