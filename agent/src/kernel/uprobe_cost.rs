//! What one libssl uprobe hit costs on this host, measured at start: the decryption
//! budget's unit (`decryption_budget`).
//!
//! A uprobe hit is a breakpoint trap into the kernel, and its cost varies by an order of
//! magnitude between hosts (virtualisation, CPU mitigations). So it is measured, not
//! assumed: the agent calls a function of its own [`CALLS`] times with an entry and a
//! return probe attached to it in its own process only, and as often without, and divides
//! the difference by the hits. The probes run the hit counter the libssl probes run; the
//! rest of those programs (a map update or two) is small beside the trap.

use std::{
    hint::black_box,
    num::NonZeroU32,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    programs::{
        UProbe,
        uprobe::{UProbeAttachLocation, UProbeScope},
    },
};
use connscope_common::names::program;

/// Calls per timed round (two hits each).
const CALLS: u32 = 2_000;
/// Rounds without the probes, then with them: the cheapest of each is kept, so that a round
/// the scheduler interrupted does not count.
const ROUNDS: usize = 3;

/// The function the calibration probes are attached to. Not inlined, and exported so that
/// it keeps its own address.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn connscope_uprobe_calibration_target(value: u64) -> u64 {
    black_box(value).wrapping_add(1)
}

/// The measured cost of one hit.
pub fn measure(ebpf: &mut Ebpf) -> anyhow::Result<Duration> {
    let exe = std::fs::read_link("/proc/self/exe").context("reading /proc/self/exe")?;
    let offset = file_offset(connscope_uprobe_calibration_target as *const () as usize as u64)?;
    let pid = NonZeroU32::new(std::process::id()).context("pid 0")?;
    let without = cheapest_round();
    let mut links = Vec::new();
    // The return probe first, as for libssl: no entry is counted without its return.
    for name in [program::CALIBRATION_RETURN, program::CALIBRATION_ENTRY] {
        let probe = calibration_probe(ebpf, name)?;
        probe.load().with_context(|| format!("loading {name}"))?;
        let link = probe
            .attach(
                UProbeAttachLocation::AbsoluteOffset(offset),
                &exe,
                UProbeScope::OneProcess(pid),
            )
            .with_context(|| format!("attaching {name} to the agent itself"))?;
        links.push((name, link));
    }
    let with = cheapest_round();
    for (name, link) in links.into_iter().rev() {
        calibration_probe(ebpf, name)?.detach(link)?;
    }
    let hits = f64::from(CALLS) * 2.0;
    Ok(Duration::from_secs_f64(with.saturating_sub(without).as_secs_f64() / hits))
}

fn calibration_probe<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut UProbe> {
    Ok(ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the object"))?
        .try_into()?)
}

/// The fastest of [`ROUNDS`] timed rounds.
fn cheapest_round() -> Duration {
    (0..ROUNDS).map(|_| time_calls()).min().unwrap_or_default()
}

fn time_calls() -> Duration {
    let started = Instant::now();
    let mut value = 0;
    for _ in 0..CALLS {
        value = connscope_uprobe_calibration_target(value);
    }
    black_box(value);
    started.elapsed()
}

/// The offset in the agent's executable file of the code at `address` (a uprobe is placed
/// by file offset), from the executable mapping that holds it.
fn file_offset(address: u64) -> anyhow::Result<u64> {
    let maps = std::fs::read_to_string("/proc/self/maps").context("reading /proc/self/maps")?;
    maps.lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            let (range, perms, offset) = (fields.next()?, fields.next()?, fields.next()?);
            let (start, end) = range.split_once('-')?;
            let start = u64::from_str_radix(start, 16).ok()?;
            let end = u64::from_str_radix(end, 16).ok()?;
            let offset = u64::from_str_radix(offset, 16).ok()?;
            (perms.contains('x') && (start..end).contains(&address))
                .then(|| address - start + offset)
        })
        .with_context(|| format!("no executable mapping holds {address:#x}"))
}
