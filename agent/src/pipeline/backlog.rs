//! The pinned ring buffer, drained from the first moment of a restart.
//!
//! While no agent runs, the pinned programs keep writing records into the pinned `EVENTS`
//! ring buffer, which holds about a second of a busy host's records. A starting agent
//! spends longer than that loading and verifying its programs, reading BTF and scanning
//! listening ports. So when the previous agent handed over cleanly (it drained the ring for
//! the last time before it wrote the handover, and reads it no more), [`StartupDrain`] opens
//! the pinned ring buffer before any of that and a thread copies its records into a
//! [`Backlog`] in memory. Once the pipeline has restored the handover it applies the
//! backlog in order and carries on with the same ring buffer reader.
//!
//! The backlog is bounded ([`BACKLOG_RINGBUF_MULTIPLE`] times `--bpf.ringbuf-bytes`, 64 MiB
//! with the default 4 MiB); a record that does not fit is dropped and counted as
//! `events_lost_total{reason="startup_backlog_full"}`.

use std::{
    os::fd::AsRawFd as _,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use anyhow::{Context as _, anyhow};
use aya::maps::{HashMap, Map, MapData};
use connscope_common::{Handover, names::map};

use crate::pipeline::{checkpoint, handover, ring_reader::RingReader};

/// The backlog may hold this many times the ring buffer's size.
pub const BACKLOG_RINGBUF_MULTIPLE: usize = 16;
/// How long the drain thread sleeps when the ring is empty: the kernel wakes a reader only
/// once enough is queued (`agent-ebpf/src/maps.rs`), so it also looks on this timer.
const POLL_MS: i32 = 5;
/// Records read between two looks at the stop flag (the ring may never be empty on a busy
/// host).
const BATCH: usize = 4096;
/// Each record is stored behind its length.
const LEN_PREFIX: usize = size_of::<u32>();

/// Raw ring buffer records in arrival order, in one growing buffer (no allocation per
/// record once it has grown), bounded by `limit` bytes.
#[derive(Debug)]
pub struct Backlog {
    bytes: Vec<u8>,
    limit: usize,
    records: u64,
    dropped: u64,
}

impl Backlog {
    pub fn with_limit(limit: usize) -> Self {
        Self { bytes: Vec::new(), limit, records: 0, dropped: 0 }
    }

    /// Keeps `record`; false (and counted as dropped) when it would exceed the limit.
    pub fn push(&mut self, record: &[u8]) -> bool {
        let needed = LEN_PREFIX + record.len();
        let Ok(len) = u32::try_from(record.len()) else {
            self.dropped += 1;
            return false;
        };
        if self.bytes.len() + needed > self.limit {
            self.dropped += 1;
            return false;
        }
        self.bytes.extend_from_slice(&len.to_ne_bytes());
        self.bytes.extend_from_slice(record);
        self.records += 1;
        true
    }

    /// Records kept.
    pub fn len(&self) -> u64 {
        self.records
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Records that did not fit.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Bytes held (records and their lengths).
    pub fn bytes(&self) -> usize {
        self.bytes.len()
    }

    /// The records kept, oldest first.
    pub fn records(&self) -> impl Iterator<Item = &[u8]> {
        let mut rest = self.bytes.as_slice();
        std::iter::from_fn(move || {
            let (len, tail) = rest.split_first_chunk::<LEN_PREFIX>()?;
            let len = u32::from_ne_bytes(*len) as usize;
            let record = tail.get(..len)?;
            rest = &tail[len..];
            Some(record)
        })
    }
}

/// A thread copying the pinned ring buffer into a [`Backlog`] while the agent starts.
/// Dropped without [`Self::finish`] (start-up failed), it stops and says how many records
/// it read: the next agent will not see them.
pub struct StartupDrain {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<(RingReader, Backlog)>>,
}

/// What the drain held when it was stopped: the ring buffer to read on from, and the
/// records read so far.
pub struct Drained {
    pub ring: RingReader,
    pub backlog: Backlog,
}

impl StartupDrain {
    /// Starts draining `<pin_dir>/maps/EVENTS`, which the previous agent no longer reads
    /// (it exited: `pin_owner`): after its handover, or after a crash from the position its
    /// checkpoint covers up to (`checkpoint::resume_position`). `None` after a crash
    /// without a usable checkpoint: the ring is then read once the pipeline is ready. The
    /// caller has checked that the pinned layout is this build's.
    pub fn start(pin_dir: &Path, ringbuf_bytes: u32) -> anyhow::Result<Option<Self>> {
        let maps = pin_dir.join("maps");
        let skip_to = if handed_over(&maps.join(map::HANDOVER))? {
            None
        } else {
            match checkpoint::resume_position(pin_dir) {
                Some(position) => Some(position),
                None => {
                    tracing::info!(
                        "neither a handover nor a checkpoint from the previous agent: the \
                         pinned ring buffer is read once this agent is ready"
                    );
                    return Ok(None);
                }
            }
        };
        let events = MapData::from_pin(maps.join(map::EVENTS))
            .with_context(|| format!("opening the pinned {} ring buffer", map::EVENTS))?;
        let mut ring = RingReader::new(events)?;
        if let Some(position) = skip_to {
            ring.skip_to(position).context("skipping what the checkpoint's journal holds")?;
        }
        let limit = ringbuf_bytes as usize * BACKLOG_RINGBUF_MULTIPLE;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("startup-drain".into())
            .spawn(move || {
                let mut backlog = Backlog::with_limit(limit);
                loop {
                    let mut read = 0;
                    while read < BATCH
                        && let Some(record) = ring.next_record()
                    {
                        backlog.push(record);
                        read += 1;
                    }
                    // Held in memory from here: a start-up that fails loses them (logged).
                    ring.commit();
                    // What is left in the ring is read next by the pipeline, after the
                    // backlog: stopping between two batches keeps the order.
                    if stopping.load(Ordering::Acquire) {
                        return (ring, backlog);
                    }
                    if read < BATCH {
                        wait_readable(&ring);
                    }
                }
            })
            .context("starting the ring buffer drain thread")?;
        Ok(Some(Self { stop, thread: Some(thread) }))
    }

    /// Stops the thread; what it did not read stays in the ring, for the pipeline.
    pub fn finish(mut self) -> anyhow::Result<Drained> {
        let (ring, backlog) = self.stop_thread()?;
        Ok(Drained { ring, backlog })
    }

    fn stop_thread(&mut self) -> anyhow::Result<(RingReader, Backlog)> {
        self.stop.store(true, Ordering::Release);
        let thread = self.thread.take().ok_or_else(|| anyhow!("the drain was stopped already"))?;
        thread.join().map_err(|_| anyhow!("the ring buffer drain thread panicked"))
    }
}

impl Drop for StartupDrain {
    fn drop(&mut self) {
        if self.thread.is_none() {
            return;
        }
        if let Ok((_, backlog)) = self.stop_thread() {
            tracing::warn!(
                records = backlog.len(),
                "start-up failed: the records read from the pinned ring buffer are lost"
            );
        }
    }
}

/// Whether the pinned handover has its header: the agent that wrote it drained the ring
/// for the last time before writing it.
fn handed_over(path: &Path) -> anyhow::Result<bool> {
    if !path.exists() {
        return Ok(false);
    }
    let data = MapData::from_pin(path)
        .with_context(|| format!("opening the pinned {} map", map::HANDOVER))?;
    let map: HashMap<MapData, u64, Handover> = HashMap::try_from(Map::from_map_data(data)?)?;
    Ok(handover::has_header(&map))
}

/// Sleeps until the ring has records or [`POLL_MS`] passed.
fn wait_readable(ring: &RingReader) {
    let mut fd = libc::pollfd { fd: ring.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd; the ring buffer keeps its descriptor open.
    unsafe { libc::poll(&mut fd, 1, POLL_MS) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_come_back_in_order_and_whole() {
        let mut backlog = Backlog::with_limit(1 << 10);
        let records: [&[u8]; 4] = [b"open", b"", b"head bytes", &[7; 88]];
        for record in records {
            assert!(backlog.push(record));
        }
        assert_eq!(backlog.records().collect::<Vec<_>>(), records);
        assert_eq!((backlog.len(), backlog.dropped()), (4, 0));
        assert_eq!(backlog.bytes(), 4 * LEN_PREFIX + 4 + 10 + 88);
    }

    #[test]
    fn the_limit_holds_and_each_record_over_it_is_counted() {
        // Room for exactly two 12-byte records with their lengths.
        let mut backlog = Backlog::with_limit(2 * (LEN_PREFIX + 12));
        assert!(backlog.push(&[1; 12]));
        assert!(backlog.push(&[2; 12]));
        assert!(!backlog.push(&[3; 12]));
        assert!(!backlog.push(&[4; 1]));
        assert!(backlog.bytes() <= 2 * (LEN_PREFIX + 12));
        assert_eq!((backlog.len(), backlog.dropped()), (2, 2));
        let kept: Vec<u8> = backlog.records().map(|r| r[0]).collect();
        assert_eq!(kept, [1, 2]);
    }

    #[test]
    fn a_record_larger_than_the_whole_limit_is_dropped_not_split() {
        let mut backlog = Backlog::with_limit(16);
        assert!(!backlog.push(&[0; 64]));
        assert!(backlog.is_empty());
        assert_eq!(backlog.records().count(), 0);
        assert_eq!(backlog.dropped(), 1);
    }
}
