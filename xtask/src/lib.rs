//! The project's tooling behind `cargo xtask <command>`: one module per command, and the
//! helpers they share (the workspace root, `cargo`, checked commands, root or not). The
//! binary (`main.rs`) only parses the command line and calls the command's module.

pub mod bench;
mod binaries;
mod debian_packages;
pub mod demo;
pub mod fuzz;
mod node_tools;
pub mod run;
pub mod setup;
pub mod test;
pub mod vm;

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `cargo` as invoked by the user (so the same toolchain is used).
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// Runs a command and fails with its description when it does not succeed.
pub fn run_checked(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
