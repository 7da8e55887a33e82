//! Writing the `Open`, `Attribute`, `Progress` and `Close` records (heads are in `head`).
//! Records are reserved in the ring buffer and filled in place: no copy on the stack.

use core::mem::MaybeUninit;

use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_jiffies64, bpf_ktime_get_ns, generated,
};
use connscope_common::{
    AttributeEvent, Attribution, COMM_LEN, Conn, ConnectFailedEvent, ConnectFailure, EventHeader,
    EventKind, LostReason, OpenEvent, Role, SnapshotEvent,
};

use aya_ebpf::maps::ring_buf::RingBufEntry;

use crate::{
    fill,
    maps::{EVENTS, count_lost, submit_flags},
    sock::SocketView,
};

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// The kernel's jiffies (`bpf_jiffies64`, since 5.5), the clock of `icsk_ack.lrcvtime`.
#[inline(always)]
pub fn now_jiffies() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_jiffies64() }
}

/// The current task as the owner of a socket; only meaningful in process context.
#[inline(always)]
pub fn current_attribution() -> Attribution {
    Attribution {
        // SAFETY: helper without pointer arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        valid: 1,
        comm: current_comm(),
    }
}

/// The current task's name; zeros if the helper fails. Read into uninitialised stack
/// space: aya's wrapper zeroes its buffer first, a `memset` call (see `fill`).
#[inline(always)]
fn current_comm() -> [u8; COMM_LEN] {
    let mut comm = MaybeUninit::<[u8; COMM_LEN]>::uninit();
    // SAFETY: the helper writes `COMM_LEN` bytes (NUL-padded) into the buffer, whose
    // uninitialised memory the verifier accepts for it.
    let rc = unsafe { generated::bpf_get_current_comm(comm.as_mut_ptr().cast(), COMM_LEN as u32) };
    if rc != 0 {
        // SAFETY: the buffer's own bytes.
        unsafe { fill::zero(comm.as_mut_ptr().cast::<u8>(), COMM_LEN) };
    }
    // SAFETY: written in full, by the helper or just above.
    unsafe { comm.assume_init() }
}

/// Reserves a `T` in the ring buffer, lets `fill` write it, and submits it.
#[inline(always)]
fn emit<T: 'static>(fill: impl FnOnce(*mut T)) {
    let Some(mut entry) = EVENTS.reserve::<T>(0) else {
        count_lost(LostReason::RingbufFull);
        return;
    };
    fill(entry.as_mut_ptr());
    entry.submit(submit_flags());
}

/// Reserves and fills the `Open` record of a connection, unsubmitted: the caller submits it
/// once the connection is tracked, or discards it. Inlined: verifiers before 6.x do not know
/// that a reservation returned by a subprogram is non-NULL, and would report it leaked.
/// `connect_ns`: a client's handshake time (0: unknown).
#[inline(always)]
pub fn open(
    sock: u64,
    open_ns: u64,
    role: Role,
    view: &impl SocketView,
    owner: Option<&Attribution>,
    connect_ns: u64,
) -> Option<RingBufEntry<OpenEvent>> {
    let Some(mut entry) = EVENTS.reserve::<OpenEvent>(0) else {
        count_lost(LostReason::RingbufFull);
        return None;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: a reserved, exclusively owned record of the right size, written field by
    // field in place.
    let filled = unsafe {
        (*event).header = EventHeader::new(EventKind::Open, sock, open_ns);
        (*event).open_ns = open_ns;
        match owner {
            Some(owner) => (*event).attribution = *owner,
            None => fill::zero_words(&raw mut (*event).attribution),
        }
        (*event).role = role as u8;
        (*event).adopted = 0;
        fill::zero_array(&mut (*event)._pad);
        (*event).connect_ns = connect_ns;
        view.endpoints(&mut (*event).endpoints)
    };
    if !filled {
        entry.discard(0);
        return None;
    }
    Some(entry)
}

/// Sends the `ConnectFailed` record of a client socket that left `SYN_SENT` for `CLOSE`:
/// its endpoints, its process (when its connect was seen) and `reason`. Nothing is sent for
/// a socket whose endpoints cannot be read.
#[inline(always)]
pub fn connect_failed(
    sock: u64,
    view: &impl SocketView,
    owner: Option<&Attribution>,
    reason: ConnectFailure,
) {
    let Some(mut entry) = EVENTS.reserve::<ConnectFailedEvent>(0) else {
        count_lost(LostReason::RingbufFull);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: as in `open`.
    let filled = unsafe {
        (*event).header = EventHeader::new(EventKind::ConnectFailed, sock, now_ns());
        match owner {
            Some(owner) => (*event).attribution = *owner,
            None => fill::zero_words(&raw mut (*event).attribution),
        }
        fill::zero_array(&mut (*event)._pad);
        (*event).reason = reason as u8;
        view.endpoints(&mut (*event).endpoints)
    };
    if filled {
        entry.submit(submit_flags());
    } else {
        entry.discard(0);
    }
}

/// Marks a reserved `Open` record as an adopted connection's.
pub fn mark_adopted(entry: &mut RingBufEntry<OpenEvent>) {
    // SAFETY: a reserved record filled by `open`, owned by the caller.
    unsafe { (*entry.as_mut_ptr()).adopted = 1 };
}

pub fn attribute(sock: u64, conn: &Conn, owner: &Attribution) {
    emit::<AttributeEvent>(|event| {
        // SAFETY: as in `open`.
        unsafe {
            (*event).header = EventHeader::new(EventKind::Attribute, sock, now_ns());
            (*event).open_token = conn.open_token;
            (*event)._pad = 0;
            (*event).attribution = *owner;
        }
    });
}

/// `Progress` or `Close`: the connection's state now.
pub fn snapshot(kind: EventKind, sock: u64, conn: &Conn) {
    emit::<SnapshotEvent>(|event| {
        // SAFETY: as in `open`; `conn` points to a map value or a local, not into the record.
        unsafe {
            (*event).header = EventHeader::new(kind, sock, now_ns());
            core::ptr::copy_nonoverlapping(conn, &raw mut (*event).conn, 1);
        }
    });
}
