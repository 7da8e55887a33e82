//! Project tooling: `cargo xtask <command>`. Everything a fresh Debian 12 machine needs is
//! installed by `setup`, which every other command runs first (fast when already done).

use std::time::Duration;

use anyhow::bail;
use clap::{Parser, Subcommand};
use xtask::{bench, demo, fuzz, run, setup, test, vm};

#[derive(Parser)]
#[command(name = "xtask", about = "connscope project tooling")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install and verify the eBPF toolchain and the test tools (idempotent).
    Setup,
    /// Set up, build the agent in release mode and start it (arguments go to connscope).
    Run {
        /// Also start the demo's local servers and clients, and print what connscope sees
        /// every 20 s until Ctrl-C (at most an hour).
        #[arg(long)]
        demo: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Start the agent and local servers and clients with contrasting keep-alive behaviour,
    /// so every metric moves within a minute.
    Demo {
        /// How long the demo traffic runs, in seconds.
        #[arg(long, default_value_t = 60)]
        duration: u64,
        /// Do not start an agent (one is already running on :9477).
        #[arg(long)]
        no_agent: bool,
    },
    /// Set up, build, and run every test (unit, kernel, end-to-end, assets, fuzzing), then the
    /// VM tier's quick matrix (`--vm-matrix full`: every cell; `--no-vm`: none).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter), besides `--no-vm` and
        /// `--vm-matrix full|quick`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Boot Debian's 5.10, 6.1 and 6.12 kernels under QEMU and run the kernel tests once per
    /// hook backend of the matrix.
    VmTest {
        /// `full`: every kernel x backend cell; `quick` (what `cargo xtask test` runs): one
        /// backend per kernel.
        #[arg(long, value_enum, default_value = "full")]
        matrix: vm::Matrix,
        /// Only these kernels (e.g. `--kernel 5.10`; repeatable).
        #[arg(long)]
        kernel: Vec<String>,
    },
    /// Measure the agent's cost against issue 14's targets: throughput without an observer,
    /// with the floor and with connscope, lost events, CPU, ns per BPF program, the tax on a
    /// no-network workload, memory per tracked socket, /metrics latency
    /// (target/bench/report.json).
    Bench,
    /// Run every cargo-fuzz target (nightly) for a bounded time.
    Fuzz {
        /// Seconds per target (default: $CONNSCOPE_FUZZ_SECONDS or 30).
        #[arg(long)]
        seconds: Option<u64>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::run(),
        Task::Run { demo: false, args } => run::run(&args),
        Task::Run { demo: true, args } => {
            if !args.is_empty() {
                bail!("`cargo xtask run --demo` takes no agent arguments (got {args:?})");
            }
            demo::run(&demo::DemoRun {
                duration: Duration::from_secs(3600),
                start_agent: true,
                summary_every: Some(Duration::from_secs(20)),
            })
        }
        Task::Test { args } => test::run(&args),
        Task::Demo { duration, no_agent } => demo::run(&demo::DemoRun {
            duration: Duration::from_secs(duration),
            start_agent: !no_agent,
            summary_every: None,
        }),
        Task::VmTest { matrix, kernel } => vm::run(matrix, &kernel),
        Task::Bench => bench::run(),
        Task::Fuzz { seconds } => fuzz::run(seconds.unwrap_or_else(fuzz::seconds_from_env)),
    }
}
