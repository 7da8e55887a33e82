//! The kernel under test: the `linux-image-*` package a Debian suite's `linux-image-amd64`
//! depends on, fetched with the suite's private apt and unpacked (not installed) under
//! `target/vm/kernel/<package>`. Offline, the kernel unpacked for that suite before is reused.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use super::private_apt::{Mirror, PrivateApt};
use crate::run_checked;

/// The meta package whose dependency names a suite's current stock kernel image.
const KERNEL_META_PACKAGE: &str = "linux-image-amd64";

pub struct Kernel {
    /// e.g. `linux-image-6.1.0-41-amd64`.
    pub package: String,
    /// e.g. `6.1.158-1`.
    pub version: String,
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` of the unpacked package.
    pub modules: PathBuf,
}

/// The unpacked kernel of `suite`, downloaded and unpacked the first time.
pub fn unpacked(vm_dir: &Path, mirror: &Mirror, suite: &str) -> anyhow::Result<Kernel> {
    let kernels = vm_dir.join("kernel");
    fs::create_dir_all(&kernels)?;
    // Which package (and version) the suite's kernel is: a marker remembers it for offline runs.
    let marker = kernels.join(format!("{suite}.package"));
    let apt = PrivateApt::new(&vm_dir.join("apt").join(suite), mirror, suite)?;
    let resolved = apt.update().and_then(|()| {
        let package = apt.image_dependency(KERNEL_META_PACKAGE)?;
        let version = apt.version(&package)?;
        Ok((package, version))
    });
    let (package, version) = match resolved {
        Ok(found) => found,
        Err(err) => {
            let cached = fs::read_to_string(&marker).ok().and_then(|text| {
                let (package, version) = text.trim().split_once(' ')?;
                Some((package.to_owned(), version.to_owned()))
            });
            let found = cached.with_context(|| format!("no cached {suite} kernel and: {err:#}"))?;
            eprintln!("vm-test: {err:#}; using the {suite} kernel unpacked before ({})", found.0);
            found
        }
    };
    let root = kernels.join(&package);
    if find_vmlinuz(&root).is_none() {
        let debs = vm_dir.join("debs");
        fs::create_dir_all(&debs)?;
        let deb = match find_deb(&debs, &package) {
            Some(deb) => deb,
            None => {
                apt.download(&package, &debs)?;
                find_deb(&debs, &package)
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
    fs::write(&marker, format!("{package} {version}\n"))?;
    let vmlinuz =
        find_vmlinuz(&root).with_context(|| format!("no boot/vmlinuz-* in {}", root.display()))?;
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or_default()
        .to_owned();
    Ok(Kernel { package, version, vmlinuz, modules: root.join("lib/modules").join(release) })
}

/// A downloaded `<package>_<version>_<arch>.deb` in `debs`.
fn find_deb(debs: &Path, package: &str) -> Option<PathBuf> {
    fs::read_dir(debs).ok()?.flatten().map(|e| e.path()).find(|p| {
        p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
            && p.extension().is_some_and(|x| x == "deb")
    })
}

fn find_vmlinuz(root: &Path) -> Option<PathBuf> {
    fs::read_dir(root.join("boot"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
}
