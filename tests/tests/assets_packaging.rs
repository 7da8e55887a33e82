//! Checks of the host packaging: the systemd unit (deploy/systemd, verified by
//! systemd-analyze) and the container build (deploy/Dockerfile).

use std::collections::BTreeSet;
use std::fs;
use std::process::Command;

use anyhow::{Result, bail, ensure};
use connscope_tests::asset_files::{read, repo_root, report, scratch};
use connscope_tests::external_tools::{output, require_tool};

#[test]
fn systemd_unit_verifies() -> Result<()> {
    let unit = read(&repo_root().join("deploy/systemd/connscope.service"))?;
    let mut problems = vec![];
    let value = |key: &str| -> Vec<String> {
        unit.lines().filter_map(|l| l.strip_prefix(&format!("{key}="))).map(String::from).collect()
    };
    let caps: BTreeSet<&str> =
        ["CAP_BPF", "CAP_PERFMON", "CAP_SYS_RESOURCE", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"]
            .into();
    for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
        let got: Vec<String> = value(key);
        let set: BTreeSet<&str> = got.iter().flat_map(|v| v.split_whitespace()).collect();
        if set != caps {
            problems.push(format!("{key} must be exactly {caps:?}, is {set:?}"));
        }
    }
    for (key, want) in
        [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes")]
    {
        if value(key) != [want] {
            problems.push(format!("{key}={want} expected"));
        }
    }
    let exec = value("ExecStart");
    let Some(exec) = exec.first() else { bail!("no ExecStart") };
    for flag in ["--web.listen-address=:9477", "--log.level=info"] {
        if !exec.contains(flag) {
            problems.push(format!("ExecStart lacks {flag}"));
        }
    }
    report("deploy/systemd/connscope.service", &problems)?;

    if !require_tool("systemd-analyze", "systemd-analyze verify")? {
        return Ok(());
    }
    // verify wants the binary to exist: point ExecStart at one that does, change nothing else.
    let binary = exec.split_whitespace().next().unwrap_or("");
    let tmp = scratch("systemd")?;
    let copy = tmp.join("connscope.service");
    fs::write(&copy, unit.replace(binary, "/bin/true"))?;
    let out = output(Command::new("systemd-analyze").arg("verify").arg(&copy))?;
    // It exits 0 on unknown keys and bad values, printing them: any line about our unit fails.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("connscope.service")).collect();
    ensure!(out.status.success() && ours.is_empty(), "systemd-analyze verify:\n{stderr}");

    // Negative control: a misspelt directive is reported.
    fs::write(
        &copy,
        unit.replace(binary, "/bin/true").replace("NoNewPrivileges=", "NoNewPrivilege="),
    )?;
    let out = output(Command::new("systemd-analyze").arg("verify").arg(&copy))?;
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("NoNewPrivilege"),
        "systemd-analyze verify did not report a misspelt key"
    );
    Ok(())
}

#[test]
fn dockerfile_is_a_two_stage_build_of_the_binary() -> Result<()> {
    let root = repo_root();
    let text = read(&root.join("deploy/Dockerfile"))?;
    // Instructions with their continuation lines joined, comments dropped.
    let mut instructions: Vec<String> = vec![];
    let mut cur = String::new();
    for line in text.lines().map(str::trim).filter(|l| !l.starts_with('#') && !l.is_empty()) {
        cur.push_str(line.trim_end_matches('\\'));
        cur.push(' ');
        if !line.ends_with('\\') {
            instructions.push(cur.trim().to_string());
            cur.clear();
        }
    }
    let froms: Vec<&String> = instructions.iter().filter(|i| i.starts_with("FROM ")).collect();
    ensure!(froms.len() == 2, "expected a builder and a runtime stage, found {froms:?}");
    ensure!(
        froms[0].starts_with("FROM debian:bookworm AS builder"),
        "builder must be debian:bookworm AS builder: {}",
        froms[0]
    );
    ensure!(
        froms[1] == "FROM debian:bookworm-slim",
        "runtime must be debian:bookworm-slim: {}",
        froms[1]
    );
    let split = instructions.iter().position(|i| i == froms[1].as_str()).unwrap_or(0);
    let (builder, runtime) = instructions.split_at(split);
    let runs =
        builder.iter().filter(|i| i.starts_with("RUN ")).cloned().collect::<Vec<_>>().join("\n");
    let setup = runs.find("cargo xtask setup");
    let build = runs.find("cargo build --release");
    ensure!(
        matches!((setup, build), (Some(a), Some(b)) if a < b),
        "builder must run `cargo xtask setup` then `cargo build --release`"
    );
    ensure!(
        builder.iter().any(|i| i == "COPY . ."),
        "the build context (repo root) must be copied in"
    );
    ensure!(
        !runtime.iter().any(|i| i.starts_with("RUN ") || i.starts_with("ADD ")),
        "runtime stage must only receive the binary"
    );
    let copies: Vec<&String> = runtime.iter().filter(|i| i.starts_with("COPY ")).collect();
    ensure!(
        copies.len() == 1
            && copies[0].starts_with("COPY --from=builder ")
            && copies[0].ends_with("/usr/local/bin/connscope"),
        "runtime stage must copy just the binary from the builder: {copies:?}"
    );
    ensure!(
        runtime
            .iter()
            .any(|i| i.starts_with("ENTRYPOINT") && i.contains("/usr/local/bin/connscope")),
        "ENTRYPOINT must be the binary"
    );
    ensure!(runtime.iter().any(|i| i == "EXPOSE 9477"), "EXPOSE 9477");
    let ignore = read(&root.join("deploy/Dockerfile.dockerignore"))?;
    ensure!(
        ignore.lines().any(|l| l.trim() == "target/"),
        "Dockerfile.dockerignore must keep target/ out of the context"
    );
    Ok(())
}
