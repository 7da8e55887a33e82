//! The path from the ring buffer to the metrics, as the agent's loop drives it: draining
//! records into the connection table, sweeping active connections, taking over a previous
//! agent's state and handing this one's over.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use aya::maps::{HashMap, MapData, RingBuf};
use connscope_common::{CarriedChunk, Conn, EventKind, Handover};
use prometheus_client::metrics::counter::Counter;
use tokio::io::unix::AsyncFd;

use crate::{
    exposition::{carry, kernel_stats::UserLosses, metrics::Metrics},
    model::{label_sets::EventKindLabel, socket_census::Census},
    pipeline::{backlog::Backlog, events, handover, table::ConnectionTable},
};

/// The path from the ring buffer to the metrics.
pub struct Pipeline {
    /// Polled by the agent's loop for readiness.
    pub ring: AsyncFd<RingBuf<MapData>>,
    conns: HashMap<MapData, u64, Conn>,
    table: ConnectionTable,
    counters: EventCounters,
    losses: Arc<UserLosses>,
    /// Reused by every sweep (no allocation per sweep).
    sweep: Vec<u64>,
    /// With pinned state: where this agent leaves its connections for the next one.
    handover: Option<HashMap<MapData, u64, Handover>>,
    /// With pinned state: where it leaves its metric values (`carry`).
    carried: Option<HashMap<MapData, u32, CarriedChunk>>,
}

impl Pipeline {
    pub fn new(
        ring: AsyncFd<RingBuf<MapData>>,
        conns: HashMap<MapData, u64, Conn>,
        table: ConnectionTable,
        counters: EventCounters,
        losses: Arc<UserLosses>,
        handover: Option<HashMap<MapData, u64, Handover>>,
        carried: Option<HashMap<MapData, u32, CarriedChunk>>,
    ) -> Self {
        Self { ring, conns, table, counters, losses, sweep: Vec::new(), handover, carried }
    }

    pub fn drain(&mut self) {
        let ring = self.ring.get_mut();
        while let Some(record) = ring.next() {
            apply_record(&mut self.table, &self.counters, &self.losses, &record);
        }
    }

    /// After a takeover: reads what waited in the pinned ring buffer (connections opened
    /// while no agent ran, with their requests): first what the start-up drain kept
    /// (`backlog`), which the ring buffer held before what it holds now. Then forgets the
    /// connections only the previous agent could label; the kernel adopts them again at
    /// their next send or receive. Connections opened from now on are announced in the
    /// ring buffer.
    pub fn take_over_connections(&mut self, backlog: Option<Backlog>) {
        let entries = self.handover.as_mut().and_then(handover::take);
        // Emptied in any case: values left without a handover are a crashed agent's.
        let carried = self.carried.as_mut().and_then(carry::take);
        if let Some(text) =
            carried.filter(|_| entries.is_some()).and_then(|blob| carry::decompress(&blob))
        {
            let carried = self.table.carry_on(&text);
            tracing::info!(
                series = carried.series,
                skipped = carried.skipped,
                "metrics go on from the previous agent's values"
            );
        }
        let entries = entries.unwrap_or_default();
        let restored =
            entries.iter().filter(|(sock, entry)| self.table.restore(*sock, entry)).count();
        if let Some(backlog) = backlog {
            for record in backlog.records() {
                apply_record(&mut self.table, &self.counters, &self.losses, record);
            }
            self.losses.startup_backlog_full.fetch_add(backlog.dropped(), Ordering::Relaxed);
            tracing::info!(
                records = backlog.len(),
                bytes = backlog.bytes(),
                dropped = backlog.dropped(),
                "records queued during start-up applied"
            );
            drop(backlog);
            release_freed_memory();
        }
        self.drain();
        let mut unknown: Vec<u64> = self
            .conns
            .iter()
            .filter_map(Result::ok)
            .filter(|(sock, _)| !self.table.knows(*sock))
            .map(|(sock, _)| sock)
            .collect();
        // A connection opened while the map was read is announced in the ring buffer:
        // read it again, so only connections no record will announce are forgotten.
        self.drain();
        unknown.retain(|sock| !self.table.knows(*sock));
        for sock in &unknown {
            let _ = self.conns.remove(sock);
        }
        tracing::info!(
            restored,
            known = self.table.len(),
            readopted = unknown.len(),
            "took over the pinned kernel state"
        );
    }

    /// Leaves this agent's connections to the next one (pinned state only).
    pub fn hand_over(&mut self) {
        let Some(map) = self.handover.as_mut() else { return };
        let started = Instant::now();
        // Before the handover's header, which tells the next agent both are complete.
        if let Some(carried) = self.carried.as_mut() {
            let written = self
                .table
                .carried_metrics()
                .and_then(|blob| carry::write(carried, &blob).map(|()| blob.len()));
            match written {
                Ok(bytes) => tracing::info!(bytes, "metric values left for the next agent"),
                Err(err) => tracing::warn!("the next agent's metrics start from 0: {err:#}"),
            }
        }
        let written = handover::write(map, self.table.handover());
        tracing::info!(
            connections = written,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "connections handed over to the next agent"
        );
    }

    /// Attributes a socket census to flows, once the records queued before it are applied
    /// (a connection that closed since is then a recent close, not an open one).
    pub fn count_sockets(&mut self, census: &Census) {
        self.drain();
        self.table.count_sockets(census);
    }

    /// Re-reads the connections active since the last sweep, so counts of steady traffic
    /// (which sends no records) reach the metrics within a sweep interval.
    pub fn sweep(&mut self) {
        self.drain();
        self.table.sweep_candidates(&mut self.sweep);
        for &sock in &self.sweep {
            let conn = self.conns.get(&sock, 0).ok();
            self.table.swept(sock, conn.as_ref());
        }
    }
}

/// Decodes one ring buffer record and applies it; a record that does not decode is counted.
fn apply_record(
    table: &mut ConnectionTable,
    counters: &EventCounters,
    losses: &UserLosses,
    record: &[u8],
) {
    match events::decode(record) {
        Ok(event) => {
            counters.count(event.kind());
            table.handle(&event);
        }
        Err(err) => {
            losses.decode_error.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("dropping a ring buffer record: {err}");
        }
    }
}

/// `events_received_total` per kind, looked up once.
pub struct EventCounters {
    by_kind: Vec<(EventKind, Counter)>,
}

impl EventCounters {
    pub fn new(metrics: &Metrics) -> Self {
        let by_kind = EventKind::ALL
            .iter()
            .map(|&kind| {
                let labels = EventKindLabel { kind: kind.label().into() };
                (kind, metrics.events.get_or_create_owned(&labels))
            })
            .collect();
        Self { by_kind }
    }

    fn count(&self, kind: EventKind) {
        if let Some((_, counter)) = self.by_kind.iter().find(|(k, _)| *k == kind) {
            counter.inc();
        }
    }
}

/// Hands the heap freed after loading (the kernel's parsed BTF, tens of MiB) back to the
/// system; the allocator would otherwise keep it in the agent's RSS for good.
pub fn release_freed_memory() {
    // SAFETY: glibc's malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
}
