//! Batched hash map updates and deletes (`BPF_MAP_UPDATE_BATCH`, `BPF_MAP_DELETE_BATCH`,
//! Linux 5.6): one syscall for many entries. aya has no batch calls; a checkpoint base
//! writes up to one entry per live connection, and one syscall each made a base of
//! 100,000 connections cost more than half a second.

use std::os::fd::RawFd;

use aya::Pod;

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Entries per syscall: bounds the kernel's copy of keys and values per call.
const PER_CALL: usize = 4096;

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn call(command: libc::c_long, attr: &mut BatchAttr) -> std::io::Result<()> {
    // SAFETY: `attr` is a valid `bpf_attr` prefix of the size passed; the pointers in it
    // name `count` keys (and values) the caller keeps alive across the call.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            std::ptr::from_mut(attr),
            size_of::<BatchAttr>() as u32,
        )
    };
    if result < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// Writes `entries` (key, value) into the hash map `map_fd`.
pub fn update<K: Pod, V: Pod>(map_fd: RawFd, entries: &[(K, V)]) -> std::io::Result<()> {
    let mut keys = Vec::with_capacity(PER_CALL.min(entries.len()));
    let mut values = Vec::with_capacity(keys.capacity());
    for part in entries.chunks(PER_CALL) {
        keys.clear();
        values.clear();
        for (key, value) in part {
            keys.push(*key);
            values.push(*value);
        }
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: part.len() as u32,
            map_fd: map_fd as u32,
            ..BatchAttr::default()
        };
        call(BPF_MAP_UPDATE_BATCH, &mut attr)?;
    }
    Ok(())
}

/// Deletes `keys` from the hash map `map_fd`; keys already gone are no error.
pub fn delete<K: Pod>(map_fd: RawFd, keys: &[K]) -> std::io::Result<()> {
    for part in keys.chunks(PER_CALL) {
        let mut rest = part;
        while !rest.is_empty() {
            let mut attr = BatchAttr {
                keys: rest.as_ptr() as u64,
                count: rest.len() as u32,
                map_fd: map_fd as u32,
                ..BatchAttr::default()
            };
            match call(BPF_MAP_DELETE_BATCH, &mut attr) {
                Ok(()) => break,
                // The batch stops at a missing key (`count`: those deleted before it).
                Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {
                    rest = rest.get(attr.count as usize + 1..).unwrap_or_default();
                }
                Err(err) => return Err(err),
            }
        }
    }
    Ok(())
}
