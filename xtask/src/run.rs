//! `cargo xtask run`: set-up, the release agent, then the agent itself in this process's place
//! (through sudo when not root), with the arguments given.

use std::{os::unix::process::CommandExt as _, process::Command};

use anyhow::bail;

use crate::{binaries, is_root, setup};

pub fn run(args: &[String]) -> anyhow::Result<()> {
    setup::run()?;
    let binary = binaries::release_agent()?;
    let listen = args
        .iter()
        .position(|a| a == "--web.listen-address")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
        .or_else(|| args.iter().find_map(|a| a.strip_prefix("--web.listen-address=")))
        .unwrap_or(":9477");
    let port = listen.rsplit(':').next().unwrap_or("9477");
    eprintln!("starting connscope; metrics at http://localhost:{port}/metrics (Ctrl-C stops it)");
    let mut cmd = if is_root() {
        Command::new(&binary)
    } else {
        eprintln!("not root: starting it with sudo (it needs CAP_BPF and CAP_PERFMON)");
        let mut sudo = Command::new("sudo");
        sudo.arg(&binary);
        sudo
    };
    let err = cmd.args(args).exec();
    bail!("starting {}: {err}", binary.display())
}
