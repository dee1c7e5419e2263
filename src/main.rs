//! The `dbkeeper` binary: parses the command line, loads the configuration and hands
//! over to the library.

use std::process::ExitCode;

use clap::Parser;
use dbkeeper::cli::{self, Cli, Command, Exit};
use dbkeeper::Config;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_format = cli.log_format;
    cli::init_logging(log_format);
    let config = match cli.command.config_path().map(|path| Config::load(&path)) {
        None => None,
        Some(Ok(config)) => Some(config),
        Some(Err(e)) => {
            cli::print_error(&e.to_string());
            return Exit::Usage.into();
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            cli::print_error(&format!("cannot start the async runtime: {e}"));
            return Exit::Failed.into();
        }
    };
    runtime.block_on(async {
        match cli.command {
            Command::Run(_) => {
                let Some(config) = config else {
                    return Exit::Usage.into();
                };
                let shutdown = CancellationToken::new();
                let trigger = shutdown.clone();
                tokio::spawn(async move {
                    dbkeeper::shutdown_signal().await;
                    trigger.cancel();
                });
                match dbkeeper::run(config, shutdown).await {
                    Ok(()) => Exit::Success.into(),
                    Err(e) => {
                        // As JSON, print_error is this log line itself.
                        if log_format != cli::LogFormat::Json {
                            tracing::error!("{e}");
                        }
                        cli::print_error(&e.to_string());
                        Exit::Failed.into()
                    }
                }
            }
            Command::Tool(tool) => cli::execute(tool, config).await.into(),
        }
    })
}
