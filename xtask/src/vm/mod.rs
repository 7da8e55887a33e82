//! `cargo xtask vm-test`: the kernel tests on real Debian kernels under QEMU, once per hook
//! backend, over the kernel matrix of [`matrix`] (5.10, 6.1, 6.12).
//!
//! The development kernel has no kprobes and refuses fentry, so those backends are proven
//! here (see [docs/architecture.md](../../../docs/architecture.md)). For each kernel, the
//! `linux-image-*` package of its Debian suite is fetched with `apt-get download` through a
//! private apt configuration (the machine's apt sources stay untouched) and unpacked under
//! `target/vm/`; an initramfs is built from busybox-static, iproute2's `ip`, the agent and the
//! `kernel_*` test binaries of `connscope-tests` (with their shared libraries), and its
//! `/init` runs every test binary with `CONNSCOPE_PROBE_BACKEND` set to each backend in turn.
//! It prints `CONNSCOPE-VM kernel=...`, then `CONNSCOPE-VM backend=<b> result=<r> tests=<n>
//! ...` per backend and a final `CONNSCOPE-VM-RESULT pass|fail`, then powers off. The serial
//! console is streamed to the terminal and to `target/vm/<kernel>/console.log`; QEMU is
//! stopped on a kernel panic, on the result line or on the timeout. A guest that does not
//! reach `/init` within the boot timeout (a stall of software emulation, not a test's failure)
//! is booted again, up to three boots per kernel; a failed test is never run again.
//!
//! Overrides: `--kernel 6.1` (repeatable), `--matrix quick` (one backend per kernel: what
//! `cargo xtask test` runs), `CONNSCOPE_VM_BACKENDS` (e.g.
//! `kprobe`), `CONNSCOPE_VM_TEST_ARGS` (extra test-binary arguments, e.g. a test name
//! filter), `CONNSCOPE_VM_TIMEOUT_SECS` (per VM), `CONNSCOPE_VM_DEBIAN_MIRROR`.

mod cpio;
mod init_script;
mod initramfs;
mod kernel_package;
mod matrix;
mod private_apt;
mod qemu;

use std::{fs, path::Path, time::Instant};

use anyhow::bail;
pub use matrix::Matrix;

use crate::{binaries, debian_packages, workspace_root};

/// Debian packages only the VM tier needs (the kernels themselves are downloaded, not installed).
const VM_APT_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "iproute2", "xz-utils"];

/// Runs `matrix` (only the kernels named in `kernels`, when any).
pub fn run(matrix: Matrix, kernels: &[String]) -> anyhow::Result<()> {
    let started = Instant::now();
    let cells: Vec<&matrix::KernelCell> = matrix::KERNELS
        .iter()
        .filter(|k| kernels.is_empty() || kernels.iter().any(|n| n == k.name))
        .collect();
    if cells.is_empty() {
        let known: Vec<&str> = matrix::KERNELS.iter().map(|k| k.name).collect();
        bail!("no kernel {kernels:?} in the matrix (known: {known:?})");
    }
    let vm_dir = workspace_root().join("target/vm");
    fs::create_dir_all(&vm_dir)?;
    debian_packages::ensure_installed(VM_APT_PACKAGES, "vm-test")?;
    let mirror = private_apt::system_mirror()?;
    eprintln!("vm-test: Debian mirror {} (from {})", mirror.uri, mirror.source.display());

    // The release agent, as shipped: under software emulation the debug build needs 15-30 s
    // to start (parsing the kernel's BTF), close to the test harness's 30 s readiness bound.
    let agent = binaries::release_agent()?;
    let tests = binaries::kernel_test_binaries()?;
    if tests.is_empty() {
        bail!("no kernel_* test binary in connscope-tests");
    }
    let mut summary = Vec::new();
    let mut failed = false;
    for cell in cells {
        let backends = cell.backends(matrix);
        let cell_tests: Vec<(String, std::path::PathBuf)> =
            tests.iter().filter(|(name, _)| cell.runs_binary(matrix, name)).cloned().collect();
        let contents = initramfs::Contents { agent: &agent, tests: &cell_tests };
        let outcome = run_kernel(&vm_dir, &mirror, cell, &backends, &contents);
        match outcome {
            Ok((package, lines)) => {
                let pass = lines.last().is_some_and(|l| l == "CONNSCOPE-VM-RESULT pass");
                failed |= !pass;
                summary.push(format!("{} {} ({package}):", cell.release, cell.name));
                summary.extend(lines.into_iter().map(|l| format!("  {l}")));
            }
            Err(err) => {
                failed = true;
                summary.push(format!("{} {}: {err:#}", cell.release, cell.name));
            }
        }
    }
    eprintln!("vm-test: whole VM tier {:.1} s", started.elapsed().as_secs_f64());
    for line in &summary {
        eprintln!("vm-test: {line}");
    }
    if failed {
        bail!("VM tests failed (serial consoles in {}/<kernel>/console.log)", vm_dir.display());
    }
    Ok(())
}

/// Boots one kernel with its backends; returns the kernel package (with version) and the
/// `CONNSCOPE-VM` result lines.
fn run_kernel(
    vm_dir: &Path,
    mirror: &private_apt::Mirror,
    cell: &matrix::KernelCell,
    backends: &[String],
    contents: &initramfs::Contents,
) -> anyhow::Result<(String, Vec<String>)> {
    let started = Instant::now();
    let kernel = kernel_package::unpacked(vm_dir, mirror, cell.suite)?;
    let package = format!("{} {}", kernel.package, kernel.version);
    eprintln!("vm-test: {} kernel {package} ({})", cell.name, kernel.vmlinuz.display());
    let dir = vm_dir.join(cell.name);
    fs::create_dir_all(&dir)?;
    let initramfs = dir.join("initramfs.cpio.gz");
    let backends: Vec<&str> = backends.iter().map(String::as_str).collect();
    initramfs::build(vm_dir, &kernel, &backends, contents, &initramfs)?;
    eprintln!(
        "vm-test: initramfs {} ({} MB) ready at {:.1} s",
        initramfs.display(),
        fs::metadata(&initramfs)?.len() / 1_000_000,
        started.elapsed().as_secs_f64()
    );
    let boot = Instant::now();
    let console = dir.join("console.log");
    let mut attempt = 1;
    loop {
        match qemu::boot_and_watch(&kernel.vmlinuz, &initramfs, &console, backends.len()) {
            Ok(lines) => {
                eprintln!("vm-test: {} VM ran {:.1} s", cell.name, boot.elapsed().as_secs_f64());
                return Ok((package, lines));
            }
            Err(err) if attempt < BOOT_ATTEMPTS && emulator_failure(&err).is_some() => {
                let what = emulator_failure(&err).unwrap_or_default();
                let kept = dir.join(format!("console.{what}-{attempt}.log"));
                let _ = fs::rename(&console, &kept);
                attempt += 1;
                eprintln!(
                    "vm-test: {} VM: {err:#}; booting again (attempt {attempt} of \
                     {BOOT_ATTEMPTS}; that console is kept in {})",
                    cell.name,
                    kept.display()
                );
            }
            Err(err) => return Err(err),
        }
    }
}

/// Boots per kernel when the emulated machine failed (`emulator_failed`); a test that fails
/// is never run again.
const BOOT_ATTEMPTS: u32 = 3;

/// The name (in its kept console's file name) of a failure of the emulated machine, not a
/// test's (`qemu::EmulatorFailure::blames_the_machine`).
fn emulator_failure(err: &anyhow::Error) -> Option<&'static str> {
    err.downcast_ref::<qemu::EmulatorFailure>()
        .filter(|failure| failure.blames_the_machine(qemu::kvm_usable()))
        .map(qemu::EmulatorFailure::name)
}
