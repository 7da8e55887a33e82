//! Kernel state kept across agent restarts (`--bpf.pin-path`). The maps of
//! `names::map::PINNED` and the program links are pinned in a BPF filesystem:
//!
//! ```text
//! <pin-path>/maps/<MAP>                    reused by the next agent
//! <pin-path>/links/<generation>/<program>  keeps the programs attached while no agent runs
//! ```
//!
//! A stopping agent leaves both in place, so the programs keep counting and their records
//! wait in the pinned ring buffer. The next agent loads its programs against the same maps
//! with the next generation number; its programs do nothing until it writes that number into
//! `PIN_STATE` (after attaching), and from that write on the old programs do nothing. Then
//! it removes the old links, which detaches the old programs: no gap, nothing counted twice.
//! Pinned state of another layout is replaced (one log line), and so is orphaned state:
//! its agent stopped longer ago than a successor may take over after
//! (`PINNED_STATE_MAX_AGE_NS`, the handover's age limit too). Its programs turn themselves
//! off at that age (`Pins::heartbeat`), so an agent stopped for good (a deleted DaemonSet)
//! stops costing the host whether or not `connscope cleanup` runs.

use std::{
    io,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    maps::{Array, MapData, MapInfo, MapType},
    programs::links::FdLink,
};
use connscope_common::{
    CARRIED_CHUNKS, CarriedChunk, CheckpointSlot, Conn, ConnectInFlight, DEFAULT_MAX_CONNECTIONS,
    Handover, IN_FLIGHT_CALLS, JournalChunk, ListenKey, LostReason, MAX_H2_CONNECTIONS,
    MAX_LISTEN_PORTS, PinSlot, Setting, SslCall,
    checkpoint::CHECKPOINT_SLOTS,
    h2_frames::H2State,
    kernel_config::{ORPHANED_GENERATION, PINNED_STATE_MAX_AGE_NS, contract_fingerprint},
    names::map,
};

use crate::{
    config::Config,
    kernel::{
        bpffs,
        pin_owner::{self, Owner},
    },
    model::clock::monotonic_ns,
};

/// Where this agent's state is pinned, and which generation its programs are.
#[derive(Debug)]
pub struct Pins {
    dir: PathBuf,
    pub generation: u64,
    /// The generation found pinned (its programs are still attached), if any.
    pub previous: Option<u64>,
    fingerprint: u64,
}

/// Key, value and entry count of a map, as `bpf_map_info` reports them.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Shape {
    map_type: MapType,
    key: u32,
    value: u32,
    entries: u32,
}

/// The shape every pinned map must have for this build and configuration.
fn expected_shape(name: &str, config: &Config) -> Option<Shape> {
    use std::mem::size_of;
    let shape = |map_type, key: usize, value: usize, entries| Shape {
        map_type,
        key: key as u32,
        value: value as u32,
        entries,
    };
    Some(match name {
        map::CONNS => shape(MapType::Hash, 8, size_of::<Conn>(), config.max_connections),
        map::EVENTS => shape(MapType::RingBuf, 0, 0, config.ringbuf_bytes),
        map::LOST => shape(MapType::PerCpuArray, 4, 8, LostReason::COUNT),
        map::SETTINGS => shape(MapType::Array, 4, 4, Setting::COUNT),
        map::CONNECTS_IN_FLIGHT => {
            shape(MapType::LruHash, 8, size_of::<ConnectInFlight>(), IN_FLIGHT_CALLS)
        }
        map::LISTEN_PORTS => shape(MapType::Hash, size_of::<ListenKey>(), 4, MAX_LISTEN_PORTS),
        map::PIN_STATE => shape(MapType::Array, 4, 8, PinSlot::COUNT),
        map::HANDOVER => shape(MapType::Hash, 8, size_of::<Handover>(), config.max_connections + 1),
        map::CARRIED_METRICS => shape(MapType::Hash, 4, size_of::<CarriedChunk>(), CARRIED_CHUNKS),
        map::TLS_CALLS => shape(MapType::LruHash, 8, size_of::<SslCall>(), IN_FLIGHT_CALLS),
        map::TLS_SOCKETS => shape(MapType::LruHash, 8, 8, DEFAULT_MAX_CONNECTIONS),
        map::CHECKPOINT => shape(MapType::Array, 4, size_of::<CheckpointSlot>(), CHECKPOINT_SLOTS),
        map::CHECKPOINT_CONNS => shape(
            MapType::Hash,
            8,
            size_of::<Handover>(),
            CHECKPOINT_SLOTS * config.max_connections,
        ),
        map::CHECKPOINT_METRICS => {
            shape(MapType::Hash, 4, size_of::<CarriedChunk>(), CHECKPOINT_SLOTS * CARRIED_CHUNKS)
        }
        map::JOURNAL => {
            shape(MapType::Array, 4, size_of::<JournalChunk>(), config.journal_chunks())
        }
        map::H2_CONNS => shape(MapType::Hash, 8, size_of::<H2State>(), MAX_H2_CONNECTIONS),
        _ => return None,
    })
}

fn pinned_shape(path: &Path) -> anyhow::Result<Shape> {
    let info = MapInfo::from_pin(path)?;
    Ok(Shape {
        map_type: info.map_type()?,
        key: info.key_size(),
        value: info.value_size(),
        entries: info.max_entries(),
    })
}

impl Pins {
    /// Checks what is pinned under `dir`: state of this layout is taken over, anything else
    /// is removed (one log line) and the programs start at generation 1.
    pub fn prepare(dir: &Path, config: &Config) -> anyhow::Result<Self> {
        bpffs::mount_for(dir)?;
        std::fs::create_dir_all(dir.join("maps"))
            .with_context(|| format!("creating --bpf.pin-path {}", dir.display()))?;
        if !bpffs::is_on_bpf_fs(dir)? {
            anyhow::bail!(
                "--bpf.pin-path {} is not on a BPF filesystem (mount -t bpf bpf /sys/fs/bpf), \
                 or turn pinning off with --bpf.pin-path \"\"",
                dir.display()
            );
        }
        let fingerprint = contract_fingerprint();
        let mut pins = Self { dir: dir.to_owned(), generation: 1, previous: None, fingerprint };
        match pins.pinned_generation(config) {
            Ok(None) => {}
            Ok(Some(previous)) => {
                let state = open_pin_state(&dir.join("maps").join(map::PIN_STATE))?;
                pin_owner::wait_for_exit(Owner::recorded(&state)?, &dir.display().to_string())?;
                pins.previous = Some(previous);
                pins.generation = previous + 1;
            }
            Err(err) => {
                tracing::warn!("replacing the pinned state in {}: {err:#}", dir.display());
                remove_contents(dir)?;
                std::fs::create_dir_all(dir.join("maps"))?;
            }
        }
        Ok(pins)
    }

    /// The active generation of compatible pinned state; `None` when nothing is pinned;
    /// an error when what is pinned does not fit this build.
    fn pinned_generation(&self, config: &Config) -> anyhow::Result<Option<u64>> {
        let maps = self.dir.join("maps");
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&maps)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            let expected =
                expected_shape(&name, config).ok_or_else(|| anyhow!("unknown map {name}"))?;
            let pinned = pinned_shape(&maps.join(&name))
                .with_context(|| format!("reading the pinned map {name}"))?;
            if pinned != expected {
                anyhow::bail!("map {name} is {pinned:?}, this build needs {expected:?}");
            }
            found.push(name);
        }
        if found.is_empty() && !self.dir.join("links").exists() {
            return Ok(None);
        }
        let state = open_pin_state(&maps.join(map::PIN_STATE))?;
        let fingerprint = state.get(&(PinSlot::Fingerprint as u32), 0)?;
        if fingerprint != self.fingerprint {
            anyhow::bail!(
                "layout fingerprint {fingerprint:#x}, this build has {:#x}",
                self.fingerprint
            );
        }
        let active = state.get(&(PinSlot::ActiveGeneration as u32), 0)?;
        let beat = state.get(&(PinSlot::Heartbeat as u32), 0)?;
        let silent_ns = monotonic_ns().saturating_sub(beat);
        let owner_running = Owner::recorded(&state)?.is_some_and(|owner| owner.is_running());
        if active == ORPHANED_GENERATION
            || (!owner_running && beat != 0 && silent_ns > PINNED_STATE_MAX_AGE_NS)
        {
            anyhow::bail!(
                "orphaned: its agent stopped {} s ago, longer than a successor may take over \
                 after ({} s), so what its programs counted since is of no use",
                silent_ns / 1_000_000_000,
                PINNED_STATE_MAX_AGE_NS / 1_000_000_000
            );
        }
        Ok(Some(active))
    }

    /// The pin directory (`--bpf.pin-path`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the loader finds (or creates and pins) each pinned map.
    pub fn map_paths(&self) -> impl Iterator<Item = (&'static str, PathBuf)> + '_ {
        map::PINNED.into_iter().map(|name| (name, self.dir.join("maps").join(name)))
    }

    /// Where this generation's links are pinned.
    pub fn own_links(&self) -> PathBuf {
        self.dir.join("links").join(self.generation.to_string())
    }

    /// Called before this agent attaches its programs: the trampoline updates of a takeover
    /// begin (`PinSlot::TakeoverEndNs`).
    pub fn begin_takeover(&self, ebpf: &mut Ebpf) -> anyhow::Result<()> {
        pin_state(ebpf)?.set(PinSlot::TakeoverEndNs as u32, u64::MAX, 0)?;
        Ok(())
    }

    /// Makes this agent's programs the counting ones, detaches the previous generation's
    /// and pins this generation's links so they outlive the agent.
    pub fn take_over(&self, ebpf: &mut Ebpf, links: Vec<(String, FdLink)>) -> anyhow::Result<()> {
        let mut state = pin_state(ebpf)?;
        state.set(PinSlot::Fingerprint as u32, self.fingerprint, 0)?;
        // Before the switch: these programs never find their own state orphaned.
        state.set(PinSlot::Heartbeat as u32, monotonic_ns(), 0)?;
        state.set(PinSlot::OrphanAfterNs as u32, PINNED_STATE_MAX_AGE_NS, 0)?;
        state.set(PinSlot::ActiveGeneration as u32, self.generation, 0)?;
        if let Some(me) = Owner::current() {
            me.record(&mut state)?;
        }
        let links_dir = self.dir.join("links");
        let mut previous = Vec::new();
        if links_dir.exists() {
            for entry in std::fs::read_dir(&links_dir)? {
                previous.push(entry?.path());
            }
        }
        if previous.is_empty() {
            end_takeover(&mut state);
        } else {
            detach_later(previous, self.dir.join("maps").join(map::PIN_STATE));
        }
        let own = self.own_links();
        if own.exists() {
            // Another agent read the same generation and got here first.
            anyhow::bail!(
                "{} exists: another connscope agent is starting or running with --bpf.pin-path {} \
                 (one agent per pin path; give each its own, or \"\" for none)",
                own.display(),
                self.dir.display()
            );
        }
        std::fs::create_dir_all(&own)?;
        for (program, link) in links {
            link.pin(own.join(&program))
                .with_context(|| format!("pinning the link of {program}"))?;
        }
        tracing::info!(
            generation = self.generation,
            previous = ?self.previous,
            "kernel state pinned in {}",
            self.dir.display()
        );
        Ok(())
    }

    /// Shows the pinned programs that their agent is alive (`PinSlot::Heartbeat`), every
    /// second: stopped for good, it leaves programs that turn themselves off once the
    /// heartbeat is `PINNED_STATE_MAX_AGE_NS` old. An agent that was stalled that long
    /// (stopped with SIGSTOP, starved) finds its programs off and turns them on again; the
    /// connections opened meanwhile are adopted at their next transfer.
    pub fn heartbeat(&self, ebpf: &mut Ebpf) {
        let beat = pin_state(ebpf).and_then(|mut state| {
            state.set(PinSlot::Heartbeat as u32, monotonic_ns(), 0)?;
            if state.get(&(PinSlot::ActiveGeneration as u32), 0)? == ORPHANED_GENERATION {
                tracing::warn!(
                    "this agent was silent for over {} s and its pinned programs turned \
                     themselves off: turning them on again",
                    PINNED_STATE_MAX_AGE_NS / 1_000_000_000
                );
                state.set(PinSlot::ActiveGeneration as u32, self.generation, 0)?;
            }
            Ok(())
        });
        if let Err(err) = beat {
            tracing::warn!("writing the heartbeat into PIN_STATE: {err:#}");
        }
    }
}

/// How long the previous generation's programs stay attached after the switch. Inactive,
/// they only finish the receives that were already waiting in `tcp_recvmsg` at the switch:
/// a kretprobe removed before its call returns never runs for it (an fexit does, from the
/// old trampoline), and a receive that returns within this time is still counted.
const PREVIOUS_LINKS_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// The pinned `PIN_STATE` at `path`.
fn open_pin_state(path: &Path) -> anyhow::Result<Array<MapData, u64>> {
    let state = MapData::from_pin(path)?;
    Ok(aya::maps::Map::from_map_data(state)?.try_into()?)
}

/// This agent's `PIN_STATE`.
fn pin_state(ebpf: &mut Ebpf) -> anyhow::Result<Array<&mut MapData, u64>> {
    let state = ebpf.map_mut(map::PIN_STATE).ok_or_else(|| anyhow!("PIN_STATE missing"))?;
    Ok(Array::try_from(state)?)
}

/// The last trampoline update of a takeover is over: connections counted before now look
/// for a turn their fexit programs missed at their next call. A failed write leaves the
/// window open, which costs those checks only.
fn end_takeover<T: std::borrow::BorrowMut<MapData>>(state: &mut Array<T, u64>) {
    let now = monotonic_ns();
    if let Err(err) = state.set(PinSlot::TakeoverEndNs as u32, now, 0) {
        tracing::warn!("marking the takeover's end in PIN_STATE: {err}");
    }
}

/// Removes the previous generations' link pins after [`PREVIOUS_LINKS_GRACE`] (removing the
/// last pin of a link detaches its program), then ends the takeover in `state_pin`'s
/// `PIN_STATE`. An agent that exits before leaves them to the next one, which removes
/// every generation but its own.
fn detach_later(previous: Vec<PathBuf>, state_pin: PathBuf) {
    let spawned = std::thread::Builder::new().name("detach-previous".into()).spawn(move || {
        std::thread::sleep(PREVIOUS_LINKS_GRACE);
        for path in previous {
            if let Err(err) = remove_path(&path) {
                tracing::warn!("removing the previous programs' links {}: {err}", path.display());
            }
        }
        match open_pin_state(&state_pin) {
            Ok(mut state) => end_takeover(&mut state),
            Err(err) => tracing::warn!("opening {}: {err:#}", state_pin.display()),
        }
    });
    if let Err(err) = spawned {
        tracing::warn!("previous programs stay attached until the next restart: {err}");
    }
}

fn remove_path(path: &Path) -> io::Result<()> {
    if path.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) }
}

fn remove_contents(dir: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        remove_path(&entry?.path())?;
    }
    Ok(())
}

/// `connscope cleanup`: removes everything pinned under `dir`, which detaches the programs
/// no agent runs. Returns whether there was anything.
pub fn cleanup(dir: &Path) -> anyhow::Result<bool> {
    match std::fs::symlink_metadata(dir) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(err) => Err(err).with_context(|| format!("reading {}", dir.display())),
        Ok(_) => {
            std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
            Ok(true)
        }
    }
}

/// `connscope cleanup`, with its one line of output.
pub fn cleanup_command(dir: Option<&Path>) -> std::process::ExitCode {
    let Some(dir) = dir else {
        eprintln!("connscope: --bpf.pin-path is \"\": nothing is pinned");
        return std::process::ExitCode::SUCCESS;
    };
    match cleanup(dir) {
        Ok(true) => {
            eprintln!("connscope: removed {} (programs detached, maps freed)", dir.display());
            std::process::ExitCode::SUCCESS
        }
        Ok(false) => {
            eprintln!("connscope: nothing pinned at {}", dir.display());
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("connscope: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::{config::Cli, kernel::probes::PROGRAMS};

    /// The shapes checked against pinned maps are those of the object this agent loads.
    #[test]
    fn expected_shapes_match_the_object() -> anyhow::Result<()> {
        let config = Cli::try_parse_from(["connscope"])?.into_config()?;
        let object = aya_obj::Object::parse(PROGRAMS)?;
        for name in map::PINNED {
            let shape = expected_shape(name, &config).ok_or_else(|| anyhow!("{name}"))?;
            let defined = object.maps.get(name).ok_or_else(|| anyhow!("{name} missing"))?;
            assert_eq!(
                (defined.key_size(), defined.value_size()),
                (shape.key, shape.value),
                "{name}"
            );
            if ![map::CONNS, map::EVENTS, map::HANDOVER].contains(&name) {
                assert_eq!(defined.max_entries(), shape.entries, "{name}");
            }
        }
        Ok(())
    }
}
