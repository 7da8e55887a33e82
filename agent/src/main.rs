//! `connscope`: parse flags, set up logging, run the agent (or a subcommand); errors end as
//! one clear line.
use std::{future::Future, process::ExitCode};

use clap::Parser as _;
use connscope::{
    agent,
    config::{Cli, Command},
    flows,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A subcommand is one variant of `config::Command` and one arm here.
    match cli.command {
        None => run_agent(cli),
        Some(Command::Flows(args)) => block_on(flows::run(*args)),
        Some(Command::BenchFloor) => {
            with_config(cli, |config| block_on(on_worker(agent::run_floor(config))))
        }
        Some(Command::Cleanup(args)) => match args.pin_path() {
            Ok(path) => connscope::kernel::pinning::cleanup_command(path.as_deref()),
            Err(err) => bad_flags(&err),
        },
        Some(Command::MountBpffs(args)) => match args.pin_path() {
            Ok(path) => connscope::kernel::bpffs::mount_command(path.as_deref()),
            Err(err) => bad_flags(&err),
        },
    }
}

/// Exit code 2 with one line: the flags are wrong.
fn bad_flags(err: &anyhow::Error) -> ExitCode {
    eprintln!("connscope: {err:#}");
    ExitCode::from(2)
}

fn run_agent(cli: Cli) -> ExitCode {
    map_large_allocations();
    with_config(cli, |config| block_on(on_worker(agent::run(config))))
}

/// Serves every allocation of 1 MiB or more (the connection table, sized once for
/// `--bpf.max-connections`) from fresh pages, which count in the RSS only once used.
/// glibc's threshold otherwise rises to the size of the largest mapped block freed: the
/// buffers of the eBPF object's load, freed in the worker's arena just before the table is
/// allocated there, which then served the table from pages already touched (16 MiB more
/// RSS at start with `--bpf.max-connections 131072`).
fn map_large_allocations() {
    #[cfg(target_env = "gnu")]
    // SAFETY: a malloc tuning call, made before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// Validates the settings (exit code 2 with one line when they are wrong), sets up logging.
fn with_config(cli: Cli, run: impl FnOnce(connscope::config::Config) -> ExitCode) -> ExitCode {
    let config = match cli.into_config() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("connscope: {err:#}");
            return ExitCode::from(2);
        }
    };
    connscope::logging::init(config.log_level, config.log_filter.as_deref());
    run(config)
}

/// `task` as a task of the runtime's workers, not of the thread in `block_on`: the worker
/// that wakes for the ring buffer's readiness then polls it itself, where `block_on` would
/// hand every wakeup on to its own thread (a futex wake and a rescheduling interrupt per
/// drain of the ring buffer).
async fn on_worker(
    task: impl Future<Output = anyhow::Result<()>> + Send + 'static,
) -> anyhow::Result<()> {
    tokio::spawn(task).await.unwrap_or_else(|err| Err(anyhow::anyhow!("the agent stopped: {err}")))
}

/// Runs `task` on a small runtime; its error becomes the one line the user reads.
fn block_on(task: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
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
    match runtime.block_on(task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("connscope: {err:#}");
            ExitCode::FAILURE
        }
    }
}
