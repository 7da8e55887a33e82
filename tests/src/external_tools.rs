//! Running the external tools the asset tests drive (promtool, kubectl, python3,
//! systemd-analyze, tsc). `cargo xtask setup` installs them: with CI set a missing tool
//! fails the test; elsewhere the test prints why and returns early.

use std::process::{Command, Output};

use anyhow::{Context as _, bail, ensure};

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
}

/// True when `tool` can be run. Missing: an error in CI, a printed skip elsewhere.
pub fn require_tool(tool: &str, check: &str) -> anyhow::Result<bool> {
    if on_path(tool) {
        return Ok(true);
    }
    skip_or_fail(check, &format!("{tool} is not on PATH"))
}

/// Missing tool: `Ok(false)` with a printed skip, or an error in CI.
pub fn skip_or_fail(check: &str, why: &str) -> anyhow::Result<bool> {
    if in_ci() {
        bail!("{why}, but CI must run {check} (cargo xtask setup installs it)");
    }
    eprintln!("SKIP {check}: {why} (cargo xtask setup installs it)");
    Ok(false)
}

/// True when python3 can import every module in `modules` (see [`require_tool`]).
pub fn require_python_modules(modules: &[&str], check: &str) -> anyhow::Result<bool> {
    if !require_tool("python3", check)? {
        return Ok(false);
    }
    let out =
        Command::new("python3").arg("-c").arg(format!("import {}", modules.join(", "))).output()?;
    if out.status.success() {
        return Ok(true);
    }
    let why = format!(
        "python3 cannot import {}: {}",
        modules.join(", "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    skip_or_fail(check, &why)
}

fn describe(cmd: &Command) -> String {
    let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
    format!("{} {}", cmd.get_program().to_string_lossy(), args.join(" "))
}

/// Runs a command whose exit status the caller judges.
pub fn output(cmd: &mut Command) -> anyhow::Result<Output> {
    cmd.output().with_context(|| format!("running {}", describe(cmd)))
}

/// Runs a command that must succeed; returns its stdout.
pub fn run_ok(cmd: &mut Command) -> anyhow::Result<String> {
    let out = output(cmd)?;
    ensure!(
        out.status.success(),
        "{} failed ({}):\n{}\n{}",
        describe(cmd),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// stdout and stderr of a finished command, as one text.
pub fn combined_output(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}
