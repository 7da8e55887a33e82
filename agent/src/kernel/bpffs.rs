//! The BPF filesystem that holds `--bpf.pin-path`.
//!
//! Pinned state needs a BPF filesystem, and some hosts boot without one mounted (no systemd,
//! or a minimal VM: `/sys/fs/bpf` is an empty sysfs directory). An agent running as a plain
//! root process in the host's mount namespace mounts one at `/sys/fs/bpf` itself: the mount
//! belongs to the namespace, so it outlives the agent, as the pinned state must. In a
//! container or a sandboxed unit the mount would die with the agent's own mount namespace,
//! so the deployments make sure the host has one instead (`deploy/kubernetes`: an init
//! container with `Bidirectional` propagation; `deploy/systemd`: a privileged
//! `ExecStartPre=`).

use std::{ffi::CString, io, path::Path};

use anyhow::Context as _;

/// `statfs` type of a BPF filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Where the kernel's BPF filesystem conventionally lives, and the only place the agent
/// mounts one.
pub const BPF_FS_ROOT: &str = "/sys/fs/bpf";

/// Whether `dir` (which must exist) is on a BPF filesystem.
pub fn is_on_bpf_fs(dir: &Path) -> anyhow::Result<bool> {
    let path = CString::new(dir.as_os_str().as_encoded_bytes())?;
    // SAFETY: a zeroed out-struct for statfs.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs with a NUL-terminated path and a valid out-struct.
    if unsafe { libc::statfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error()).context(format!("statfs {}", dir.display()));
    }
    Ok(stat.f_type as i64 == BPF_FS_MAGIC)
}

/// Mounts a BPF filesystem at [`BPF_FS_ROOT`] when `pin_dir` lies under it and nothing is
/// mounted there yet; logs that it did. Returns whether it mounted one.
pub fn mount_for(pin_dir: &Path) -> anyhow::Result<bool> {
    let root = Path::new(BPF_FS_ROOT);
    if !pin_dir.starts_with(root) || !root.is_dir() || is_on_bpf_fs(root)? {
        return Ok(false);
    }
    let (source, target, fstype) = (c"bpf", CString::new(BPF_FS_ROOT)?, c"bpf");
    // Only root may use the pinned state (what systemd and Cilium mount with as well).
    let options = c"mode=0700";
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, options.as_ptr().cast())
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context(format!(
            "nothing is mounted on {BPF_FS_ROOT} and mounting a BPF filesystem there failed \
             (in a container or a sandboxed unit, mount it on the host: `mount -t bpf bpf \
             {BPF_FS_ROOT}`)"
        ));
    }
    tracing::info!(
        "mounted a BPF filesystem on {BPF_FS_ROOT} (none was mounted) for --bpf.pin-path {}",
        pin_dir.display()
    );
    Ok(true)
}

/// `connscope mount-bpffs`: [`mount_for`] the pin path, saying what it found or did.
pub fn mount_command(pin_dir: Option<&Path>) -> std::process::ExitCode {
    let Some(dir) = pin_dir else {
        eprintln!("connscope: nothing is pinned (--bpf.pin-path \"\"): no BPF filesystem needed");
        return std::process::ExitCode::SUCCESS;
    };
    match mount_for(dir) {
        Ok(true) => {
            eprintln!("connscope: mounted a BPF filesystem on {BPF_FS_ROOT}");
            std::process::ExitCode::SUCCESS
        }
        Ok(false) => {
            eprintln!(
                "connscope: nothing to mount for {}: a BPF filesystem is on {BPF_FS_ROOT} \
                 already, or the pin path lies elsewhere",
                dir.display()
            );
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("connscope: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
