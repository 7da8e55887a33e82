//! The VM's root file system: busybox-static, iproute2's `ip`, Python, the agent and the
//! `kernel_*` test binaries (with their shared libraries), the kernel's veth module and `/init`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use super::{
    cpio::{Archive, Member},
    init_script::init_script,
    kernel_package::Kernel,
    qemu::kvm_usable,
};

/// Kernel modules loaded by `/init` when the kernel has them as modules (not built in), in
/// this order: veth for the network namespace tests, and `inet_diag` then `tcp_diag` for the
/// socket census's `NETLINK_SOCK_DIAG` dumps (a host loads them on the first request).
const MODULES: &[&str] =
    &["kernel/drivers/net/veth.ko", "kernel/net/ipv4/inet_diag.ko", "kernel/net/ipv4/tcp_diag.ko"];

/// Copies an executable and every shared library `ldd` lists for it, at their host paths
/// (a copy without debug information when `strip_dir` is given).
fn add_program(
    archive: &mut Archive,
    archive_path: &str,
    host: &Path,
    strip_dir: Option<&Path>,
) -> anyhow::Result<()> {
    let source = match strip_dir {
        Some(dir) => strip_copy(host, dir).unwrap_or_else(|| host.to_owned()),
        None => host.to_owned(),
    };
    archive.add_host_file(archive_path, &source)?;
    for library in shared_libraries(host)? {
        let path = library.to_string_lossy().into_owned();
        if !archive.contains(&path) {
            archive.add_host_file(&path, &library)?;
        }
    }
    Ok(())
}

/// A copy of `binary` without debug information (the test binaries are tens of MB otherwise).
fn strip_copy(binary: &Path, dir: &Path) -> Option<PathBuf> {
    let target = dir.join(binary.file_name()?);
    let status = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&target)
        .arg(binary)
        .status()
        .ok()?;
    status.success().then_some(target)
}

/// Absolute paths of the shared libraries (and the dynamic loader) `binary` needs.
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let output = Command::new("ldd").arg(binary).output().context("running ldd")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        // "not a dynamic executable": a static binary needs nothing.
        return Ok(Vec::new());
    }
    Ok(text
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// What the VM runs, the same for every kernel.
pub struct Contents<'a> {
    pub agent: &'a Path,
    /// `(name, path)` of the test binaries.
    pub tests: &'a [(String, PathBuf)],
}

/// Writes the gzipped initramfs for `kernel`, whose `/init` runs `backends`, to `out`.
pub fn build(
    vm_dir: &Path,
    kernel: &Kernel,
    backends: &[&str],
    contents: &Contents,
    out: &Path,
) -> anyhow::Result<()> {
    let Contents { agent, tests } = *contents;
    let strip_dir = vm_dir.join("stripped");
    fs::create_dir_all(&strip_dir)?;
    let mut archive = Archive::default();
    for dir in [
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "root",
        "etc",
        "sys/fs/bpf",
        "sys/fs/cgroup",
        "sys/kernel/tracing",
    ] {
        archive.add(dir, Member::Dir);
    }
    archive.add("dev/console", Member::CharDev { major: 5, minor: 1 });
    archive.add("dev/null", Member::CharDev { major: 1, minor: 3 });

    // iproute2's `ip` (the tests use `ip netns`, which busybox's ip lacks), before the
    // busybox applets so that its name is not taken by a busybox link.
    add_program(
        &mut archive,
        "usr/bin/ip",
        &which("ip", &["/usr/bin/ip", "/bin/ip", "/sbin/ip"])?,
        None,
    )?;
    // iproute2's `ss`: the TIME_WAIT test compares the agent's count with it.
    add_program(
        &mut archive,
        "usr/bin/ss",
        &which("ss", &["/usr/bin/ss", "/bin/ss", "/sbin/ss"])?,
        None,
    )?;
    add_program(&mut archive, "bin/connscope", agent, Some(&strip_dir))?;
    for (name, path) in tests {
        add_program(&mut archive, &format!("tests/{name}"), path, Some(&strip_dir))?;
    }

    // Python for the tests that run a client in another process (kernel_pods): the
    // interpreter, its libraries and its standard library without tests and tools.
    if let Ok(python) = fs::canonicalize("/usr/bin/python3") {
        add_program(&mut archive, "usr/bin/python3", &python, None)?;
        if let Some(name) = python.file_name().map(|n| n.to_string_lossy().into_owned()) {
            add_tree(&mut archive, &Path::new("/usr/lib").join(&name), PYTHON_SKIP)?;
        }
    }

    let busybox = which("busybox", &["/bin/busybox", "/usr/bin/busybox"])?;
    if !shared_libraries(&busybox)?.is_empty() {
        bail!("{} is not static: install busybox-static", busybox.display());
    }
    archive.add_host_file("bin/busybox", &busybox)?;
    let applets =
        Command::new(&busybox).arg("--list-full").output().context("listing busybox applets")?;
    for applet in String::from_utf8_lossy(&applets.stdout).lines() {
        let name = applet.rsplit('/').next().unwrap_or(applet);
        if applet.is_empty() || name == "busybox" || ["ip", "init", "linuxrc"].contains(&name) {
            continue;
        }
        // Every applet goes to /bin (PATH has /usr/bin, where real programs live, first).
        let path = format!("bin/{name}");
        if !archive.contains(&path) {
            archive.add(&path, Member::Symlink("busybox".to_owned()));
        }
    }
    for module in MODULES {
        if let Some(data) = module_file(&kernel.modules.join(module))? {
            let name = Path::new(module)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            archive.add(&format!("lib/modules/{name}"), Member::File { data, mode: 0o644 });
        }
    }
    archive.add(
        "etc/passwd",
        Member::File { data: b"root:x:0:0:root:/root:/bin/sh\n".to_vec(), mode: 0o644 },
    );
    archive.add("etc/group", Member::File { data: b"root:x:0:\n".to_vec(), mode: 0o644 });
    archive.add(
        "etc/hosts",
        Member::File { data: b"127.0.0.1 localhost\n::1 localhost\n".to_vec(), mode: 0o644 },
    );
    archive.add(
        "init",
        Member::File {
            data: init_script(if kvm_usable() { "kvm" } else { "tcg" }, backends).into_bytes(),
            mode: 0o755,
        },
    );

    let tmp = out.with_extension("tmp");
    let file = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut gzip = Command::new("gzip")
        .arg("-1")
        .stdin(Stdio::piped())
        .stdout(file)
        .spawn()
        .context("running gzip")?;
    let mut stdin = gzip.stdin.take().context("gzip stdin")?;
    archive.write_newc(&mut std::io::BufWriter::new(&mut stdin))?;
    drop(stdin);
    if !gzip.wait()?.success() {
        bail!("gzip failed");
    }
    fs::rename(&tmp, out)?;
    Ok(())
}

/// A kernel module's bytes, uncompressed (busybox's insmod reads plain `.ko` files; newer
/// Debian kernels ship `.ko.xz`). `None` when the kernel has it built in.
fn module_file(plain: &Path) -> anyhow::Result<Option<Vec<u8>>> {
    if plain.exists() {
        return Ok(Some(fs::read(plain)?));
    }
    let compressed = plain.with_extension("ko.xz");
    if !compressed.exists() {
        return Ok(None);
    }
    let output = Command::new("xz")
        .arg("-dc")
        .arg(&compressed)
        .output()
        .context("running xz (apt: xz-utils)")?;
    if !output.status.success() {
        bail!("xz -dc {} failed: {}", compressed.display(), output.status);
    }
    Ok(Some(output.stdout))
}

/// Parts of Python's standard library the tests never import.
const PYTHON_SKIP: &[&str] = &[
    "test",
    "__pycache__",
    "idlelib",
    "ensurepip",
    "tkinter",
    "lib2to3",
    "pydoc_data",
    "site-packages",
    "dist-packages",
    "config-3.11-x86_64-linux-gnu",
];

/// Adds a host directory tree at the same path (regular files and symlinks), minus `skip`.
fn add_tree(archive: &mut Archive, dir: &Path, skip: &[&str]) -> anyhow::Result<()> {
    let Ok(entries) = fs::read_dir(dir) else { return Ok(()) };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if skip.contains(&name.as_str()) || name.starts_with("config-") {
            continue;
        }
        let path = entry.path();
        let file_type = entry.file_type()?;
        let archive_path = path.to_string_lossy().into_owned();
        if file_type.is_dir() {
            archive.add(&archive_path, Member::Dir);
            add_tree(archive, &path, skip)?;
        } else if file_type.is_symlink() {
            let target = fs::read_link(&path)?.to_string_lossy().into_owned();
            archive.add(&archive_path, Member::Symlink(target));
        } else if file_type.is_file() {
            archive.add_host_file(&archive_path, &path)?;
        }
    }
    Ok(())
}

fn which(program: &str, candidates: &[&str]) -> anyhow::Result<PathBuf> {
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .with_context(|| format!("{program} not found (looked in {candidates:?})"))
}
