//! `cargo xtask fuzz`: runs every cargo-fuzz target in `fuzz/` for a bounded time.
//!
//! The targets feed arbitrary bytes to the parsers of untrusted input: the ring buffer
//! record decoder (`connscope::pipeline::events::decode`), the HTTP/1.x head parsers
//! (`connscope::pipeline::http::{parse_request, parse_response}`), the TLS record rule the
//! kernel runs on undecrypted TLS (`connscope_common::tls_record::carries_request`), the ALPN
//! walk of its hellos (`connscope::pipeline::tls_hello::h2_verdict`) and the HTTP/2 frame
//! walk the kernel runs on HTTP/2 connections (`connscope_common::h2_frames::walk`).
//! cargo-fuzz needs a nightly toolchain (for `-Zsanitizer`), but no `rust-src`. It is installed with
//! `cargo install cargo-fuzz --locked` when missing. A crash fails the command and leaves
//! the input in `fuzz/artifacts/<target>/`.

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{run_checked, workspace_root};

pub const TARGETS: [&str; 5] = ["decode", "http_head", "tls_records", "tls_hello", "h2_frames"];
const NIGHTLY: &str = "nightly";
/// Seconds per target when neither the flag nor `CONNSCOPE_FUZZ_SECONDS` says otherwise.
pub const DEFAULT_SECONDS: u64 = 30;

/// Seconds per target: `CONNSCOPE_FUZZ_SECONDS` or the default.
pub fn seconds_from_env() -> u64 {
    std::env::var("CONNSCOPE_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SECONDS)
}

/// Runs each target for `seconds`. Without a nightly toolchain the fuzzing cannot be built:
/// outside CI that is reported and skipped (it cannot be installed offline); in CI it fails.
pub fn run(seconds: u64) -> anyhow::Result<()> {
    if seconds == 0 {
        eprintln!("fuzz: skipped (0 seconds per target)");
        return Ok(());
    }
    if !nightly_present() {
        let why = format!(
            "no `{NIGHTLY}` rustup toolchain (cargo-fuzz needs one: `rustup toolchain install nightly`)"
        );
        // CI machines have one; a fuzzing step that silently does nothing there is a defect.
        if std::env::var("CI").as_deref() == Ok("true") {
            bail!("fuzz: {why}");
        }
        eprintln!("fuzz: skipped: {why}");
        return Ok(());
    }
    ensure_cargo_fuzz()?;
    let fuzz_dir = workspace_root().join("fuzz");
    for target in TARGETS {
        write_seeds(&fuzz_dir, target)?;
    }
    // Build once (the first build compiles the agent with sanitizers: a few minutes).
    let started = Instant::now();
    run_checked(cargo_fuzz(&fuzz_dir).arg("build"))
        .context("building the fuzz targets with nightly")?;
    eprintln!("fuzz: targets built in {:.0} s", started.elapsed().as_secs_f64());
    for target in TARGETS {
        let corpus = fuzz_dir.join("corpus").join(target);
        let seeds = fuzz_dir.join("seeds").join(target);
        fs::create_dir_all(&corpus)?;
        eprintln!("fuzz: {target} for {seconds} s");
        let started = Instant::now();
        let status = cargo_fuzz(&fuzz_dir)
            .args(["run", target])
            .arg(&corpus)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            // One input taking this long counts as a hang (a failure).
            .arg("-timeout=10")
            .arg("-rss_limit_mb=2048")
            .arg("-print_final_stats=1")
            .status()
            .with_context(|| format!("running fuzz target {target}"))?;
        if !status.success() {
            bail!(
                "fuzz target {target} failed ({status}): the crashing input is in {}",
                fuzz_dir.join("artifacts").join(target).display()
            );
        }
        eprintln!("fuzz: {target}: no crash in {:.0} s", started.elapsed().as_secs_f64());
    }
    Ok(())
}

/// `cargo +nightly fuzz` in `dir`, with the outer cargo's toolchain variables removed so
/// the nightly toolchain is used throughout.
fn cargo_fuzz(dir: &Path) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", NIGHTLY, "cargo", "fuzz"]).current_dir(dir);
    for key in [
        "CARGO",
        "RUSTC",
        "RUSTDOC",
        "RUSTUP_TOOLCHAIN",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
    ] {
        cmd.env_remove(key);
    }
    cmd
}

fn nightly_present() -> bool {
    Command::new("rustup")
        .args(["run", NIGHTLY, "rustc", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let present = Command::new("rustup")
        .args(["run", NIGHTLY, "cargo", "fuzz", "--version"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        return Ok(());
    }
    eprintln!("fuzz: installing cargo-fuzz (cargo install cargo-fuzz --locked)");
    run_checked(Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())).args([
        "install",
        "cargo-fuzz",
        "--locked",
    ]))
}

/// A few valid inputs per target so the fuzzer starts from the interesting shapes.
fn write_seeds(fuzz_dir: &Path, target: &str) -> anyhow::Result<()> {
    let dir = fuzz_dir.join("seeds").join(target);
    fs::create_dir_all(&dir)?;
    let seeds: Vec<(&str, Vec<u8>)> = match target {
        "decode" => {
            // EventHeader (24 bytes: kind, pad, sock, ts) + Conn (136) = 160 for open/close.
            let mut open = vec![0u8; 160];
            open[..4].copy_from_slice(&1u32.to_ne_bytes());
            let mut close = open.clone();
            close[..4].copy_from_slice(&2u32.to_ne_bytes());
            // Turn: 88 fixed bytes, head_len (u32 at 60), then the head.
            let head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
            let mut turn = vec![0u8; 88];
            turn[..4].copy_from_slice(&3u32.to_ne_bytes());
            turn[60..64].copy_from_slice(&(head.len() as u32).to_ne_bytes());
            turn.extend_from_slice(head);
            vec![("open", open), ("close", close), ("turn", turn)]
        }
        "tls_records" => vec![
            ("client_hello", vec![0x16, 3, 1, 0, 4, 1, 0, 0, 0]),
            ("application_data", vec![0x17, 3, 3, 0, 3, 1, 2, 3]),
            ("tls13_close_notify", [vec![0x17, 3, 3, 0, 19], vec![0; 19]].concat()),
            // ChangeCipherSpec, Finished, then the first request's record.
            (
                "ccs_finished_request",
                vec![0x14, 3, 3, 0, 1, 1, 0x17, 3, 3, 0, 2, 0, 0, 0x17, 3, 3, 0, 1, 9],
            ),
        ],
        "h2_frames" => {
            let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
            let settings = vec![0, 0, 0, 4, 0, 0, 0, 0, 0];
            let headers = vec![0, 0, 1, 1, 5, 0, 0, 0, 1, 0x82];
            let goaway = vec![0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0];
            vec![
                ("client_flight", [vec![0x00], preface.clone(), settings, headers].concat()),
                ("cut_goaway", [vec![0x9b], preface, goaway].concat()),
            ]
        }
        _ => vec![
            ("request", b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n".to_vec()),
            ("request10", b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".to_vec()),
            ("pipelined", b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nHEAD /b HTTP/1.1\r\n\r\n".to_vec()),
            (
                "response",
                b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5, max=100\r\nConnection: close\r\n\r\nok"
                    .to_vec(),
            ),
            ("partial", b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Ty".to_vec()),
        ],
    };
    for (name, bytes) in seeds {
        fs::write(dir.join(name), bytes)?;
    }
    Ok(())
}
