//! Adoption of untracked sockets: an established TCP connection that predates the agent
//! (or whose `Open` was lost) is tracked from its first send or receive.

use connscope_common::{Conn, Direction, LostReason, PinSlot, Role, conn_flag, tcp_state};

use crate::{
    exchange::{self, Transfer},
    maps::{CONNS, LISTEN_PORTS, PIN_STATE, count_lost, submit_flags},
    payload_source::PayloadSource,
    records::{self, current_attribution, now_jiffies, now_ns},
    sock::{self, BtfSocket, state_and_port},
    tracking::{NOEXIST, new_conn, tracked},
};

const ESTABLISHED: u8 = tcp_state::ESTABLISHED as u8;

/// Adopts an untracked TCP socket at its first send or receive: an established connection
/// that predates the agent (or whose `Open` was lost). Its role comes from `LISTEN_PORTS`
/// (server when its local port listens in its namespace), its process from the caller's
/// context. Payload on a socket that cannot be adopted (another state, no BTF offsets, a
/// full map) is counted as `untracked_socket` (or `map_full`). Runs once per socket: out of
/// line, so the tracked path stays small. `direction` is the call's.
#[inline(never)]
pub fn adopt(sock: u64, direction: Direction) -> Option<&'static mut Conn> {
    let Some((_, key)) = state_and_port(sock).filter(|(state, _)| *state == ESTABLISHED) else {
        count_lost(LostReason::UntrackedSocket);
        return None;
    };
    let role = if LISTEN_PORTS.get_ptr(&key).is_some() { Role::Server } else { Role::Client };
    let open_ns = now_ns();
    let owner = current_attribution();
    let mut open = records::open(sock, open_ns, role, &BtfSocket { sock }, Some(&owner), 0)?;
    records::mark_adopted(&mut open);
    let Some(conn) = new_conn(open_ns, role, conn_flag::ATTRIBUTED | conn_flag::ADOPTED) else {
        open.discard(0);
        return None;
    };
    // NOEXIST: another CPU may have adopted it first; that one stands.
    if CONNS.insert(&sock, &*conn, NOEXIST).is_err() {
        open.discard(0);
        if CONNS.get_ptr(&sock).is_none() {
            count_lost(LostReason::MapFull);
        }
        return tracked(sock);
    }
    open.submit(submit_flags());
    let conn = tracked(sock)?;
    if role == Role::Server && direction == Direction::Send {
        request_read_in_flight_at_start(sock, conn);
    }
    Some(conn)
}

/// A server end adopted at its response: the receive that read its request was not seen.
/// With fexit or kretprobe receive hooks, a call already in progress when the agent
/// attached never passes through them (a server blocked waiting for its next request); on
/// any backend, a receive may end between the agent's start and its attach. When the
/// socket's last data arrived after the agent started (`PinSlot::AdoptionStartJiffies`),
/// that receive read this response's request: counted as the turn no program saw, by
/// direction change (its head is gone), so every backend reports the same exchanges.
#[inline(never)]
fn request_read_in_flight_at_start(sock: u64, conn: &mut Conn) {
    let start = PIN_STATE.get(PinSlot::AdoptionStartJiffies as u32).copied().unwrap_or(0);
    let now = now_jiffies();
    if start == 0 || now < start || !sock::data_received_within(sock, now, now - start) {
        return;
    }
    let source = PayloadSource::Unreadable;
    exchange::count(conn, &Transfer { sock, source, direction: Direction::Recv, bytes: 0 }, false);
}
