//! The initramfs archive: members by path, written in the kernel's `newc` cpio format.

use std::{collections::BTreeSet, fs, io::Write, os::unix::fs::MetadataExt as _, path::Path};

use anyhow::Context as _;

/// One member of the archive.
pub enum Member {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    Symlink(String),
    CharDev { major: u32, minor: u32 },
}

/// The archive's members by path (parents are added automatically, in order).
#[derive(Default)]
pub struct Archive {
    members: Vec<(String, Member)>,
    paths: BTreeSet<String>,
}

impl Archive {
    pub fn add(&mut self, path: &str, member: Member) {
        let path = path.trim_start_matches('/').to_owned();
        let mut parent = String::new();
        for part in path.split('/').collect::<Vec<_>>().iter().rev().skip(1).rev() {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            if self.paths.insert(parent.clone()) {
                self.members.push((parent.clone(), Member::Dir));
            }
        }
        if self.paths.insert(path.clone()) {
            self.members.push((path, member));
        }
    }

    pub fn contains(&self, path: &str) -> bool {
        self.paths.contains(path.trim_start_matches('/'))
    }

    /// Copies a host file (following symlinks), keeping its permission bits.
    pub fn add_host_file(&mut self, archive_path: &str, host: &Path) -> anyhow::Result<()> {
        let data = fs::read(host).with_context(|| format!("reading {}", host.display()))?;
        let mode = fs::metadata(host)?.mode() & 0o7777;
        self.add(archive_path, Member::File { data, mode });
        Ok(())
    }

    /// Writes the archive in the `newc` format into `out`.
    pub fn write_newc(&self, out: &mut impl Write) -> anyhow::Result<()> {
        for (ino, (path, member)) in (1u32..).zip(&self.members) {
            let (mode, data, rdev): (u32, &[u8], (u32, u32)) = match member {
                Member::Dir => (0o040_755, &[], (0, 0)),
                Member::File { data, mode } => (0o100_000 | mode, data, (0, 0)),
                Member::Symlink(target) => (0o120_777, target.as_bytes(), (0, 0)),
                Member::CharDev { major, minor } => (0o020_600, &[], (*major, *minor)),
            };
            write_newc_entry(out, ino, mode, path, data, rdev)?;
        }
        write_newc_entry(out, 0, 0, "TRAILER!!!", &[], (0, 0))
    }
}

fn write_newc_entry(
    out: &mut impl Write,
    ino: u32,
    mode: u32,
    name: &str,
    data: &[u8],
    (rdev_major, rdev_minor): (u32, u32),
) -> anyhow::Result<()> {
    let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
    let fields = [
        ino,
        mode,
        0,
        0,
        nlink,
        0,
        data.len() as u32,
        0,
        0,
        rdev_major,
        rdev_minor,
        name.len() as u32 + 1,
        0,
    ];
    let mut header = String::from("070701");
    for field in fields {
        header.push_str(&format!("{field:08X}"));
    }
    out.write_all(header.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    out.write_all(&[0; 3][..pad4(header.len() + name.len() + 1)])?;
    out.write_all(data)?;
    out.write_all(&[0; 3][..pad4(data.len())])?;
    Ok(())
}

const fn pad4(len: usize) -> usize {
    (4 - len % 4) % 4
}
