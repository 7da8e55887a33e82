//! Which sockets are tracked: whether these programs count at all, a socket's `CONNS`
//! entry, a new entry's state, and process attribution (only ever taken in the owning
//! process's context: `connect()` for clients, the first read/write/close call for accepted
//! sockets, never a state change that may run in softirq for another task).

use connscope_common::{
    Conn, PinSlot, Role, conn::open_token, conn_flag, kernel_config::ORPHANED_GENERATION,
};

use crate::{
    fill,
    globals::generation,
    maps::{CONN_SCRATCH, CONNS, PIN_STATE},
    records::{self, current_attribution},
};

/// `BPF_NOEXIST`: insert only if the key is absent.
pub const NOEXIST: u64 = 1;

/// Whether these programs are the ones that count. With pinned state two agents' programs
/// are attached during a takeover; only the generation in `PIN_STATE` runs (one array
/// lookup; none when nothing is pinned, a frozen global the verifier folds).
#[inline(always)]
pub fn active() -> bool {
    let generation = generation();
    generation == 0
        || PIN_STATE
            .get(PinSlot::ActiveGeneration as u32)
            .is_some_and(|active| *active == generation)
}

/// Whether the pinned state outlived its agent at `now`: no agent wrote the heartbeat
/// (`PinSlot::Heartbeat`) for `PinSlot::OrphanAfterNs` (`PINNED_STATE_MAX_AGE_NS`), so no
/// successor will use what these programs count (it replaces state that old) and they
/// would only cost the host.
/// The first program to find it so turns every generation off ([`ORPHANED_GENERATION`]):
/// from then on each hook returns after [`active`]'s lookup. Checked where tracking
/// starts, which reads the clock anyway, so the other hooks pay nothing for it.
#[inline(always)]
pub fn orphaned_at(now: u64) -> bool {
    if generation() == 0 {
        return false;
    }
    let Some(beat) = PIN_STATE.get(PinSlot::Heartbeat as u32).copied() else { return false };
    let Some(limit) = PIN_STATE.get(PinSlot::OrphanAfterNs as u32).copied() else {
        return false;
    };
    if beat == 0 || limit == 0 || now.saturating_sub(beat) <= limit {
        return false;
    }
    if let Some(active) = PIN_STATE.get_ptr_mut(PinSlot::ActiveGeneration as u32) {
        // SAFETY: map value pointer from a successful lookup.
        unsafe { *active = ORPHANED_GENERATION };
    }
    true
}

/// Whether orphaned pinned programs turned every generation off ([`orphaned_at`]): for
/// the hooks that also run while inactive (a transfer's exit counts by stream position
/// during a takeover), which must stop too.
#[inline(always)]
pub fn turned_off() -> bool {
    PIN_STATE
        .get(PinSlot::ActiveGeneration as u32)
        .is_some_and(|active| *active == ORPHANED_GENERATION)
}

/// A new connection's state, built in this CPU's scratch space (a `Conn` literal would be
/// built on the small stack first) until the caller's insert copies it.
#[inline(always)]
pub fn new_conn(open_ns: u64, role: Role, flags: u16) -> Option<&'static mut Conn> {
    let conn = CONN_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch slot, zeroed in place and used only by this program.
    let conn = unsafe {
        fill::zero_words(conn);
        &mut *conn
    };
    conn.open_token = open_token(open_ns);
    conn.last_ns = open_ns;
    conn.role = role as u8;
    conn.flags = flags;
    Some(conn)
}

/// The tracked connection of `sock`.
#[inline(always)]
pub fn tracked(sock: u64) -> Option<&'static mut Conn> {
    let conn = CONNS.get_ptr_mut(&sock)?;
    // SAFETY: map value pointer from a successful lookup; entries are only removed by
    // `lifecycle::on_destroy` for the same socket, which the socket's owner serialises with us.
    Some(unsafe { &mut *conn })
}

/// Called from any hook that runs in the owning process's context (send, receive, close).
#[inline(always)]
pub fn on_process_context(sock: u64) {
    if active() {
        process_context(sock);
    }
}

#[inline(always)]
pub fn process_context(sock: u64) {
    if let Some(conn) = tracked(sock) {
        attribute_once(sock, conn);
    }
}

#[inline(always)]
pub fn attribute_once(sock: u64, conn: &mut Conn) {
    if conn.flags & conn_flag::ATTRIBUTED == 0 {
        conn.flags |= conn_flag::ATTRIBUTED;
        records::attribute(sock, conn, &current_attribution());
    }
}
