//! The agent's failure modes end in one clear line and a non-zero exit, never a panic:
//! bad flags, a port in use, missing privileges.

use std::{
    net::TcpListener,
    process::{Command, Output},
};

use connscope_tests::{agent_binary, kernel_test};

fn connscope(args: &[&str]) -> anyhow::Result<Output> {
    Ok(Command::new(agent_binary()).args(args).env("CONNSCOPE_LOG_LEVEL", "error").output()?)
}

/// The user-facing line: stderr's last line, which must name the problem.
fn last_line(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).lines().last().unwrap_or_default().to_owned()
}

fn assert_clean_failure(output: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "should fail: {stderr}");
    assert!(last_line(output).contains(expected), "expected `{expected}` in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_flags_are_rejected_with_usage() -> anyhow::Result<()> {
    let output = connscope(&["--probe.backend", "ebpf"])?;
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("invalid value 'ebpf'"));
    let output = connscope(&["--bpf.ringbuf-bytes", "1000"])?;
    assert_clean_failure(&output, "power of two");
    let output = connscope(&["--web.listen-address", "nowhere"])?;
    assert_clean_failure(&output, "invalid --web.listen-address");
    let output = connscope(&["--config.file", "/nonexistent/connscope.yaml"])?;
    assert_clean_failure(&output, "cannot read --config.file");
    // An unknown level is an error, not a filter that silences every line.
    let output = connscope(&["--log.level", "loud"])?;
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("invalid value 'loud'"));
    let output = connscope(&["--log.filter", "info,connscope=[[["])?;
    assert_clean_failure(&output, "invalid --log.filter");
    Ok(())
}

#[test]
fn flag_beats_environment_beats_file() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("connscope-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("config.yaml");
    std::fs::write(&file, "web.listen-address: from-file\n")?;
    let file = file.to_string_lossy().into_owned();
    let run = |env: Option<&str>, flag: Option<&str>| -> anyhow::Result<Output> {
        let mut command = Command::new(agent_binary());
        command.args(["--config.file", &file]).env("CONNSCOPE_LOG_LEVEL", "error");
        if let Some(flag) = flag {
            command.args(["--web.listen-address", flag]);
        }
        match env {
            Some(env) => command.env("CONNSCOPE_WEB_LISTEN_ADDRESS", env),
            None => command.env_remove("CONNSCOPE_WEB_LISTEN_ADDRESS"),
        };
        Ok(command.output()?)
    };
    assert_clean_failure(&run(None, None)?, "\"from-file\"");
    assert_clean_failure(&run(Some("from-env"), None)?, "\"from-env\"");
    assert_clean_failure(&run(Some("from-env"), Some("from-flag"))?, "\"from-flag\"");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn help_documents_every_flag() -> anyhow::Result<()> {
    let output = connscope(&["--help"])?;
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--web.listen-address",
        "--log.level",
        "--config.file",
        "--probe.backend",
        "--bpf.max-connections",
        "--metrics.max-servers",
        "--path.kubelet-logs",
        "--web.config.file",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
    assert!(help.contains("CONNSCOPE_WEB_LISTEN_ADDRESS"), "env fallbacks are shown");
    Ok(())
}

kernel_test!(
    fn port_in_use_is_one_clear_line() -> anyhow::Result<()> {
        let busy = TcpListener::bind("127.0.0.1:0")?;
        let address = busy.local_addr()?.to_string();
        let output = connscope(&["--web.listen-address", &address])?;
        assert_clean_failure(&output, "already in use");
        Ok(())
    }
);

kernel_test!(
    fn unprivileged_start_says_what_is_missing() -> anyhow::Result<()> {
        // Drop to nobody with no capabilities (util-linux setpriv).
        let binary = agent_binary();
        let output = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
            ])
            .arg(&binary)
            .args(["--web.listen-address", "127.0.0.1:0"])
            .output()?;
        assert_clean_failure(&output, "missing privileges");
        assert!(last_line(&output).contains("CAP_BPF"));
        Ok(())
    }
);
