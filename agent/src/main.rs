//! `connscope`: parse flags, set up logging, run the agent; errors end as one clear line.
use std::process::ExitCode;

use clap::Parser as _;
use connscope::{agent, config::Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match cli.into_config() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("connscope: {err:#}");
            return ExitCode::from(2);
        }
    };
    connscope::logging::init(&config.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("connscope")
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("connscope: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(agent::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("connscope: {err:#}");
            ExitCode::FAILURE
        }
    }
}
