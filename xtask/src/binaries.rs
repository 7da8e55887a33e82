//! Building the workspace's binaries and finding them. cargo's JSON build messages name every
//! executable it produced (also the up-to-date ones), whatever the target directory is.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use serde::Deserialize;

use crate::cargo;

/// The part of a cargo `compiler-artifact` or `build-script-executed` message we use.
#[derive(Deserialize)]
struct BuildMessage {
    reason: String,
    package_id: Option<String>,
    target: Option<ArtifactTarget>,
    executable: Option<PathBuf>,
    out_dir: Option<PathBuf>,
}

#[derive(Deserialize)]
struct ArtifactTarget {
    name: String,
    kind: Vec<String>,
}

/// One executable cargo built.
struct Executable {
    name: String,
    kind: Vec<String>,
    path: PathBuf,
}

/// What a cargo run produced.
#[derive(Default)]
struct Built {
    executables: Vec<Executable>,
    /// `(package id, OUT_DIR)` of each build script that ran (or was up to date).
    out_dirs: Vec<(String, PathBuf)>,
}

/// Runs `cargo <args>` (diagnostics rendered on the terminal) and returns what it built.
fn build(args: &[&str]) -> anyhow::Result<Built> {
    let mut cmd: Command = cargo();
    cmd.args(args).arg("--message-format=json-render-diagnostics").stderr(Stdio::inherit());
    let output = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !output.status.success() {
        bail!("{cmd:?} failed: {}", output.status);
    }
    let mut built = Built::default();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<BuildMessage>(line) else { continue };
        match (message.reason.as_str(), message.target, message.executable, message.out_dir) {
            ("compiler-artifact", Some(target), Some(path), _) => {
                built.executables.push(Executable { name: target.name, kind: target.kind, path })
            }
            ("build-script-executed", _, _, Some(out_dir)) => {
                built.out_dirs.push((message.package_id.unwrap_or_default(), out_dir))
            }
            _ => {}
        }
    }
    Ok(built)
}

/// The agent in release mode, built now: what users run and what the tests, the VM tier and
/// the bench drive.
pub fn release_agent() -> anyhow::Result<PathBuf> {
    build(&["build", "--release", "--package", "connscope"])?
        .executables
        .into_iter()
        .find(|e| e.name == "connscope" && e.kind.iter().any(|k| k == "bin"))
        .map(|e| e.path)
        .context("cargo built no connscope binary")
}

/// The `cargo test` of `cargo xtask test`: every package but the eBPF one (bpf target only).
pub const WORKSPACE_TESTS: &[&str] = &["test", "--workspace", "--exclude", "connscope-ebpf"];

/// `(name, path)` of every `kernel_*` integration test binary of `connscope-tests`, built now.
/// Built with the same package selection as [`WORKSPACE_TESTS`]: the same feature
/// resolution, so after `cargo xtask test`'s host tier nothing is built again.
pub fn kernel_test_binaries() -> anyhow::Result<Vec<(String, PathBuf)>> {
    let args: Vec<&str> = WORKSPACE_TESTS.iter().copied().chain(["--no-run"]).collect();
    let mut binaries: Vec<(String, PathBuf)> = build(&args)?
        .executables
        .into_iter()
        .filter(|e| e.name.starts_with("kernel_") && e.kind.iter().any(|k| k == "test"))
        .map(|e| (e.name, e.path))
        .collect();
    binaries.sort();
    binaries.dedup();
    Ok(binaries)
}

/// The kernel programs' object the release agent embeds: the eBPF ELF file its build script
/// (through aya-build) left in `OUT_DIR`.
pub fn release_ebpf_object() -> anyhow::Result<PathBuf> {
    const EM_BPF: u16 = 247;
    let built = build(&["build", "--release", "--package", "connscope"])?;
    let is_bpf_elf = |path: &PathBuf| {
        std::fs::read(path).is_ok_and(|data| {
            data.starts_with(b"\x7fELF")
                && data.get(18..20).is_some_and(|m| u16::from_le_bytes([m[0], m[1]]) == EM_BPF)
        })
    };
    built
        .out_dirs
        .iter()
        // `path+file:///.../agent#connscope@0.1.0`: the agent package, not connscope-ebpf.
        .filter(|(id, _)| id.contains("#connscope@"))
        .filter_map(|(_, dir)| std::fs::read_dir(dir).ok())
        .flat_map(|dir| dir.flatten().map(|e| e.path()))
        .find(is_bpf_elf)
        .context("no eBPF object in the connscope build script's OUT_DIR")
}
