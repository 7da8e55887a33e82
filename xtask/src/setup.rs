//! `cargo xtask setup`: everything the eBPF build and the tests need on a fresh Debian 12
//! machine (see [docs/architecture.md](../../docs/architecture.md)), idempotent and quick when
//! already done. Each step checks first and installs only what is missing.
//!
//! - Debian's `rustc-web` toolchain ships a prebuilt `core` for `bpfel-unknown-none`; it is
//!   linked into rustup as `connscope-bpf`, which `agent/build.rs` picks up.
//! - `bpf-linker` 0.13.0 built against Debian's LLVM 22.
//! - The tools the tests drive: nginx, wrk, curl, Prometheus/promtool, iproute2, nftables, and the
//!   PyPI validators of the Kubernetes manifests.

use std::{process::Command, time::Instant};

use anyhow::{Context as _, bail};

use crate::{debian_packages, run_checked};

/// Debian packages: the eBPF toolchain first, then what the tests use.
const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "nginx",
    "wrk",
    "curl",
    "prometheus",
    "iproute2",
    // `nft`: the connect tests drop SYNs inside their own network namespace.
    "nftables",
    "python3",
    "python3-pip",
    // `h2load`: the bench's HTTP/2 arm.
    "nghttp2-client",
    // `perf`: the bench's profile of the agent under churn.
    "linux-perf",
    "systemd",
    // Test certificates (TLS tests) and bcrypt hashes as users make them (web config).
    "openssl",
    "apache2-utils",
];

/// PyPI packages: the offline manifest checks (tests/tests/assets_kubernetes.rs), and the
/// gRPC server and client of the HTTP/2 tests (tests/tests/e2e_http2.rs).
const PIP_PACKAGES: &[&str] =
    &["kubernetes-validate==1.37.0", "jsonschema==4.26.0", "grpcio==1.85.4"];

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
pub const LINKED_TOOLCHAIN: &str = "connscope-bpf";

type Step = fn() -> anyhow::Result<()>;

/// The set-up steps in order, each named for the error of a failed install.
const STEPS: &[(&str, Step)] = &[
    ("Debian packages", apt_packages),
    ("PyPI packages", pip_packages),
    ("kubectl", kubectl),
    ("npm packages", crate::node_tools::install),
    ("bpf-linker", bpf_linker),
    ("rustup toolchain link", toolchain_link),
];

pub fn run() -> anyhow::Result<()> {
    let started = Instant::now();
    for (name, step) in STEPS {
        step().with_context(|| format!("setup step: {name}"))?;
    }
    eprintln!("setup: ready in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn apt_packages() -> anyhow::Result<()> {
    if debian_packages::ensure_installed(APT_PACKAGES, "setup")? {
        // nginx's postinst may start the packaged server; the tests start their own.
        let _ = Command::new("nginx").args(["-s", "stop"]).status();
    }
    Ok(())
}

fn pip_packages() -> anyhow::Result<()> {
    let check = Command::new("python3")
        .args(["-c", "import kubernetes_validate, jsonschema, grpc"])
        .output()
        .context("running python3")?;
    if check.status.success() {
        return Ok(());
    }
    eprintln!("setup: installing {}", PIP_PACKAGES.join(" "));
    // Debian's own python3 refuses a system-wide pip install (PEP 668) unless told to.
    run_checked(
        Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--break-system-packages"])
            .args(PIP_PACKAGES),
    )
}

/// kubectl (for its built-in kustomize) comes with the machine image; no Debian 12
/// repository serves a recent one, and Debian's `kubernetes-client` is too old for
/// kustomize components.
fn kubectl() -> anyhow::Result<()> {
    let found = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !found {
        bail!(
            "kubectl (1.27 or newer, for `kubectl kustomize`) is missing: install it from the Kubernetes packages"
        );
    }
    Ok(())
}

fn bpf_linker() -> anyhow::Result<()> {
    let installed = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    if installed {
        return Ok(());
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes, once)"
    );
    run_checked(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--locked", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )
}

fn toolchain_link() -> anyhow::Result<()> {
    let listing =
        Command::new("rustup").args(["toolchain", "list"]).output().context("running rustup")?;
    let linked = String::from_utf8_lossy(&listing.stdout)
        .lines()
        .any(|line| line.split_whitespace().next() == Some(LINKED_TOOLCHAIN));
    if linked {
        return Ok(());
    }
    let version = Command::new("/usr/bin/rustc")
        .arg("--version")
        .output()
        .context("running /usr/bin/rustc")?;
    if !version.status.success() {
        bail!("/usr/bin/rustc does not run; is rustc-web installed?");
    }
    eprintln!(
        "setup: linking Debian's {} into rustup as {LINKED_TOOLCHAIN}",
        String::from_utf8_lossy(&version.stdout).trim()
    );
    run_checked(Command::new("rustup").args(["toolchain", "link", LINKED_TOOLCHAIN, "/usr"]))
}
