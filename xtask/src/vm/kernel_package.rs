//! The kernel under test: a Debian `linux-image-*` package fetched with `apt-get download`
//! and unpacked (not installed) under `target/vm/kernel/<package>`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::run_checked;

/// The meta package whose dependency names the current stock kernel image.
const KERNEL_META_PACKAGE: &str = "linux-image-amd64";

pub struct Kernel {
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` of the unpacked package.
    pub modules: PathBuf,
}

/// The stock kernel image package `linux-image-amd64` depends on, e.g. `linux-image-6.1.0-56-amd64`.
fn kernel_package_name() -> anyhow::Result<String> {
    if let Ok(name) = std::env::var("CONNSCOPE_VM_KERNEL_PACKAGE") {
        return Ok(name);
    }
    let lookup = || -> Option<String> {
        let out = Command::new("apt-cache").args(["depends", KERNEL_META_PACKAGE]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).lines().find_map(|line| {
            let dep = line.trim().strip_prefix("Depends:")?.trim();
            dep.starts_with("linux-image-").then(|| dep.to_owned())
        })
    };
    if let Some(name) = lookup() {
        return Ok(name);
    }
    eprintln!("vm-test: {KERNEL_META_PACKAGE} unknown to apt-cache; running apt-get update");
    run_checked(Command::new("apt-get").args(["update", "-q"]))?;
    lookup().with_context(|| format!("apt-cache knows no {KERNEL_META_PACKAGE}"))
}

/// Downloads and unpacks the kernel package once; later runs reuse `target/vm/kernel/<pkg>`.
pub fn unpacked(vm_dir: &Path) -> anyhow::Result<Kernel> {
    let kernels = vm_dir.join("kernel");
    let package = match kernel_package_name() {
        Ok(name) => name,
        // Offline: any kernel unpacked before will do.
        Err(err) => fs::read_dir(&kernels)
            .ok()
            .and_then(|dir| {
                dir.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .find(|n| !n.ends_with(".tmp"))
            })
            .with_context(|| format!("no cached kernel and: {err:#}"))?,
    };
    let root = kernels.join(&package);
    if find_vmlinuz(&root).is_none() {
        let debs = vm_dir.join("debs");
        fs::create_dir_all(&debs)?;
        let have_deb = |debs: &Path| {
            fs::read_dir(debs).ok().and_then(|dir| {
                dir.flatten().map(|e| e.path()).find(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
                        && p.extension().is_some_and(|x| x == "deb")
                })
            })
        };
        let deb = match have_deb(&debs) {
            Some(deb) => deb,
            None => {
                eprintln!("vm-test: apt-get download {package}");
                run_checked(
                    Command::new("apt-get").args(["download", "-q", &package]).current_dir(&debs),
                )?;
                have_deb(&debs)
                    .with_context(|| format!("apt-get download left no {package}_*.deb"))?
            }
        };
        let tmp = kernels.join(format!("{package}.tmp"));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp)?;
        run_checked(Command::new("dpkg").arg("-x").arg(&deb).arg(&tmp))?;
        let _ = fs::remove_dir_all(&root);
        fs::rename(&tmp, &root)?;
    }
    let vmlinuz =
        find_vmlinuz(&root).with_context(|| format!("no boot/vmlinuz-* in {}", root.display()))?;
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or_default()
        .to_owned();
    Ok(Kernel { vmlinuz, modules: root.join("lib/modules").join(release) })
}

fn find_vmlinuz(root: &Path) -> Option<PathBuf> {
    fs::read_dir(root.join("boot"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
}
