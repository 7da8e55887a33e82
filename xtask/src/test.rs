//! `cargo xtask test`: set-up, build, and every test in one `cargo test` run.
//!
//! Kernel tests start the real agent binary (built here, passed as `CONNSCOPE_BIN`) and need
//! root; with `CI=true` they fail rather than skip when that is missing. Then the VM tier
//! (`cargo xtask vm-test`, the whole kernel matrix) runs the kernel tests per backend on
//! Debian's 5.10, 6.1 and 6.12 kernels;
//! `--no-vm` leaves it out.

use crate::{cargo, is_root, run_checked, setup};

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let vm = !args.iter().any(|a| a == "--no-vm");
    let args: Vec<&String> = args.iter().filter(|a| *a != "--no-vm").collect();
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
            .args(["test", "--workspace", "--exclude", "connscope-ebpf"])
            .args(&args)
            .env("CONNSCOPE_BIN", binary),
    )?;
    // The whole suite also fuzzes the parsers of untrusted bytes for a bounded time.
    if args.is_empty() {
        crate::fuzz::run(crate::fuzz::seconds_from_env())?;
    }
    // Then the same kernel tests per hook backend on Debian's stock kernel under QEMU.
    if vm { crate::vm::run(crate::vm::Matrix::Full, &[]) } else { Ok(()) }
}
