//! Building the workspace's binaries and finding them. cargo's JSON build messages name every
//! executable it produced (also the up-to-date ones), whatever the target directory is.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use serde::Deserialize;

use crate::cargo;

/// The part of a cargo `compiler-artifact` message we use.
#[derive(Deserialize)]
struct ArtifactMessage {
    reason: String,
    target: Option<ArtifactTarget>,
    executable: Option<PathBuf>,
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

/// Runs `cargo <args>` (diagnostics rendered on the terminal) and returns its executables.
fn build(args: &[&str]) -> anyhow::Result<Vec<Executable>> {
    let mut cmd: Command = cargo();
    cmd.args(args).arg("--message-format=json-render-diagnostics").stderr(Stdio::inherit());
    let output = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !output.status.success() {
        bail!("{cmd:?} failed: {}", output.status);
    }
    let mut executables = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        // Other message kinds (build scripts, the final status) have other shapes.
        let Ok(message) = serde_json::from_str::<ArtifactMessage>(line) else { continue };
        if let (true, Some(target), Some(path)) =
            (message.reason == "compiler-artifact", message.target, message.executable)
        {
            executables.push(Executable { name: target.name, kind: target.kind, path });
        }
    }
    Ok(executables)
}

fn agent(profile_args: &[&str]) -> anyhow::Result<PathBuf> {
    let args = [&["build", "--package", "connscope"], profile_args].concat();
    build(&args)?
        .into_iter()
        .find(|e| e.name == "connscope" && e.kind.iter().any(|k| k == "bin"))
        .map(|e| e.path)
        .context("cargo built no connscope binary")
}

/// The agent in release mode, built now: what users run and what the tests and the bench drive.
pub fn release_agent() -> anyhow::Result<PathBuf> {
    agent(&["--release"])
}

/// The agent in debug mode (debug assertions on), for the VM tier.
pub fn debug_agent() -> anyhow::Result<PathBuf> {
    agent(&[])
}

/// `(name, path)` of every `kernel_*` integration test binary of `connscope-tests`, built now.
pub fn kernel_test_binaries() -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut binaries: Vec<(String, PathBuf)> =
        build(&["test", "--package", "connscope-tests", "--no-run"])?
            .into_iter()
            .filter(|e| e.name.starts_with("kernel_") && e.kind.iter().any(|k| k == "test"))
            .map(|e| (e.name, e.path))
            .collect();
    binaries.sort();
    binaries.dedup();
    Ok(binaries)
}
