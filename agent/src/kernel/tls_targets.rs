//! Where libssl lives on this host: the files the TLS uprobes attach to.
//!
//! A uprobe is set on a file (its inode), for every process that maps it, including
//! processes started later. So the agent needs each distinct file once: the system's
//! `libssl.so.*` (found in the library directories even before any process loads it), the
//! `libssl.so.*` copies running processes map (containers, bundled copies), and executables
//! that export `SSL_write` themselves (OpenSSL linked statically, its symbols exported).
//! Files are told apart by device and inode, as `/proc/<pid>/maps` shows them.

use std::{
    collections::HashSet,
    fs,
    path::{Path, PathBuf},
};

use object::{Object as _, ObjectSymbol as _};

/// One file to attach to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// A path that opens the file from the agent's mount namespace (a process's files are
    /// reached through `/proc/<pid>/root`).
    pub path: PathBuf,
    /// The path as the process sees it (for logs and `/`).
    pub shown: String,
    pub id: FileId,
}

/// `(device, inode)` of a file.
pub type FileId = (u64, u64);

/// The symbol every target must export.
pub const REQUIRED_SYMBOL: &str = "SSL_write";

/// Library directories searched for the system's libssl.
const LIBRARY_DIRS: [&str; 6] =
    ["/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib", "/usr/local/lib64"];

/// Whether a file name is a versioned libssl (`libssl.so.3`, `libssl.so.1.1`).
pub fn is_libssl_name(name: &str) -> bool {
    name.strip_prefix("libssl.so.").is_some_and(|version| {
        !version.is_empty() && version.split('.').all(|part| part.parse::<u32>().is_ok())
    })
}

/// The system's libssl files: in the library directories and their multiarch
/// subdirectories (`/usr/lib/x86_64-linux-gnu`), symlinks resolved and duplicates removed.
pub fn system_libraries() -> Vec<Target> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for dir in LIBRARY_DIRS {
        let dir = Path::new(dir);
        dirs.push(dir.to_path_buf());
        let Ok(entries) = fs::read_dir(dir) else { continue };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().ends_with("-linux-gnu") {
                dirs.push(entry.path());
            }
        }
    }
    let mut seen = HashSet::new();
    let mut targets = Vec::new();
    for dir in dirs {
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            if !is_libssl_name(&entry.file_name().to_string_lossy()) {
                continue;
            }
            let Ok(path) = fs::canonicalize(entry.path()) else { continue };
            let Some(id) = file_id(&path) else { continue };
            if seen.insert(id) {
                let shown = path.display().to_string();
                targets.push(Target { path, shown, id });
            }
        }
    }
    targets
}

/// The ids of the processes running now (the numeric entries of `/proc`).
pub fn process_ids() -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str().and_then(|name| name.parse().ok()))
        .collect()
}

/// The device and inode of the file at `path` (following symlinks, as `/proc/<pid>/exe`).
pub fn file_id(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt as _;
    let metadata = fs::metadata(path).ok()?;
    metadata.is_file().then(|| (metadata.dev(), metadata.ino()))
}

/// An executable mapping of `/proc/<pid>/maps`: the file's id and path.
#[derive(Debug, PartialEq, Eq)]
pub struct Mapping<'a> {
    pub id: FileId,
    pub path: &'a str,
}

/// Parses one line of `/proc/<pid>/maps` (`start-end perms offset major:minor inode path`);
/// `None` for mappings that are not executable or not backed by a file still present.
pub fn executable_mapping(line: &str) -> Option<Mapping<'_>> {
    let mut fields = line.splitn(6, ' ');
    let (_range, perms, _offset, dev, inode) =
        (fields.next()?, fields.next()?, fields.next()?, fields.next()?, fields.next()?);
    let path = fields.next()?.trim_start();
    if perms.as_bytes().get(2) != Some(&b'x') || !path.starts_with('/') {
        return None;
    }
    if path.ends_with(" (deleted)") {
        return None;
    }
    let (major, minor) = dev.split_once(':')?;
    let (major, minor) =
        (u64::from_str_radix(major, 16).ok()?, u64::from_str_radix(minor, 16).ok()?);
    let inode: u64 = inode.parse().ok()?;
    if inode == 0 {
        return None;
    }
    Some(Mapping { id: (libc::makedev(major as u32, minor as u32), inode), path })
}

/// Candidates among a process's executable mappings: its libssl files, and its main
/// executable (file `exe`), which may carry OpenSSL itself. Files in `known` are skipped.
pub fn candidates(
    pid: u32,
    maps: &str,
    exe: Option<FileId>,
    known: &HashSet<FileId>,
) -> Vec<Target> {
    let mut found = Vec::new();
    for mapping in maps.lines().filter_map(executable_mapping) {
        let is_exe = exe == Some(mapping.id);
        let name = mapping.path.rsplit('/').next().unwrap_or_default();
        if !(is_exe || is_libssl_name(name)) || known.contains(&mapping.id) {
            continue;
        }
        if found.iter().any(|target: &Target| target.id == mapping.id) {
            continue;
        }
        found.push(Target {
            path: PathBuf::from(format!("/proc/{pid}/root{}", mapping.path)),
            shown: mapping.path.to_owned(),
            id: mapping.id,
        });
    }
    found
}

/// Whether the ELF file at `path` exports `symbol` (defines it in its dynamic symbol
/// table). Reads only the headers and the dynamic symbols, through a read cache: the static
/// symbol table of a large binary with debug information would cost seconds.
pub fn exports(path: &Path, symbol: &str) -> bool {
    let Ok(file) = fs::File::open(path) else { return false };
    let cache = object::read::ReadCache::new(file);
    let Ok(elf) = object::File::parse(&cache) else { return false };
    elf.dynamic_symbols().any(|s| s.is_definition() && s.name() == Ok(symbol))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libssl_names() {
        assert!(is_libssl_name("libssl.so.3"));
        assert!(is_libssl_name("libssl.so.1.1"));
        assert!(!is_libssl_name("libssl.so"));
        assert!(!is_libssl_name("libssl.so.3.bak"));
        assert!(!is_libssl_name("libssl3.so"));
    }

    #[test]
    fn maps_lines() {
        let line = "7f1c2a000000-7f1c2a0a0000 r-xp 00020000 fd:01 1837261                    /usr/lib/x86_64-linux-gnu/libssl.so.3";
        let mapping = executable_mapping(line);
        assert_eq!(
            mapping,
            Some(Mapping {
                id: (libc::makedev(0xfd, 1), 1837261),
                path: "/usr/lib/x86_64-linux-gnu/libssl.so.3"
            })
        );
        assert_eq!(executable_mapping("7f-80 r--p 00000000 fd:01 12 /usr/lib/libssl.so.3"), None);
        assert_eq!(executable_mapping("7f-80 r-xp 00000000 00:00 0 [vdso]"), None);
        assert_eq!(executable_mapping("7f-80 r-xp 00000000 fd:01 12 /tmp/x (deleted)"), None);
        assert_eq!(executable_mapping("garbage"), None);
        assert_eq!(executable_mapping("7f-80 r-xp 0 zz:01 12 /lib/libssl.so.3"), None);
    }

    #[test]
    fn candidates_are_the_executable_and_libssl_once() {
        let maps = "\
1-2 r-xp 0 fd:01 10 /usr/sbin/nginx
3-4 r-xp 0 fd:01 11 /usr/lib/x86_64-linux-gnu/libc.so.6
5-6 r-xp 0 fd:01 12 /usr/lib/x86_64-linux-gnu/libssl.so.3
7-8 r-xp 0 fd:01 12 /usr/lib/x86_64-linux-gnu/libssl.so.3
";
        let exe = Some((libc::makedev(0xfd, 1), 10));
        let found = candidates(42, maps, exe, &HashSet::new());
        let shown: Vec<&str> = found.iter().map(|t| t.shown.as_str()).collect();
        assert_eq!(shown, ["/usr/sbin/nginx", "/usr/lib/x86_64-linux-gnu/libssl.so.3"]);
        assert_eq!(found[1].path, Path::new("/proc/42/root/usr/lib/x86_64-linux-gnu/libssl.so.3"));
        let known: HashSet<FileId> = found.iter().map(|t| t.id).collect();
        assert!(candidates(42, maps, exe, &known).is_empty());
        assert_eq!(candidates(42, maps, None, &HashSet::new()).len(), 1);
    }

    #[test]
    fn libssl_exports_ssl_write_and_libc_does_not() {
        let libssl = system_libraries()
            .into_iter()
            .next()
            .expect("a libssl.so.* in the library directories (Debian package libssl3)");
        assert!(exports(&libssl.path, REQUIRED_SYMBOL), "{libssl:?}");
        let exe = std::env::current_exe().unwrap();
        assert!(!exports(&exe, REQUIRED_SYMBOL));
        assert!(!exports(Path::new("/nonexistent"), REQUIRED_SYMBOL));
    }
}
