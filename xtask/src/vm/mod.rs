//! `cargo xtask vm-test`: the kernel tests on a real distribution kernel under QEMU, once per
//! hook backend (fentry, kprobe, tracepoint).
//!
//! The development kernel has no kprobes and refuses fentry, so those backends are proven
//! here (see [docs/architecture.md](../../../docs/architecture.md)): Debian's stock kernel (`linux-image-amd64`, 6.1: BTF, kprobes,
//! fentry) is fetched with `apt-get download` and unpacked under `target/vm/`, an initramfs
//! is built from busybox-static, iproute2's `ip`, the agent and the `kernel_*` test binaries
//! of `connscope-tests` (with their shared libraries), and its `/init` runs every test binary
//! with `CONNSCOPE_PROBE_BACKEND` set to each backend in turn. It prints
//! `CONNSCOPE-VM backend=<b> result=<r> tests=<n> ...` per backend and a final
//! `CONNSCOPE-VM-RESULT pass|fail`, then powers off. The serial console is streamed to the
//! terminal and to `target/vm/console.log`; QEMU is stopped on a kernel panic, on the result
//! line or on the timeout (`CONNSCOPE_VM_TIMEOUT_SECS`, 15 minutes by default).
//!
//! Overrides: `CONNSCOPE_VM_KERNEL_PACKAGE` (another `linux-image-*` package),
//! `CONNSCOPE_VM_BACKENDS` (e.g. `kprobe`), `CONNSCOPE_VM_TEST_ARGS` (extra test-binary
//! arguments, e.g. a test name filter).

mod cpio;
mod init_script;
mod initramfs;
mod kernel_package;
mod qemu;

use std::{fs, time::Instant};

use anyhow::bail;

use crate::{binaries, debian_packages, workspace_root};

/// Debian packages only the VM tier needs (the kernel itself is downloaded, not installed).
const VM_APT_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "iproute2"];

pub fn run() -> anyhow::Result<()> {
    let started = Instant::now();
    let vm_dir = workspace_root().join("target/vm");
    fs::create_dir_all(&vm_dir)?;
    debian_packages::ensure_installed(VM_APT_PACKAGES, "vm-test")?;
    let kernel = kernel_package::unpacked(&vm_dir)?;
    eprintln!(
        "vm-test: kernel {} ({:.1} s)",
        kernel.vmlinuz.display(),
        started.elapsed().as_secs_f64()
    );

    let agent = binaries::debug_agent()?;
    let tests = binaries::kernel_test_binaries()?;
    if tests.is_empty() {
        bail!("no kernel_* test binary in connscope-tests");
    }
    let initramfs = vm_dir.join("initramfs.cpio.gz");
    initramfs::build(&vm_dir, &kernel, &agent, &tests, &initramfs)?;
    eprintln!(
        "vm-test: initramfs {} ({} MB, {} test binaries) ready at {:.1} s",
        initramfs.display(),
        fs::metadata(&initramfs)?.len() / 1_000_000,
        tests.len(),
        started.elapsed().as_secs_f64()
    );

    let boot = Instant::now();
    let outcome = qemu::boot_and_watch(&kernel.vmlinuz, &initramfs, &vm_dir.join("console.log"));
    eprintln!(
        "vm-test: VM ran {:.1} s; whole VM tier {:.1} s",
        boot.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    let lines = outcome?;
    for line in &lines {
        eprintln!("vm-test: {line}");
    }
    match lines.last().map(String::as_str) {
        Some("CONNSCOPE-VM-RESULT pass") => Ok(()),
        _ => bail!("VM tests failed (serial console in {})", vm_dir.join("console.log").display()),
    }
}
