//! What the crash checkpoint costs (`pipeline::checkpoint`): a base with `N` live
//! connections (default 100,000, spread over 100 servers x 10 processes, so the `server` and
//! `process` caps are full) and a journal write per batch, against real pinned maps of the
//! agent's shapes (made with `bpftool` in a BPF filesystem mounted for the run). 5 rounds
//! each, median and range. As root, with bpftool:
//!
//! `cargo run --release -p connscope --example checkpoint_cost -- 100000`

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use connscope::{
    exposition::metrics::Metrics,
    model::{clock, placement::NoPlacement},
    pipeline::{
        checkpoint::{CheckpointMetrics, Checkpointer},
        events::Event,
        table::ConnectionTable,
    },
};
use connscope_common::{
    AF_INET, Attribution, CarriedChunk, CheckpointSlot, EventHeader, EventKind, Handover,
    OpenEvent, PinSlot, Role,
    checkpoint::{CHECKPOINT_SLOTS, JOURNAL_CHUNK_BYTES, journal_chunks},
    names::map,
};

const ROUNDS: usize = 5;

fn main() -> anyhow::Result<()> {
    let connections: u32 = std::env::args().nth(1).map_or(Ok(100_000), |n| n.parse())?;
    let dir =
        std::env::temp_dir().join(format!("connscope-checkpoint-cost-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("maps"))?;
    let mounted = Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&dir).status()?;
    ensure!(mounted.success(), "mount -t bpf: run as root");
    std::fs::create_dir_all(dir.join("maps"))?;
    let result = measure(&dir, connections);
    let _ = Command::new("umount").arg(&dir).status();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn measure(dir: &Path, connections: u32) -> anyhow::Result<()> {
    let maps = dir.join("maps");
    let max = connections.max(1) * CHECKPOINT_SLOTS;
    let journal = journal_chunks(connscope_common::DEFAULT_RINGBUF_BYTES);
    for (name, kind, key, value, entries, flags) in [
        (map::CHECKPOINT, "array", 4, size_of::<CheckpointSlot>(), CHECKPOINT_SLOTS, 0),
        (map::CHECKPOINT_CONNS, "hash", 8, size_of::<Handover>(), max, 1),
        (map::CHECKPOINT_METRICS, "hash", 4, size_of::<CarriedChunk>(), 2048, 1),
        (map::JOURNAL, "array", 4, JOURNAL_CHUNK_BYTES, journal, 1024),
        (map::PIN_STATE, "array", 4, 8, PinSlot::COUNT, 0),
    ] {
        let status = Command::new("bpftool")
            .args(["map", "create"])
            .arg(maps.join(name))
            .args(["type", kind, "key", &key.to_string(), "value", &value.to_string()])
            .args(["entries", &entries.to_string(), "name", name, "flags", &flags.to_string()])
            .status()
            .context("bpftool")?;
        ensure!(status.success(), "bpftool map create {name}");
    }

    let mut table = ConnectionTable::new(
        Metrics::new(),
        connections as usize + 1,
        100,
        10,
        Box::new(NoPlacement),
    );
    for index in 0..connections {
        open(&mut table, index);
    }
    let mut checkpoint = Checkpointer::open(dir, 1.0, CheckpointMetrics::default())?;
    let mut bases = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS {
        checkpoint.start_afresh();
        let started = Instant::now();
        checkpoint.after_batch(&[], round as u64, &table);
        bases.push(started.elapsed());
    }
    report(&format!("base with {connections} connections"), &mut bases);

    // A batch: records as the ring holds them (8-byte header, 88-byte record).
    let mut batch = Vec::new();
    while batch.len() + 96 <= 64 << 10 {
        batch.extend_from_slice(&88u32.to_ne_bytes());
        batch.extend_from_slice(&[0; 92]);
    }
    let mut appends = Vec::with_capacity(ROUNDS * 10);
    for _ in 0..ROUNDS * 10 {
        let started = Instant::now();
        checkpoint.after_batch(&batch, 0, &table);
        appends.push(started.elapsed());
    }
    report(&format!("journal write of a {} KiB batch", batch.len() >> 10), &mut appends);
    Ok(())
}

/// A client connection `index` as the kernel's `Open` record would announce it.
fn open(table: &mut ConnectionTable, index: u32) {
    let sock = 0xffff_0000_0000_0000 + u64::from(index) * 64;
    let open_ns = clock::monotonic_ns();
    let mut record = OpenEvent {
        header: EventHeader::new(EventKind::Open, sock, open_ns),
        open_ns,
        role: Role::Client as u8,
        attribution: Attribution { valid: 1, tgid: 1 + index % 10, ..Attribution::default() },
        ..OpenEvent::default()
    };
    let comm = format!("proc{}", index % 10);
    record.attribution.comm[..comm.len()].copy_from_slice(comm.as_bytes());
    let endpoints = &mut record.endpoints;
    endpoints.family = AF_INET;
    (endpoints.local_port, endpoints.remote_port) = (10_000 + (index % 50_000) as u16, 8080);
    endpoints.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
    endpoints.remote_addr[..4].copy_from_slice(&[10, 0, 0, (index % 100) as u8]);
    table.handle(&Event::Open(record));
}

fn report(what: &str, times: &mut [Duration]) {
    times.sort_unstable();
    println!(
        "{what}: median {:?} (range {:?} to {:?})",
        times[times.len() / 2],
        times[0],
        times[times.len() - 1]
    );
}
