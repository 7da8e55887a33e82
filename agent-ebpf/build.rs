//! Rebuild the programs when the `bpf-linker` binary changes: the link step depends on it,
//! but cargo cannot see that dependency. For host builds (clippy, tests) the architecture
//! the programs read registers for is the host's, as aya-ebpf's own build script does;
//! aya-build sets `bpf_target_arch` itself for the bpf target. The cfg's values are declared
//! here (not in `[lints.rust]`, which cargo rejects beside `[lints] workspace = true`).
fn main() {
    println!("cargo::rustc-check-cfg=cfg(bpf_target_arch, values(\"x86_64\", \"aarch64\"))");
    if let Ok(bpf_linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    if !arch.starts_with("bpf") {
        println!("cargo:rustc-cfg=bpf_target_arch=\"{arch}\"");
    }
}
