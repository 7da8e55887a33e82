//! The kernel → agent ring buffer, read with the consumer position in the agent's hands.
//!
//! aya's `RingBuf` hands a record's space back to the kernel as soon as the record is read.
//! The crash checkpoint (`pipeline::checkpoint`) needs the opposite order: read and apply a
//! batch, copy its bytes into the pinned journal, and only then let the kernel reuse them.
//! So this reader keeps two positions: where it reads ([`RingReader::next_record`]) and what it
//! gave back ([`RingReader::commit`]). The bytes in between are [`RingReader::uncommitted`],
//! verbatim: record headers, padding and discarded records included, which is also the
//! format the journal is replayed from ([`records_in`]).
//!
//! The layout is the kernel's (`kernel/bpf/ringbuf.c`): a consumer page the reader writes,
//! a producer page, then the data pages mapped twice in a row so that a record wrapping the
//! end reads as one slice.

use std::{
    os::fd::{AsFd as _, AsRawFd, RawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicU64, Ordering, fence},
};

use anyhow::{Context as _, anyhow};
use aya::maps::MapData;

/// A record's header: its length with these flag bits, then a page offset.
const HEADER_BYTES: usize = 8;
const BUSY: u32 = 1 << 31;
const DISCARDED: u32 = 1 << 30;

/// One entry of ring buffer bytes.
enum Entry<'a> {
    /// Reserved, not yet submitted: nothing after it can be read yet.
    Busy,
    /// Skipped: `len` bytes with header and padding.
    Discarded {
        len: usize,
    },
    Record {
        data: &'a [u8],
        len: usize,
    },
}

/// The entry whose header word is `header`, its data from `rest` (what follows the header).
fn entry(header: u32, rest: &[u8]) -> Option<Entry<'_>> {
    if header & BUSY != 0 {
        return Some(Entry::Busy);
    }
    let data_len = (header & !(BUSY | DISCARDED)) as usize;
    let len = (HEADER_BYTES + data_len).next_multiple_of(8);
    if header & DISCARDED != 0 {
        return Some(Entry::Discarded { len });
    }
    Some(Entry::Record { data: rest.get(..data_len)?, len })
}

/// The records in `bytes`, ring buffer bytes as [`RingReader::uncommitted`] returns them
/// (a journal); stops at anything that does not parse.
pub fn records_in(mut bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        loop {
            let header = u32::from_ne_bytes(*bytes.first_chunk::<4>()?);
            match entry(header, bytes.get(HEADER_BYTES..)?)? {
                Entry::Busy => return None,
                Entry::Discarded { len } => bytes = bytes.get(len..)?,
                Entry::Record { data, len } => {
                    bytes = bytes.get(len..).unwrap_or_default();
                    return Some(data);
                }
            }
        }
    })
}

/// A shared mapping of a map's pages, unmapped on drop.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    pub fn new(fd: RawFd, len: usize, prot: i32, offset: usize) -> anyhow::Result<Self> {
        // SAFETY: a fresh mapping of a map's own fd; the kernel checks the length,
        // protection and offset against the map's layout.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, offset as i64)
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mapping a BPF map");
        }
        let ptr = NonNull::new(ptr.cast()).ok_or_else(|| anyhow!("mmap returned null"))?;
        Ok(Self { ptr, len })
    }
}

impl Mapping {
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `len` bytes mapped for as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The mapped bytes, for a writable mapping. Other processes may map them too: the
    /// agent writes only what no reader trusts yet (past the committed length).
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above; `&mut self` makes this the only view from this process.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

// SAFETY: the mappings are plain shared memory; the reader is used by one thread at a time.
unsafe impl Send for Mapping {}

pub struct RingReader {
    map: MapData,
    consumer: Mapping,
    producer: Mapping,
    /// Bytes of data (a power of two).
    size: u64,
    page: usize,
    read_pos: u64,
    committed_pos: u64,
    producer_cache: u64,
}

impl RingReader {
    pub fn new(map: MapData) -> anyhow::Result<Self> {
        let size = u64::from(map.info()?.max_entries());
        anyhow::ensure!(size.is_power_of_two(), "ring buffer of {size} bytes");
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let fd = map.fd().as_fd().as_raw_fd();
        let consumer = Mapping::new(fd, page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer = Mapping::new(fd, page + 2 * size as usize, libc::PROT_READ, page)?;
        let mut reader = Self {
            map,
            consumer,
            producer,
            size,
            page,
            read_pos: 0,
            committed_pos: 0,
            producer_cache: 0,
        };
        reader.committed_pos = reader.consumer_word().load(Ordering::Acquire);
        reader.read_pos = reader.committed_pos;
        reader.producer_cache = reader.producer_word().load(Ordering::Acquire);
        Ok(reader)
    }

    fn consumer_word(&self) -> &AtomicU64 {
        // SAFETY: the consumer page starts with the kernel's `consumer_pos` (an aligned
        // unsigned long), mapped for as long as `self`.
        unsafe { self.consumer.ptr.cast::<AtomicU64>().as_ref() }
    }

    fn producer_word(&self) -> &AtomicU64 {
        // SAFETY: as above, `producer_pos` at the start of the producer page.
        unsafe { self.producer.ptr.cast::<AtomicU64>().as_ref() }
    }

    /// The data pages twice over, from the first.
    fn data(&self) -> &[u8] {
        // SAFETY: the mapping holds one page then `2 * size` bytes of data.
        unsafe {
            std::slice::from_raw_parts(
                self.producer.ptr.as_ptr().add(self.page),
                2 * self.size as usize,
            )
        }
    }

    /// The next record, read but not given back to the kernel.
    pub fn next_record(&mut self) -> Option<&[u8]> {
        loop {
            if self.read_pos == self.producer_cache {
                self.producer_cache = self.producer_word().load(Ordering::Acquire);
                if self.read_pos == self.producer_cache {
                    return None;
                }
            }
            let offset = (self.read_pos & (self.size - 1)) as usize;
            // SAFETY: headers are 8-byte aligned within the data pages; the kernel
            // publishes a header with a release store.
            let header = unsafe {
                self.producer.ptr.as_ptr().add(self.page + offset).cast::<AtomicU32>().as_ref()
            }?
            .load(Ordering::Acquire);
            let (len, data_len) = match entry(header, &self.data()[offset + HEADER_BYTES..])? {
                Entry::Busy => return None,
                Entry::Discarded { len } => (len, None),
                Entry::Record { data, len } => (len, Some(data.len())),
            };
            self.read_pos += len as u64;
            if let Some(data_len) = data_len {
                let start = offset + HEADER_BYTES;
                return Some(&self.data()[start..start + data_len]);
            }
        }
    }

    /// The bytes read since the last commit, as the ring holds them.
    pub fn uncommitted(&self) -> &[u8] {
        let offset = (self.committed_pos & (self.size - 1)) as usize;
        let len = (self.read_pos - self.committed_pos) as usize;
        &self.data()[offset..offset + len]
    }

    /// Where the next read starts.
    pub fn position(&self) -> u64 {
        self.read_pos
    }

    /// Gives what was read back to the kernel. Then whether more is waiting: a record
    /// submitted while the agent held the ring woke nobody (the kernel wakes the reader only
    /// for a record at the consumer position).
    pub fn commit(&mut self) -> bool {
        if self.committed_pos != self.read_pos {
            self.consumer_word().store(self.read_pos, Ordering::Release);
            self.committed_pos = self.read_pos;
        }
        fence(Ordering::SeqCst);
        self.producer_cache = self.producer_word().load(Ordering::Acquire);
        self.producer_cache != self.read_pos
    }

    /// Skips to `pos` (records a crashed agent journaled but did not give back). Refused
    /// unless `pos` lies between what is read and what was produced.
    pub fn skip_to(&mut self, pos: u64) -> anyhow::Result<()> {
        let produced = self.producer_word().load(Ordering::Acquire);
        anyhow::ensure!(
            self.read_pos <= pos && pos <= produced && pos - self.read_pos <= self.size,
            "position {pos} is not between the ring buffer's {} and {produced}",
            self.read_pos
        );
        self.read_pos = pos;
        self.commit();
        Ok(())
    }
}

impl AsRawFd for RingReader {
    fn as_raw_fd(&self) -> RawFd {
        self.map.fd().as_fd().as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(bytes: &mut Vec<u8>, header: u32, data: &[u8]) {
        bytes.extend_from_slice(&header.to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes());
        bytes.extend_from_slice(data);
        bytes.resize(bytes.len().next_multiple_of(8), 0);
    }

    #[test]
    fn journal_bytes_give_back_their_records_skipping_discarded_ones() {
        let mut bytes = Vec::new();
        put(&mut bytes, 3, b"one");
        put(&mut bytes, 5 | DISCARDED, b"skip!");
        put(&mut bytes, 8, b"twotwo!!");
        let records: Vec<&[u8]> = records_in(&bytes).collect();
        assert_eq!(records, [&b"one"[..], b"twotwo!!"]);
    }

    #[test]
    fn a_truncated_or_busy_tail_ends_the_records() {
        let mut bytes = Vec::new();
        put(&mut bytes, 3, b"one");
        put(&mut bytes, 4 | BUSY, b"busy");
        assert_eq!(records_in(&bytes).count(), 1);
        let mut cut = Vec::new();
        put(&mut cut, 3, b"one");
        cut.extend_from_slice(&64u32.to_ne_bytes());
        cut.extend_from_slice(&[0; 12]);
        assert_eq!(records_in(&cut).count(), 1);
    }
}
