//! The npm tools the tests use (the TypeScript compiler and `@grafana/schema`, for the
//! dashboard type check in tests/tests/assets_grafana_schema.rs), at the versions pinned by
//! tests/node/package-lock.json, installed with `npm ci` into target/node-tools.
//!
//! The project's package files are copied there first, so that node_modules stays out of
//! the source tree; the install is skipped while the installed lock file is the committed one.

use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::{is_root, run_checked, workspace_root};

/// Where the committed package.json and package-lock.json live.
const PROJECT: &str = "tests/node";
/// Where they are installed (the tests look there too).
pub const INSTALL_DIR: &str = "target/node-tools";
const PACKAGE_FILES: [&str; 2] = ["package.json", "package-lock.json"];
/// Written after a successful `npm ci`: the lock file that was installed.
const INSTALLED_LOCK: &str = "installed-package-lock.json";

pub fn install() -> anyhow::Result<()> {
    let project = workspace_root().join(PROJECT);
    let dir = workspace_root().join(INSTALL_DIR);
    let lock = read(&project.join("package-lock.json"))?;
    if fs::read_to_string(dir.join(INSTALLED_LOCK)).is_ok_and(|installed| installed == lock)
        && dir.join("node_modules/.bin/tsc").exists()
    {
        return Ok(());
    }
    npm()?;
    eprintln!("setup: installing the pinned npm tools of {PROJECT} into {INSTALL_DIR}");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for file in PACKAGE_FILES {
        fs::copy(project.join(file), dir.join(file))
            .with_context(|| format!("copying {PROJECT}/{file} to {INSTALL_DIR}"))?;
    }
    // No install scripts: the packages are type definitions and a compiler binary.
    run_checked(
        Command::new("npm")
            .args(["ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir),
    )?;
    fs::write(dir.join(INSTALLED_LOCK), lock)
        .with_context(|| format!("writing {INSTALL_DIR}/{INSTALLED_LOCK}"))
}

fn read(path: &Path) -> anyhow::Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Node.js and npm: the machine's own, else Debian's packages.
fn npm() -> anyhow::Result<()> {
    let found = |tool: &str| {
        Command::new(tool).arg("--version").output().is_ok_and(|out| out.status.success())
    };
    if found("node") && found("npm") {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "Node.js and npm are missing: run `sudo cargo xtask setup` (or apt-get install nodejs npm)"
        );
    }
    eprintln!("setup: installing nodejs npm");
    run_checked(Command::new("apt-get").args(["update", "-q"]))?;
    run_checked(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends", "nodejs", "npm"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}
