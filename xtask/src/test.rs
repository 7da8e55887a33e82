//! `cargo xtask test`: set-up, build, and every test in one `cargo test` run.
//!
//! Kernel tests start the real agent binary (built here, passed as `CONNSCOPE_BIN`) and need
//! root; with `CI=true` they fail rather than skip when that is missing. Then the VM tier
//! runs the kernel tests on Debian's 5.10, 6.1 and 6.12 kernels under QEMU: the `quick`
//! matrix (one backend per kernel: what fits CI's hour on 2 cores beside the host tier) unless
//! `--vm-matrix full` asks for every kernel x backend cell; `--no-vm` leaves it out.

use anyhow::Context as _;
use clap::ValueEnum as _;

use crate::{cargo, is_root, run_checked, setup, vm::Matrix};

/// Our own options, taken out of the arguments wherever they are; the rest go to `cargo test`.
struct Options {
    vm: Option<Matrix>,
    cargo_args: Vec<String>,
}

fn options(args: &[String]) -> anyhow::Result<Options> {
    let mut vm = Some(Matrix::Quick);
    let mut no_vm = false;
    let mut cargo_args = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let matrix = match arg.as_str() {
            "--no-vm" => {
                no_vm = true;
                continue;
            }
            "--vm-matrix" => args.next().context("--vm-matrix needs `full` or `quick`")?,
            other => match other.strip_prefix("--vm-matrix=") {
                Some(value) => value,
                None => {
                    cargo_args.push(arg.clone());
                    continue;
                }
            },
        };
        vm = Some(
            Matrix::from_str(matrix, false)
                .map_err(|_| anyhow::anyhow!("--vm-matrix {matrix:?}: expected full or quick"))?,
        );
    }
    Ok(Options { vm: vm.filter(|_| !no_vm), cargo_args })
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let Options { vm, cargo_args } = options(args)?;
    setup::run()?;
    if !is_root() {
        let hint = "kernel tests need root: run `sudo -E cargo xtask test`";
        if std::env::var("CI").as_deref() == Ok("true") {
            anyhow::bail!("{hint}");
        }
        eprintln!("warning: {hint}; they will be skipped");
    }
    // The release agent: the end-to-end tests drive thousands of connections per second.
    let binary = crate::binaries::release_agent()?;
    run_checked(
        cargo()
            .args(crate::binaries::WORKSPACE_TESTS)
            .args(&cargo_args)
            .env("CONNSCOPE_BIN", binary),
    )?;
    // The whole suite also fuzzes the parsers of untrusted bytes for a bounded time.
    if cargo_args.is_empty() {
        crate::fuzz::run(crate::fuzz::seconds_from_env())?;
    }
    // Then the same kernel tests per hook backend on Debian's stock kernels under QEMU.
    match vm {
        Some(matrix) => crate::vm::run(matrix, &[]),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> anyhow::Result<Options> {
        options(&args.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>())
    }

    #[test]
    fn vm_tier_is_quick_unless_asked() -> anyhow::Result<()> {
        let default = parse(&["some_filter"])?;
        assert_eq!(default.vm, Some(Matrix::Quick));
        assert_eq!(default.cargo_args, ["some_filter"]);
        assert_eq!(parse(&["--vm-matrix", "full"])?.vm, Some(Matrix::Full));
        assert_eq!(
            parse(&["x", "--vm-matrix=full", "--", "--nocapture"])?.cargo_args,
            ["x", "--", "--nocapture"]
        );
        assert_eq!(parse(&["--vm-matrix=full", "--no-vm"])?.vm, None);
        assert!(parse(&["--vm-matrix", "all"]).is_err());
        assert!(parse(&["--vm-matrix"]).is_err());
        Ok(())
    }
}
