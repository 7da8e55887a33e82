//! Checks made before loading anything, so a missing privilege or kernel feature ends in
//! one line that says what is missing and how to fix it, not in an aya error chain.

use std::path::Path;

use thiserror::Error;

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

pub const TRACEFS: &str = "/sys/kernel/tracing";
pub const BTF_VMLINUX: &str = "/sys/kernel/btf/vmlinux";
const KPROBE_PMU: &str = "/sys/bus/event_source/devices/kprobe/type";

#[derive(Debug, Error)]
pub enum PreflightError {
    #[error(
        "missing privileges: connscope needs root, or the capabilities CAP_BPF and CAP_PERFMON \
         (plus CAP_SYS_RESOURCE, CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE); run it with sudo, or \
         `setcap cap_bpf,cap_perfmon,cap_sys_resource,cap_dac_read_search,cap_sys_ptrace+ep`, \
         or in Kubernetes add them to the container's securityContext"
    )]
    MissingCapabilities,
    #[error(
        "tracefs is not mounted at {TRACEFS} and mounting it failed ({reason}); mount it with \
         `mount -t tracefs tracefs {TRACEFS}` or, in a container, mount the host's {TRACEFS}"
    )]
    NoTracefs { reason: String },
    #[error(
        "the fentry backend was requested but the kernel has no BTF at {BTF_VMLINUX} \
         (CONFIG_DEBUG_INFO_BTF); use --probe.backend=auto, kprobe or tracepoint"
    )]
    NoBtf,
}

/// Effective capability set of this process, from /proc/self/status.
fn effective_capabilities() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("CapEff:"))
                .map(str::trim)
                .map(String::from)
        })
        .and_then(|hex| u64::from_str_radix(&hex, 16).ok())
        .unwrap_or(0)
}

pub fn check_privileges() -> Result<(), PreflightError> {
    let caps = effective_capabilities();
    let has = |cap: u32| caps & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        Ok(())
    } else {
        Err(PreflightError::MissingCapabilities)
    }
}

/// Makes sure tracefs is reachable, mounting it when it is not (and we are allowed to).
pub fn ensure_tracefs() -> Result<(), PreflightError> {
    if Path::new(TRACEFS).join("events").is_dir() {
        return Ok(());
    }
    // The legacy location under debugfs works for aya too.
    if Path::new("/sys/kernel/debug/tracing/events").is_dir() {
        return Ok(());
    }
    let source = c"tracefs";
    let target = c"/sys/kernel/tracing";
    // SAFETY: valid NUL-terminated strings, no data argument.
    let rc = unsafe {
        libc::mount(source.as_ptr(), target.as_ptr(), source.as_ptr(), 0, std::ptr::null())
    };
    if rc == 0 {
        tracing::info!("mounted tracefs at {TRACEFS}");
        Ok(())
    } else {
        Err(PreflightError::NoTracefs { reason: std::io::Error::last_os_error().to_string() })
    }
}

pub fn has_btf() -> bool {
    Path::new(BTF_VMLINUX).exists()
}

pub fn has_kprobes() -> bool {
    Path::new(KPROBE_PMU).exists()
}

/// The running kernel's `(major, minor)` version, from `/proc/sys/kernel/osrelease`.
pub fn kernel_version() -> Option<(u32, u32)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    parse_version(&release)
}

fn parse_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; newer ones ignore it.
pub fn raise_memlock_limit() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: plain syscall with a valid pointer to a local struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK: {}", std::io::Error::last_os_error());
    }
}

#[cfg(test)]
mod version_tests {
    #[test]
    fn releases_parse() {
        assert_eq!(super::parse_version("6.18.3-cloud\n"), Some((6, 18)));
        assert_eq!(super::parse_version("5.10.0-32-amd64"), Some((5, 10)));
        assert_eq!(super::parse_version("garbage"), None);
    }
}
