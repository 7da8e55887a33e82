//! Debian packages the project's commands need: which are missing, and installing them.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{is_root, run_checked};

/// The packages of `packages` dpkg does not list as installed.
fn missing<'a>(packages: &[&'a str]) -> anyhow::Result<Vec<&'a str>> {
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\\n"])
        .args(packages)
        .output()
        .context("running dpkg-query (is this a Debian machine?)")?;
    let listing = String::from_utf8_lossy(&output.stdout);
    Ok(packages
        .iter()
        .copied()
        .filter(|package| {
            !listing.lines().any(|line| {
                line.starts_with(&format!("{package} ")) && line.ends_with("install ok installed")
            })
        })
        .collect())
}

/// Installs whatever of `packages` is missing (as root; otherwise says how to).
/// `command` is the xtask command to suggest with sudo. Returns whether it installed any.
pub fn ensure_installed(packages: &[&str], command: &str) -> anyhow::Result<bool> {
    let missing = missing(packages)?;
    if missing.is_empty() {
        return Ok(false);
    }
    if !is_root() {
        bail!(
            "missing Debian packages {missing:?}: run `sudo cargo xtask {command}` (or apt-get install them)"
        );
    }
    eprintln!("{command}: installing {}", missing.join(" "));
    run_checked(Command::new("apt-get").args(["update", "-q"]))?;
    run_checked(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            // Packages such as nginx must not start system services on a build machine.
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("RUNLEVEL", "1"),
    )?;
    Ok(true)
}
