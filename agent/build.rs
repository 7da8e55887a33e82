//! Builds the kernel programs (`agent-ebpf`) for the bpf target and places the object in
//! `OUT_DIR`, where `probes.rs` embeds it.
//!
//! Toolchain: `cargo xtask setup` links Debian's rustc (which ships a prebuilt `core` for
//! `bpfel-unknown-none`) into rustup as `connscope-bpf`; when that link exists it is used,
//! with `RUSTC_BOOTSTRAP` scoped to `aya_ebpf` (the one crate that needs a nightly feature).
//! Otherwise the aya default applies: `nightly` with `rust-src` and `-Z build-std=core`.
//! `CONNSCOPE_EBPF_TOOLCHAIN` overrides the choice.
use std::{env, process::Command};

use aya_build::{Package, Toolchain};

const LINKED_TOOLCHAIN: &str = "connscope-bpf";

fn linked_toolchain_present() -> bool {
    Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|line| line.split_whitespace().next() == Some(LINKED_TOOLCHAIN))
        })
        .unwrap_or(false)
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=CONNSCOPE_EBPF_TOOLCHAIN");
    let chosen = env::var("CONNSCOPE_EBPF_TOOLCHAIN")
        .ok()
        .or_else(|| linked_toolchain_present().then(|| LINKED_TOOLCHAIN.to_owned()));
    let toolchain = match chosen.as_deref() {
        Some("nightly") | None => Toolchain::Nightly,
        Some(name) => {
            if env::var_os("RUSTC_BOOTSTRAP").is_none() {
                // SAFETY: the build script is single-threaded here; the variable is read by
                // aya-build and inherited by the cargo it spawns.
                unsafe { env::set_var("RUSTC_BOOTSTRAP", "aya_ebpf") };
            }
            Toolchain::Custom(name)
        }
    };
    let manifest_dir = env::var("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = format!("{manifest_dir}/../agent-ebpf");
    let package = Package { name: "connscope-ebpf", root_dir: &ebpf_dir, ..Default::default() };
    aya_build::build_ebpf([package], toolchain)
}
