//! Booting the VM under QEMU (KVM when usable, else software emulation) and watching its
//! serial console for the result lines.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// The emulated machine failed, not a test: the caller may boot again (`vm::run_cell`).
#[derive(Debug)]
pub enum EmulatorFailure {
    /// The guest never reached its init script: under software emulation a boot sometimes
    /// stalls before `/init` (the kernel's RCU stall reports, with an idle QEMU, and nothing
    /// else).
    BootHang { seconds: u64 },
    /// The guest kernel trapped on the `int3` its own text patching leaves in a call site
    /// while it rewrites it, and panicked (`Oops: int3`). Static calls and jump labels are
    /// rewritten at every tracepoint attach and detach, and under software emulation another
    /// vCPU can still execute that breakpoint once the rewrite is over (seen once, in 6.12's
    /// `tcp_reset`, during a takeover).
    PatchingTrap { panic: String },
    /// The guest kernel's watchdog saw a CPU stuck in the kernel (`watchdog: BUG: soft
    /// lockup`). Seen once under software emulation, on Debian 11's 5.10, during a graceful
    /// restart test (fentry programs replaced: text patching) that passes in every other run:
    /// a vCPU spun for minutes until the backend's timeout.
    SoftLockup { line: String },
}

impl EmulatorFailure {
    /// The failure's name in the file name of its kept console.
    pub fn name(&self) -> &'static str {
        match self {
            Self::BootHang { .. } => "boot-hang",
            Self::PatchingTrap { .. } => "patching-trap",
            Self::SoftLockup { .. } => "soft-lockup",
        }
    }

    /// Whether the machine, not a test, is to blame here: a hang before init always; the
    /// kernel's own traps and lockups only under software emulation (with KVM they are
    /// failures).
    pub fn blames_the_machine(&self, kvm: bool) -> bool {
        matches!(self, Self::BootHang { .. }) || !kvm
    }
}

impl std::fmt::Display for EmulatorFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::BootHang { seconds } => {
                write!(f, "the guest did not reach its init script in {seconds} s")
            }
            Self::PatchingTrap { panic } => {
                write!(f, "the guest kernel hit an int3 of its own text patching: {panic}")
            }
            Self::SoftLockup { line } => {
                write!(f, "the guest kernel reported a soft lockup: {line}")
            }
        }
    }
}

impl std::error::Error for EmulatorFailure {}

/// Boot and set-up, and each backend's run: generous for software emulation on a busy host
/// (a backend's 41 tests take 8-10 minutes there; 8 minutes was once too few for 6.1).
const BOOT_TIMEOUT: Duration = Duration::from_secs(3 * 60);
const BACKEND_TIMEOUT: Duration = Duration::from_secs(13 * 60);

pub fn kvm_usable() -> bool {
    let cpu_virt = fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines().any(|l| {
                l.starts_with("flags") && l.split_whitespace().any(|f| f == "vmx" || f == "svm")
            })
        })
        .unwrap_or(false);
    cpu_virt && fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok()
}

/// Boots the VM and returns the `CONNSCOPE-VM` kernel, hooks and per-backend lines, the last
/// being the result line. The timeout grows with the number of `backends` the VM runs.
pub fn boot_and_watch(
    vmlinuz: &Path,
    initramfs: &Path,
    log_path: &Path,
    backends: usize,
) -> anyhow::Result<Vec<String>> {
    let timeout = std::env::var("CONNSCOPE_VM_TIMEOUT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(BOOT_TIMEOUT + BACKEND_TIMEOUT * backends as u32);
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-m", "2048", "-smp", "2", "-nographic", "-no-reboot"]);
    if kvm_usable() {
        qemu.args(["-enable-kvm", "-cpu", "host"]);
    } else {
        eprintln!("vm-test: no usable KVM (needs /dev/kvm and vmx/svm): software emulation");
        qemu.args(["-cpu", "max"]);
    }
    qemu.arg("-kernel").arg(vmlinuz).arg("-initrd").arg(initramfs);
    qemu.args(["-append", "console=ttyS0 panic=-1 quiet"]);
    watch(qemu, log_path, timeout, BOOT_TIMEOUT.min(timeout))
}

/// Runs `qemu` and follows its serial console (stdout) until the result line, a kernel
/// panic, `timeout`, or `boot_timeout` without the init script's first line ([`EmulatorFailure::BootHang`]).
fn watch(
    mut qemu: Command,
    log_path: &Path,
    timeout: Duration,
    boot_timeout: Duration,
) -> anyhow::Result<Vec<String>> {
    qemu.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    let mut child = qemu.spawn().context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let mut log =
        fs::File::create(log_path).with_context(|| format!("creating {}", log_path.display()))?;

    let (lines_tx, lines_rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            match reader.read_until(b'\n', &mut raw) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&raw).replace('\r', "");
                    if lines_tx.send(line).is_err() {
                        break;
                    }
                }
            }
        }
    });

    let deadline = Instant::now() + timeout;
    // A normal boot reaches `/init` in about 10 s, even under software emulation.
    let boot_deadline = Instant::now() + boot_timeout;
    let mut results = Vec::new();
    let mut stop_at: Option<Instant> = None;
    let mut failure: Option<anyhow::Error> = None;
    let mut patching_trap = false;
    let mut terminal = std::io::stderr();
    loop {
        // The init script's first line (`CONNSCOPE-VM kernel=`) is the first result kept.
        let booted = !results.is_empty();
        let until = match stop_at {
            Some(stop_at) => stop_at,
            None if !booted => boot_deadline,
            None => deadline,
        };
        match lines_rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                let _ = terminal.write_all(line.as_bytes());
                let _ = log.write_all(line.as_bytes());
                let trimmed = line.trim_end();
                if let Some(pos) = trimmed.find("CONNSCOPE-VM") {
                    let marker = &trimmed[pos..];
                    if marker.starts_with("CONNSCOPE-VM backend=")
                        || marker.starts_with("CONNSCOPE-VM kernel=")
                        || marker.starts_with("CONNSCOPE-VM hooks ")
                        || marker.starts_with("CONNSCOPE-VM-RESULT")
                    {
                        results.push(marker.to_owned());
                    }
                    if marker.starts_with("CONNSCOPE-VM-RESULT") && stop_at.is_none() {
                        // Give `poweroff -f` a moment, then stop QEMU regardless.
                        stop_at = Some(Instant::now() + Duration::from_secs(15));
                    }
                }
                patching_trap |= trimmed.contains("Oops: int3");
                if trimmed.contains("watchdog: BUG: soft lockup") && stop_at.is_none() {
                    // Stopped now rather than at the backend's timeout, minutes later.
                    failure = Some(EmulatorFailure::SoftLockup { line: trimmed.to_owned() }.into());
                    stop_at = Some(Instant::now() + Duration::from_secs(3));
                }
                if trimmed.contains("Kernel panic") && stop_at.is_none() {
                    failure = Some(if patching_trap {
                        EmulatorFailure::PatchingTrap { panic: trimmed.to_owned() }.into()
                    } else {
                        anyhow::anyhow!("kernel panic: {trimmed}")
                    });
                    // Keep reading briefly for the stack trace.
                    stop_at = Some(Instant::now() + Duration::from_secs(3));
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if stop_at.is_none() {
                    failure = Some(if booted {
                        anyhow::anyhow!("timeout: no result line after {} s", timeout.as_secs())
                    } else {
                        EmulatorFailure::BootHang { seconds: boot_timeout.as_secs() }.into()
                    });
                }
                break;
            }
        }
    }
    if child.try_wait()?.is_none() {
        let _ = child.kill();
    }
    let _ = child.wait();
    let _ = reader.join();
    let _ = log.flush();
    if let Some(failure) = failure {
        return Err(failure.context(format!("serial console in {}", log_path.display())));
    }
    if !results.last().is_some_and(|l| l.starts_with("CONNSCOPE-VM-RESULT")) {
        bail!("the VM stopped without a result line (serial console in {})", log_path.display());
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`watch`] with a shell standing in for QEMU, printing `script`'s output as its serial
    /// console; returns the outcome and the console log it wrote.
    fn watch_shell(
        name: &str,
        script: &str,
        timeout: Duration,
        boot_timeout: Duration,
    ) -> anyhow::Result<(anyhow::Result<Vec<String>>, String)> {
        let log = std::env::temp_dir()
            .join(format!("connscope-vm-watch-{}-{name}.log", std::process::id()));
        let mut sh = Command::new("sh");
        sh.args(["-c", script]);
        let outcome = watch(sh, &log, timeout, boot_timeout);
        let console = fs::read_to_string(&log)?;
        fs::remove_file(&log)?;
        Ok((outcome, console))
    }

    #[test]
    fn a_guest_silent_before_init_is_a_boot_hang() -> anyhow::Result<()> {
        let started = Instant::now();
        let (outcome, console) = watch_shell(
            "hang",
            "echo '[ 24.7] rcu: INFO: rcu_sched detected stalls'; exec sleep 30",
            Duration::from_secs(20),
            Duration::from_secs(1),
        )?;
        let err = outcome.expect_err("a silent guest passed");
        assert!(matches!(err.downcast_ref(), Some(EmulatorFailure::BootHang { .. })), "{err:#}");
        assert!(started.elapsed() < Duration::from_secs(10), "stopped at the boot timeout");
        assert!(console.contains("rcu_sched detected stalls"));
        Ok(())
    }

    #[test]
    fn a_booted_guest_that_stops_reporting_is_a_timeout_not_a_boot_hang() -> anyhow::Result<()> {
        let (outcome, _) = watch_shell(
            "timeout",
            "echo 'CONNSCOPE-VM kernel=5.10.0-32-amd64 cpus=2'; exec sleep 30",
            Duration::from_secs(2),
            Duration::from_secs(1),
        )?;
        let err = outcome.expect_err("a guest without a result passed");
        assert!(err.downcast_ref::<EmulatorFailure>().is_none(), "{err:#}");
        assert!(format!("{err:#}").contains("no result line after 2 s"), "{err:#}");
        Ok(())
    }

    #[test]
    fn a_panic_on_an_int3_of_text_patching_is_a_patching_trap() -> anyhow::Result<()> {
        let (outcome, _) = watch_shell(
            "int3",
            "echo 'CONNSCOPE-VM kernel=6.12 cpus=2'; \
             echo '[ 24.27] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI'; \
             echo '[ 24.27] RIP: 0010:tcp_reset+0x72/0xa0'; \
             echo '[ 24.28] Kernel panic - not syncing: Fatal exception in interrupt'; exec sleep 30",
            Duration::from_secs(20),
            Duration::from_secs(5),
        )?;
        let err = outcome.expect_err("a panicked guest passed");
        assert!(
            matches!(err.downcast_ref(), Some(EmulatorFailure::PatchingTrap { .. })),
            "{err:#}"
        );
        // Any other panic stays a failure.
        let (outcome, _) = watch_shell(
            "panic",
            "echo 'CONNSCOPE-VM kernel=6.12 cpus=2'; \
             echo '[ 9.1] BUG: kernel NULL pointer dereference, address: 0000000000000008'; \
             echo '[ 9.2] Kernel panic - not syncing: Fatal exception'; exec sleep 30",
            Duration::from_secs(20),
            Duration::from_secs(5),
        )?;
        let err = outcome.expect_err("a panicked guest passed");
        assert!(err.downcast_ref::<EmulatorFailure>().is_none(), "{err:#}");
        assert!(format!("{err:#}").contains("kernel panic"), "{err:#}");
        Ok(())
    }

    #[test]
    fn a_soft_lockup_stops_the_guest_at_once() -> anyhow::Result<()> {
        let started = Instant::now();
        let (outcome, _) = watch_shell(
            "lockup",
            "echo 'CONNSCOPE-VM kernel=5.10.0-32-amd64 cpus=2'; \
             echo '[  285.2] rcu: INFO: rcu_sched self-detected stall on CPU'; \
             echo '[  312.5] watchdog: BUG: soft lockup - CPU#0 stuck for 23s! [restart_under_t:408]'; \
             exec sleep 30",
            Duration::from_secs(20),
            Duration::from_secs(5),
        )?;
        let err = outcome.expect_err("a locked-up guest passed");
        assert!(matches!(err.downcast_ref(), Some(EmulatorFailure::SoftLockup { .. })), "{err:#}");
        assert!(started.elapsed() < Duration::from_secs(15), "waited for the backend timeout");
        Ok(())
    }

    #[test]
    fn result_lines_are_returned_in_order() -> anyhow::Result<()> {
        let (outcome, _) = watch_shell(
            "pass",
            "echo 'CONNSCOPE-VM kernel=6.1 cpus=2'; \
             echo 'CONNSCOPE-VM backend=fentry result=pass tests=30 failed=0'; \
             echo 'CONNSCOPE-VM-RESULT pass'",
            Duration::from_secs(20),
            Duration::from_secs(5),
        )?;
        assert_eq!(
            outcome?,
            [
                "CONNSCOPE-VM kernel=6.1 cpus=2",
                "CONNSCOPE-VM backend=fentry result=pass tests=30 failed=0",
                "CONNSCOPE-VM-RESULT pass",
            ]
        );
        Ok(())
    }
}
