//! libssl calls in flight, and which socket each `SSL*` writes to and reads from.
//!
//! The uprobes (`tls_uprobes`) stash each `SSL_read`/`SSL_write` (and `_ex`) call per thread
//! at entry. While the call runs, the kernel's send/receive hook sees the ciphertext on the
//! socket in the same thread: [`ciphertext`] records that socket in the stash and switches
//! the connection to plaintext counting. At return the plaintext is counted on that socket,
//! or on the one `TLS_SOCKETS` remembers for the `SSL*` (a read served from libssl's
//! read-ahead buffer touches no socket). `SSL_do_handshake` is stashed too, so the handshake
//! flights teach the mapping before the first read.

use core::mem::MaybeUninit;

use aya_ebpf::{helpers::bpf_get_current_pid_tgid, macros::map, maps::LruHashMap};
use connscope_common::{
    Conn, DEFAULT_MAX_CONNECTIONS, Direction, IN_FLIGHT_CALLS, Protocol, SslCall, conn_flag,
};

use crate::fill;

/// libssl calls in progress, by pid_tgid. LRU: a thread that dies inside a call leaves its
/// entry behind, and such entries must not fill the map. Pinned with `TLS_SOCKETS`: both
/// generations' uprobes share them during a takeover, so a call entered under the old
/// programs is finished, once, by whichever return probe runs first ([`finish`]).
#[map]
pub static TLS_CALLS: LruHashMap<u64, SslCall> = LruHashMap::with_max_entries(IN_FLIGHT_CALLS, 0);

/// `SSL*` → socket, learnt from the calls' transfers. LRU: an `SSL*` freed without a word to
/// us ages out; a reused address is corrected by its first call that touches the socket.
#[map]
pub static TLS_SOCKETS: LruHashMap<u64, u64> =
    LruHashMap::with_max_entries(DEFAULT_MAX_CONNECTIONS, 0);

/// Stashes the current thread's call.
#[inline(always)]
pub fn begin(ssl: u64, buf: u64, moved_out: u64, direction: Direction) {
    // Zeroed with word stores, then filled: a literal's zero padding is a `memset` call.
    let mut call = MaybeUninit::<SslCall>::uninit();
    // SAFETY: a local, zeroed whole before it is read.
    let call = unsafe {
        fill::zero_words(call.as_mut_ptr());
        call.assume_init_mut()
    };
    call.ssl = ssl;
    call.buf = buf;
    call.moved_out = moved_out;
    call.direction = direction as u8;
    let _ = TLS_CALLS.insert(&bpf_get_current_pid_tgid(), &*call, 0);
}

/// For a transfer on tracked `sock` moving `direction`: whether it is ciphertext whose
/// plaintext the uprobes count (then it adds bytes only). Plaintext protocols never look
/// further than a flag and a byte; TLS (and not yet sniffed) connections look up the
/// thread's libssl call.
#[inline(always)]
pub fn ciphertext(sock: u64, conn: &mut Conn, direction: Direction) -> bool {
    if conn.has(conn_flag::TLS_PLAINTEXT) {
        if direction == Direction::Send && crate::sock::sent_after_peer_close(sock, conn) {
            ssl_write_after_peer_close(conn);
        }
        return true;
    }
    let protocol = conn.protocol;
    (protocol == Protocol::Tls as u8 || protocol == Protocol::Unknown as u8)
        && inside_call(sock, conn)
}

/// The keep-alive race is judged on the wire, when the ciphertext leaves: the plaintext's
/// return can come after the peer's FIN (the peer may answer and close before the writer
/// runs again). Only `SSL_write`'s ciphertext counts: libssl's own records (`close_notify`
/// from `SSL_shutdown`, tickets) ask nothing.
#[inline(never)]
fn ssl_write_after_peer_close(conn: &mut Conn) {
    // SAFETY: the value is copied out.
    let call = unsafe { TLS_CALLS.get(&bpf_get_current_pid_tgid()) }.copied();
    if call.is_some_and(|call| call.direction == Direction::Send as u8) {
        conn.flags |= conn_flag::SENT_AFTER_PEER_CLOSE;
    }
}

#[inline(never)]
fn inside_call(sock: u64, conn: &mut Conn) -> bool {
    let Some(call) = TLS_CALLS.get_ptr_mut(&bpf_get_current_pid_tgid()) else { return false };
    // SAFETY: map value pointer from a successful lookup; the entry belongs to this thread.
    unsafe { (*call).sock = sock };
    to_plaintext(conn);
    true
}

/// Switches a connection to plaintext counting: what the undecrypted-TLS rules were waiting
/// for no longer applies, and the plaintext's first transfer starts a turn.
#[inline(always)]
pub fn to_plaintext(conn: &mut Conn) {
    conn.flags = (conn.flags & !(conn_flag::REQUEST_PENDING | conn_flag::INTERIM))
        | conn_flag::TLS_PLAINTEXT;
    conn.protocol = Protocol::Unknown as u8;
    conn.last_direction = Direction::None as u8;
}

/// Ends the current thread's call and returns it, with the socket it belongs to (0 when
/// none is known). A socket seen in the call is remembered for the `SSL*`.
#[inline(always)]
pub fn finish() -> Option<(SslCall, u64)> {
    let key = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out before the entry is removed.
    let call = unsafe { TLS_CALLS.get(&key) }.copied()?;
    // Only the return probe that removes the call counts it: during a takeover both
    // generations' probes may return from one call.
    TLS_CALLS.remove(&key).ok()?;
    if call.sock == 0 {
        // SAFETY: the value is copied out.
        let sock = unsafe { TLS_SOCKETS.get(&call.ssl) }.copied().unwrap_or(0);
        return Some((call, sock));
    }
    // SAFETY: as above.
    if unsafe { TLS_SOCKETS.get(&call.ssl) }.copied() != Some(call.sock) {
        let _ = TLS_SOCKETS.insert(&call.ssl, &call.sock, 0);
    }
    Some((call, call.sock))
}
