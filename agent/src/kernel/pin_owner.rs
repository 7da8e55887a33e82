//! Which agent runs the pinned state, so that a second one never takes it over while the
//! first still runs (a force-deleted pod's replacement can start beside the old agent, whose
//! ring buffer reads and handover would then interleave with its own).
//!
//! The owner is recorded in `PIN_STATE` (`PinSlot::OwnerPid`, `PinSlot::OwnerStartTicks`)
//! by the agent that takes the state over. A starting agent that finds a running owner
//! waits for it to exit (a stopping agent exits within a second of SIGTERM), then takes
//! over as after a graceful stop. Pids are compared in the agent's pid namespace: the
//! DaemonSet runs with `hostPID`, so two pods' agents see each other.

use std::time::{Duration, Instant};

use aya::maps::{Array, MapData};
use connscope_common::PinSlot;

/// How long a starting agent waits for the pinned state's owner to exit before it gives up
/// (and exits with an error, to be restarted): longer than the DaemonSet's termination
/// grace period (10 s).
pub const OWNER_EXIT_WAIT: Duration = Duration::from_secs(30);

/// An agent process: its pid and start time, which together tell it from a later process
/// that was given the same pid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub start_ticks: u64,
}

/// A running agent owns the pinned state: the starting one exits rather than corrupt it.
#[derive(Debug, thiserror::Error)]
#[error(
    "another connscope agent (pid {pid}) still runs with --bpf.pin-path {pin_path} after {waited:?}: \
     one agent per pin path (stop it, or give this one its own pin path)"
)]
pub struct OwnerStillRunning {
    pub pid: u32,
    pub pin_path: String,
    pub waited: Duration,
}

impl Owner {
    /// This agent.
    pub fn current() -> Option<Self> {
        Self::of(std::process::id())
    }

    /// The process `pid`, if it runs (an exited one not yet reaped, a zombie, does not).
    fn of(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (state, start_ticks) = state_and_start_ticks(&stat)?;
        (!matches!(state, "Z" | "X")).then_some(Self { pid, start_ticks })
    }

    pub fn is_running(&self) -> bool {
        Self::of(self.pid) == Some(*self)
    }

    /// The owner recorded in `state` (none before any agent recorded one).
    pub fn recorded(state: &Array<MapData, u64>) -> anyhow::Result<Option<Self>> {
        let pid = state.get(&(PinSlot::OwnerPid as u32), 0)?;
        let start_ticks = state.get(&(PinSlot::OwnerStartTicks as u32), 0)?;
        Ok((pid != 0).then_some(Self { pid: pid as u32, start_ticks }))
    }

    /// Records this owner in `state`.
    pub fn record<T: std::borrow::BorrowMut<MapData>>(
        &self,
        state: &mut Array<T, u64>,
    ) -> anyhow::Result<()> {
        state.set(PinSlot::OwnerPid as u32, u64::from(self.pid), 0)?;
        state.set(PinSlot::OwnerStartTicks as u32, self.start_ticks, 0)?;
        Ok(())
    }
}

/// Waits until `owner` (the pinned state's, if another process) has exited, at most
/// [`OWNER_EXIT_WAIT`].
pub fn wait_for_exit(owner: Option<Owner>, pin_path: &str) -> Result<(), OwnerStillRunning> {
    let Some(owner) = owner.filter(|owner| owner.pid != std::process::id()) else { return Ok(()) };
    let started = Instant::now();
    if !owner.is_running() {
        return Ok(());
    }
    tracing::warn!(
        pid = owner.pid,
        "another connscope agent runs the pinned state in {pin_path}: waiting for it to exit"
    );
    while owner.is_running() {
        let waited = started.elapsed();
        if waited > OWNER_EXIT_WAIT {
            return Err(OwnerStillRunning {
                pid: owner.pid,
                pin_path: pin_path.to_owned(),
                waited,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    tracing::info!(
        pid = owner.pid,
        waited_ms = started.elapsed().as_millis() as u64,
        "the previous agent exited: taking the pinned state over"
    );
    Ok(())
}

/// Fields 3 (`state`) and 22 (`starttime`) of `/proc/<pid>/stat`, counted after the command
/// name, which is in parentheses and may itself hold spaces and parentheses.
fn state_and_start_ticks(stat: &str) -> Option<(&str, u64)> {
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?;
    // `starttime` is the 20th field from `state` on.
    Some((state, fields.nth(18)?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_read_past_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (a) b (c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 \
                    1000 10 18446744073709551615";
        assert_eq!(state_and_start_ticks(stat), Some(("S", 987_654)));
        assert_eq!(state_and_start_ticks("4242 (short) S 1"), None);
        assert_eq!(state_and_start_ticks("no parenthesis"), None);
    }

    #[test]
    fn this_process_is_running_and_a_later_start_time_is_another_process() {
        let me = Owner::current().expect("/proc/self/stat");
        assert!(me.is_running());
        assert!(!Owner { start_ticks: me.start_ticks + 1, ..me }.is_running());
        assert!(wait_for_exit(Some(me), "/x").is_ok(), "an agent does not wait for itself");
    }

    #[test]
    fn an_exited_process_not_yet_reaped_is_not_running() -> anyhow::Result<()> {
        let mut child = std::process::Command::new("true").spawn()?;
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(5);
        // A zombie until reaped below: its /proc entry stays.
        while Owner::of(pid).is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(std::path::Path::new(&format!("/proc/{pid}/stat")).exists());
        assert_eq!(Owner::of(pid), None);
        child.wait()?;
        Ok(())
    }
}
