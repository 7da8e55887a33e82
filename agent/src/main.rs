//! `connscope`: parse flags, set up logging, run the agent; errors end as one clear line.
use std::process::ExitCode;

use clap::Parser as _;
use connscope::{agent, config::Cli};

fn main() -> ExitCode {
    // The benchmark's floor arm (`cargo xtask bench`); hidden from --help.
    let floor = std::env::args().nth(1).as_deref() == Some("bench-floor");
    // `connscope cleanup [--bpf.pin-path DIR]`: remove what the agent pinned (uninstall).
    let cleanup = std::env::args().nth(1).as_deref() == Some("cleanup");
    let cli = if floor || cleanup {
        Cli::parse_from(std::env::args().take(1).chain(std::env::args().skip(2)))
    } else {
        Cli::parse()
    };
    let config = match cli.into_config() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("connscope: {err:#}");
            return ExitCode::from(2);
        }
    };
    if cleanup {
        return connscope::pinning::cleanup_command(config.pin_path.as_deref());
    }
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
    let work =
        async { if floor { agent::run_floor(config).await } else { agent::run(config).await } };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("connscope: {err:#}");
            ExitCode::FAILURE
        }
    }
}
