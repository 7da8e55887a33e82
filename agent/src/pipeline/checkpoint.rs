//! The crash checkpoint: what a killed agent's successor recovers from when no handover
//! was written (`connscope_common::checkpoint` has the pinned layout).
//!
//! A checkpoint taken on a timer alone cannot be exact: a connection that closes after it
//! has its kernel entry deleted and its `Close` record consumed. So the checkpoint is tied
//! to the records it covers, as a write-ahead log is:
//! - after each drain batch, the batch's ring buffer bytes are appended to the pinned
//!   journal and the commit word is advanced, and only then does the kernel get that space
//!   back (`ring_reader`);
//! - a base (the metric values, as the graceful carry encodes them, and the live
//!   connections, as the handover writes them) is written into the slot not in use, and
//!   the commit word then names it with an empty journal.
//!
//! Recovery applies the named base, the journal's records, then the ring buffer from the
//! position after them: each record once, and the counters go on without a reset.
//!
//! Cost: the journal is an array mapped into the agent's memory: a batch costs a copy of
//! its bytes and one map update (the commit word). A
//! base costs the carry's encode (about 42 ms at the label caps) and a map update per live
//! connection; it is written every [`BASE_INTERVAL`], or when the journal is half full,
//! while bases have spent no more than `--checkpoint.budget` of a CPU (kept over
//! [`BUDGET_WINDOW`]: a single costly base may take the window's share at once).
//! When the journal fills before the budget allows a base, the agent stops covering
//! (`connscope_checkpoint_covered` 0) until the next base: a crash then loses what it lost
//! without a checkpoint, and never counts a record twice.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::maps::{Array, HashMap, IterableMap as _, Map, MapData};
use connscope_common::{
    CarriedChunk, CheckpointSlot, Handover, PinSlot,
    checkpoint::{
        CHECKPOINT_SLOTS, Commit, JOURNAL_CHUNK_BYTES, connection_key, connection_of, metrics_key,
    },
    names::map,
};
use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};

use crate::{
    exposition::{carry, metrics},
    model::{clock::monotonic_ns, metric_table},
    pipeline::{handover, map_batch, ring_reader::Mapping, table::ConnectionTable},
};

/// A base at least this often while the budget allows.
pub const BASE_INTERVAL: Duration = Duration::from_secs(60);
/// The budget is kept over this window: bases may spend `budget` times it at once (a
/// costly base after start-up, say), and no more than `budget` of a CPU over time.
const BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// The checkpoint's pinned maps, opened by path (the programs never touch them).
pub struct CheckpointMaps {
    slots: Array<MapData, CheckpointSlot>,
    conns: HashMap<MapData, u64, Handover>,
    metrics: HashMap<MapData, u32, CarriedChunk>,
    /// The `JOURNAL` array's memory, mapped.
    journal: Mapping,
    _journal_map: MapData,
    pin_state: Array<MapData, u64>,
}

fn open<T: TryFrom<Map, Error = aya::maps::MapError>>(
    maps: &Path,
    name: &str,
) -> anyhow::Result<T> {
    let data = MapData::from_pin(maps.join(name))
        .with_context(|| format!("opening the pinned {name} map"))?;
    Ok(T::try_from(Map::from_map_data(data)?)?)
}

impl CheckpointMaps {
    pub fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        let maps = pin_dir.join("maps");
        let journal_map = MapData::from_pin(maps.join(map::JOURNAL))
            .with_context(|| format!("opening the pinned {} map", map::JOURNAL))?;
        let chunks = journal_map.info()?.max_entries() as usize;
        let fd = journal_map.fd().as_fd().as_raw_fd();
        let journal =
            Mapping::new(fd, chunks * JOURNAL_CHUNK_BYTES, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        Ok(Self {
            slots: open(&maps, map::CHECKPOINT)?,
            conns: open(&maps, map::CHECKPOINT_CONNS)?,
            metrics: open(&maps, map::CHECKPOINT_METRICS)?,
            journal,
            _journal_map: journal_map,
            pin_state: open(&maps, map::PIN_STATE)?,
        })
    }

    fn commit(&mut self, commit: Option<Commit>) -> anyhow::Result<()> {
        let word = commit.map_or(0, Commit::encode);
        self.pin_state.set(PinSlot::Checkpoint as u32, word, 0).context("writing the commit word")
    }

    /// Journal bytes `0..len`.
    fn read_journal(&self, len: usize) -> anyhow::Result<Vec<u8>> {
        let bytes = self.journal.bytes();
        let journal = bytes.get(..len).with_context(|| {
            format!("its journal of {len} bytes is longer than the map's {}", bytes.len())
        })?;
        Ok(journal.to_vec())
    }
}

/// The base a commit word names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Base {
    slot: u32,
    seq: u64,
}

/// What a crashed agent left: its last base and the journal after it.
pub struct Recovered {
    base: Base,
    pub metrics_text: Option<String>,
    pub connections: Vec<(u64, Handover)>,
    pub journal: Vec<u8>,
    /// The ring buffer position after the journal's records.
    pub resume_pos: u64,
    pub age: Duration,
}

/// The last complete checkpoint, if one is usable; why not is logged.
pub fn recover(maps: &CheckpointMaps) -> Option<Recovered> {
    match read_checkpoint(maps) {
        Ok(Some(recovered)) => Some(recovered),
        Ok(None) => {
            tracing::info!("no checkpoint of a previous agent");
            None
        }
        Err(err) => {
            tracing::warn!("the previous agent's checkpoint is not used: {err:#}");
            None
        }
    }
}

/// The base the commit word names, with the word, when it is complete and recent enough:
/// what both the start-up drain's skip and the recovery go by, so they never disagree.
fn named_base(
    pin_state: &Array<MapData, u64>,
    slots: &Array<MapData, CheckpointSlot>,
) -> anyhow::Result<Option<(Commit, CheckpointSlot, Duration)>> {
    let word = pin_state.get(&(PinSlot::Checkpoint as u32), 0)?;
    let Some(commit) = Commit::decode(word) else { return Ok(None) };
    let header = slots.get(&commit.slot, 0)?;
    anyhow::ensure!(commit.names(&header), "its slot {} was being rewritten", commit.slot);
    let age = Duration::from_nanos(monotonic_ns().saturating_sub(header.written_ns));
    anyhow::ensure!(
        age <= handover::MAX_AGE,
        "its base is {} s old (at most {} s)",
        age.as_secs(),
        handover::MAX_AGE.as_secs()
    );
    Ok(Some((commit, header, age)))
}

fn read_checkpoint(maps: &CheckpointMaps) -> anyhow::Result<Option<Recovered>> {
    let Some((commit, header, age)) = named_base(&maps.pin_state, &maps.slots)? else {
        return Ok(None);
    };
    let mut blob = Vec::with_capacity(header.metric_bytes as usize);
    for index in 0..header.metric_chunks {
        blob.extend_from_slice(maps.metrics.get(&metrics_key(commit.slot, index), 0)?.used());
    }
    anyhow::ensure!(blob.len() as u64 == header.metric_bytes, "its metric values are incomplete");
    let connections: Vec<(u64, Handover)> = maps
        .conns
        .iter()
        .filter_map(Result::ok)
        .filter_map(|(key, entry)| match connection_of(key) {
            Some((slot, sock)) if slot == commit.slot => Some((sock, entry)),
            _ => None,
        })
        .collect();
    anyhow::ensure!(
        connections.len() == header.connections as usize,
        "{} of its {} connections found",
        connections.len(),
        header.connections
    );
    let journal = maps.read_journal(commit.journal_bytes as usize)?;
    Ok(Some(Recovered {
        base: Base { slot: commit.slot, seq: header.seq },
        metrics_text: (!blob.is_empty()).then(|| carry::decompress(&blob)).flatten(),
        connections,
        resume_pos: header.ring_pos + journal.len() as u64,
        journal,
        age,
    }))
}

/// Where the ring buffer's records not covered by the last checkpoint of the agent
/// pinned in `pin_dir` start (its base's position plus its journal); `None` without a
/// usable one. Read before anything else at start-up, so the start-up drain skips what the
/// journal holds.
pub fn resume_position(pin_dir: &Path) -> Option<u64> {
    let maps = pin_dir.join("maps");
    let pin_state: Array<MapData, u64> = open(&maps, map::PIN_STATE).ok()?;
    let slots: Array<MapData, CheckpointSlot> = open(&maps, map::CHECKPOINT).ok()?;
    let (commit, header, _) = named_base(&pin_state, &slots).ok()??;
    Some(header.ring_pos + u64::from(commit.journal_bytes))
}

/// `connscope_checkpoint*`: the agent's own account of its checkpoint.
#[derive(Clone, Debug, Default)]
pub struct CheckpointMetrics {
    bases: Counter,
    write_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    covered: Gauge,
}

impl CheckpointMetrics {
    pub fn register(&self, registry: &mut Registry) {
        metrics::register(registry, &metric_table::CHECKPOINTS, self.bases.clone());
        metrics::register(registry, &metric_table::CHECKPOINT_WRITE, self.write_seconds.clone());
        metrics::register(registry, &metric_table::CHECKPOINT_COVERED, self.covered.clone());
    }
}

/// The running agent's side: journal after each batch, a base when due.
pub struct Checkpointer {
    maps: CheckpointMaps,
    budget: f64,
    /// Journal bytes the map holds.
    capacity: usize,
    /// Journal bytes since the current base (all committed).
    journal_len: usize,
    /// `None`: a crash now would not be covered.
    base: Option<Base>,
    next_seq: u64,
    /// What each slot holds, so it is emptied before it is written again.
    slot_keys: [Vec<u64>; CHECKPOINT_SLOTS as usize],
    slot_chunks: [u32; CHECKPOINT_SLOTS as usize],
    last_base: Instant,
    /// CPU seconds bases may spend now (a token bucket of `budget` per second, at most
    /// `budget` times [`BUDGET_WINDOW`]); a base is written while it is positive.
    allowance: f64,
    allowance_at: Instant,
    stats: CheckpointMetrics,
}

impl Checkpointer {
    /// Opens the checkpoint of `pin_dir`; it covers nothing until [`Self::resume`] or the
    /// first base.
    pub fn open(pin_dir: &Path, budget: f64, stats: CheckpointMetrics) -> anyhow::Result<Self> {
        let maps = CheckpointMaps::open(pin_dir)?;
        let mut slot_keys: [Vec<u64>; 2] = Default::default();
        for key in maps.conns.keys().filter_map(Result::ok) {
            if let Some((slot, _)) = connection_of(key) {
                slot_keys[slot as usize].push(key);
            }
        }
        let mut slot_chunks = [0; 2];
        for key in maps.metrics.keys().filter_map(Result::ok) {
            let slot = (key >> 16) as usize;
            if let Some(chunks) = slot_chunks.get_mut(slot) {
                *chunks = (*chunks).max((key & 0xffff) + 1);
            }
        }
        let now = Instant::now();
        Ok(Self {
            budget,
            capacity: maps.journal.bytes().len(),
            journal_len: 0,
            base: None,
            next_seq: 1,
            slot_keys,
            slot_chunks,
            last_base: now,
            allowance: budget * BUDGET_WINDOW.as_secs_f64(),
            allowance_at: now,
            stats,
            maps,
        })
    }

    /// The previous agent's checkpoint, read for recovery.
    pub fn recover(&self) -> Option<Recovered> {
        recover(&self.maps)
    }

    /// Goes on with a recovered checkpoint: what this agent consumes from now on is
    /// appended to the same journal, so a crash during its start-up is covered too.
    pub fn resume(&mut self, recovered: &Recovered) {
        self.base = Some(recovered.base);
        self.next_seq = recovered.base.seq + 1;
        self.journal_len = recovered.journal.len();
        self.stats.covered.set(1);
    }

    /// Forgets a checkpoint this agent does not go on with (after a handover, or a stale
    /// one): from now on it describes nothing this agent consumed.
    pub fn start_afresh(&mut self) {
        self.uncover(None);
    }

    /// After a batch of records read from the ring buffer and applied to `table`, before
    /// the ring buffer gets their space back: `bytes` are those records as the ring held
    /// them, and `ring_pos` the position after them.
    pub fn after_batch(&mut self, bytes: &[u8], ring_pos: u64, table: &ConnectionTable) {
        let started = Instant::now();
        let journaled = self.base.is_some() && self.append(bytes);
        let due = !journaled
            || self.journal_len > self.capacity / 2
            || started >= self.last_base + BASE_INTERVAL;
        if due && self.budget_allows(started) {
            self.write_base(ring_pos, table);
        } else if !journaled && self.base.is_some() {
            self.uncover(Some(
                "the journal is full and --checkpoint.budget allows no base yet".into(),
            ));
        }
        self.stats.write_seconds.inc_by(started.elapsed().as_secs_f64());
    }

    /// Appends `bytes` to the journal and commits them; false when they do not fit or the
    /// commit failed (the journal's committed length is then unchanged).
    fn append(&mut self, bytes: &[u8]) -> bool {
        let Some(base) = self.base else { return false };
        if bytes.is_empty() {
            return true;
        }
        let end = self.journal_len + bytes.len();
        if end > self.capacity {
            return false;
        }
        // Past the committed length: a reader after a crash does not look there yet.
        self.maps.journal.bytes_mut()[self.journal_len..end].copy_from_slice(bytes);
        let commit = u32::try_from(end).map_err(anyhow::Error::from).and_then(|journal_bytes| {
            self.maps.commit(Some(Commit { slot: base.slot, seq: base.seq as u32, journal_bytes }))
        });
        match commit {
            Ok(()) => {
                self.journal_len = end;
                true
            }
            Err(err) => {
                tracing::warn!("journal not committed: {err:#}");
                false
            }
        }
    }

    fn write_base(&mut self, ring_pos: u64, table: &ConnectionTable) {
        let started = Instant::now();
        let base = Base { slot: self.base.map_or(0, |base| 1 - base.slot), seq: self.next_seq };
        match self.fill_slot(base, ring_pos, table) {
            Ok(()) => {
                self.base = Some(base);
                self.next_seq += 1;
                self.journal_len = 0;
                self.stats.bases.inc();
                if self.stats.covered.set(1) == 0 {
                    tracing::info!("a crash of this agent is covered by its checkpoint");
                }
            }
            Err(err) => self.uncover(Some(format!("checkpoint base not written: {err:#}"))),
        }
        self.last_base = Instant::now();
        self.allowance -= started.elapsed().as_secs_f64();
    }

    fn budget_allows(&mut self, now: Instant) -> bool {
        let earned = now.saturating_duration_since(self.allowance_at).as_secs_f64() * self.budget;
        self.allowance = (self.allowance + earned).min(self.budget * BUDGET_WINDOW.as_secs_f64());
        self.allowance_at = now;
        self.allowance > 0.0
    }

    /// Writes `base` into its slot (the one the commit word does not name), then names it.
    fn fill_slot(
        &mut self,
        base: Base,
        ring_pos: u64,
        table: &ConnectionTable,
    ) -> anyhow::Result<()> {
        let slot = base.slot as usize;
        let conns_fd = self.maps.conns.map().fd().as_fd().as_raw_fd();
        let metrics_fd = self.maps.metrics.map().fd().as_fd().as_raw_fd();
        // Entries the slot holds already are overwritten in place; only what is gone is
        // deleted (most connections outlive a base).
        let blob = table.carried_metrics()?;
        let chunks: Vec<(u32, CarriedChunk)> = carry::chunked(&blob)?
            .into_iter()
            .enumerate()
            .map(|(index, chunk)| (metrics_key(base.slot, index as u32), chunk))
            .collect();
        map_batch::update(metrics_fd, &chunks).context("the metric values")?;
        let gone_chunks: Vec<u32> = (chunks.len() as u32..self.slot_chunks[slot])
            .map(|index| metrics_key(base.slot, index))
            .collect();
        map_batch::delete(metrics_fd, &gone_chunks).context("the slot's older metric values")?;
        self.slot_chunks[slot] = chunks.len() as u32;
        let entries: Vec<(u64, Handover)> = table
            .handover()
            .map(|(sock, entry)| (connection_key(sock, base.slot), entry))
            .collect();
        map_batch::update(conns_fd, &entries).context("the connections")?;
        let mut keys: Vec<u64> = entries.iter().map(|(key, _)| *key).collect();
        keys.sort_unstable();
        let gone: Vec<u64> = std::mem::take(&mut self.slot_keys[slot])
            .into_iter()
            .filter(|key| keys.binary_search(key).is_err())
            .collect();
        map_batch::delete(conns_fd, &gone).context("the slot's closed connections")?;
        self.slot_keys[slot] = keys;
        let header = CheckpointSlot {
            seq: base.seq,
            written_ns: monotonic_ns(),
            ring_pos,
            connections: self.slot_keys[slot].len() as u32,
            metric_chunks: self.slot_chunks[slot],
            metric_bytes: blob.len() as u64,
        };
        self.maps.slots.set(base.slot, header, 0)?;
        self.maps.commit(Some(Commit { slot: base.slot, seq: base.seq as u32, journal_bytes: 0 }))
    }

    /// Stops covering: the commit word names nothing until the next base.
    fn uncover(&mut self, reason: Option<String>) {
        if let Err(err) = self.maps.commit(None) {
            tracing::warn!("{err:#}");
        }
        let was = self.stats.covered.set(0);
        if let (Some(reason), 1) = (reason, was) {
            tracing::warn!("a crash of this agent is not covered until the next base: {reason}");
        }
        self.base = None;
        self.journal_len = 0;
    }
}
