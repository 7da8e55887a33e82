//! One process per network namespace under `/proc`: the files of `/proc/<pid>/net/` show
//! that process's network namespace whoever reads them, so reading them for one process of
//! each namespace covers every namespace that has a process in it, with no `setns`. Used by
//! the start-up scan of listening ports (`adoption`) and the listen queue counters
//! (`listen_queues`). A namespace no process is in (only bind-mounted, as `ip netns add`
//! leaves it) is not seen.

use std::{collections::HashSet, io, path::Path};

/// Why an entry of `/proc` could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unusable {
    /// The process exited between listing and reading.
    ProcessVanished,
    /// A file could not be read (permissions, a kernel refusing).
    Unreadable,
    /// A namespace link that does not parse.
    Unparsable,
}

/// What is read from one process of each namespace.
pub trait PerNamespace {
    /// Reads the namespace `netns` through `process_dir` (`/proc/<pid>`). An error leaves
    /// the namespace to its next process, so a read must count nothing until it succeeds.
    fn read(&mut self, netns: u32, process_dir: &Path) -> io::Result<()>;
    /// An entry that could not be used, or a read that failed.
    fn unusable(&mut self, why: Unusable);
}

/// Reads every network namespace that has a process under `proc_root` (normally `/proc`)
/// once, through the first of its processes whose read succeeds; returns how many were read.
pub fn visit(proc_root: &Path, visitor: &mut impl PerNamespace) -> usize {
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        visitor.unusable(Unusable::Unreadable);
        return 0;
    };
    let mut done = HashSet::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_str().is_some_and(|pid| pid.bytes().all(|b| b.is_ascii_digit())) {
            continue;
        }
        let dir = entry.path();
        let netns = match of_process(&dir) {
            Ok(Some(inode)) => inode,
            Ok(None) => {
                visitor.unusable(Unusable::Unparsable);
                continue;
            }
            Err(err) => {
                visitor.unusable(classify(&err, &dir));
                continue;
            }
        };
        if done.contains(&netns) {
            continue;
        }
        match visitor.read(netns, &dir) {
            Ok(()) => {
                done.insert(netns);
            }
            Err(err) => visitor.unusable(classify(&err, &dir)),
        }
    }
    done.len()
}

/// The network namespace of the process at `process_dir` (`/proc/<pid>`); `None` when its
/// link does not parse.
pub fn of_process(process_dir: &Path) -> io::Result<Option<u32>> {
    let link = std::fs::read_link(process_dir.join("ns/net"))?;
    Ok(parse_link(&link.to_string_lossy()))
}

/// What a failed read of `process_dir`'s files means.
pub fn classify(err: &io::Error, process_dir: &Path) -> Unusable {
    // ESRCH: the process is exiting; ENOENT once it is gone.
    if err.raw_os_error() == Some(libc::ESRCH)
        || (err.kind() == io::ErrorKind::NotFound && !process_dir.exists())
    {
        Unusable::ProcessVanished
    } else {
        Unusable::Unreadable
    }
}

/// `net:[4026531840]` → the namespace's inode number.
fn parse_link(link: &str) -> Option<u32> {
    link.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_process_counts_as_vanished() {
        let err = io::Error::from(io::ErrorKind::NotFound);
        let vanished = Unusable::ProcessVanished;
        assert_eq!(classify(&err, Path::new("/proc/no-such-process")), vanished);
        assert_eq!(classify(&io::Error::from_raw_os_error(libc::ESRCH), Path::new("/")), vanished);
        assert_eq!(
            classify(&io::Error::from_raw_os_error(libc::EACCES), Path::new("/")),
            Unusable::Unreadable
        );
    }

    #[test]
    fn links_parse_or_are_rejected() {
        assert_eq!(parse_link("net:[4026531840]"), Some(4026531840));
        assert_eq!(parse_link("net:[x]"), None);
        assert_eq!(parse_link("mnt:[1]"), None);
    }
}
