//! libssl calls in flight, and which socket each `SSL*` writes to and reads from.
//!
//! The uprobes (`tls_uprobes`) stash each `SSL_read`/`SSL_write` (and `_ex`) call per thread
//! at entry. While the call runs, the kernel's send/receive hook sees the ciphertext on the
//! socket in the same thread ([`ciphertext`]), and switches the connection to plaintext
//! counting. A read records that socket in the stash; at its return the plaintext is counted
//! on it, or on the one `TLS_SOCKETS` remembers for the `SSL*` (a read served from libssl's
//! read-ahead buffer touches no socket). A write's plaintext is known at entry, so the hook
//! that sees its first ciphertext takes the call from the stash and has it counted there,
//! on that socket: writes need no return probe. `SSL_do_handshake` is stashed too, so the
//! handshake flights teach the mapping before the first read or write.

use core::mem::MaybeUninit;

use aya_ebpf::{helpers::bpf_get_current_pid_tgid, macros::map, maps::LruHashMap};
use connscope_common::{
    Conn, DEFAULT_MAX_CONNECTIONS, Direction, IN_FLIGHT_CALLS, Protocol, SslCall, conn_flag,
};

use crate::{decryption, fill, maps::UserBuffer};

/// libssl calls in progress, by pid_tgid. LRU: a thread that dies inside a call leaves its
/// entry behind, and such entries must not fill the map. Pinned with `TLS_SOCKETS`: both
/// generations' uprobes share them during a takeover, so a call entered under the old
/// programs is finished, once, by whichever return probe runs first ([`finish`]), or for a
/// write by whichever generation's send hook takes it first ([`take_write`]).
#[map]
pub static TLS_CALLS: LruHashMap<u64, SslCall> = LruHashMap::with_max_entries(IN_FLIGHT_CALLS, 0);

/// `SSL*` → socket, learnt from the calls' transfers. LRU: an `SSL*` freed without a word to
/// us ages out; a reused address is corrected by its first call that touches the socket.
#[map]
pub static TLS_SOCKETS: LruHashMap<u64, u64> =
    LruHashMap::with_max_entries(DEFAULT_MAX_CONNECTIONS, 0);

/// Stashes the current thread's call: `moved_out` for `SSL_read_ex`, `len` for writes
/// ([`SslCall`]).
#[inline(always)]
pub fn begin(ssl: u64, buf: u64, moved_out: u64, len: u64, direction: Direction) {
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
    call.len = len;
    call.direction = direction as u8;
    let _ = TLS_CALLS.insert(&bpf_get_current_pid_tgid(), &*call, 0);
}

/// What a transfer on a tracked socket is to the exchange rules ([`ciphertext`]).
#[derive(Clone, Copy)]
pub enum Ciphertext {
    /// Cleartext, or TLS no libssl call is seen for: counted by the exchange rules.
    No,
    /// Ciphertext whose plaintext is counted apart (a read's at its return): bytes only.
    Yes,
    /// The first ciphertext of an `SSL_write`: bytes, and the write's plaintext (this
    /// buffer), counted now on this socket.
    Write(UserBuffer),
}

/// For a transfer on tracked `sock` moving `direction`: whether it is ciphertext whose
/// plaintext the uprobes count (then it adds bytes only), and whether it is a write's first,
/// whose plaintext is counted with it. Plaintext protocols never look further than a flag
/// and a byte; TLS (and not yet sniffed) connections look up the thread's libssl call.
///
/// The keep-alive race is judged on the wire, when a write's ciphertext leaves: the write's
/// return can come after the peer's FIN (the peer may answer and close before the writer
/// runs again). Only `SSL_write`'s ciphertext counts: libssl's own records (`close_notify`
/// from `SSL_shutdown`, tickets) ask nothing. A write sent in several `tcp_sendmsg` calls is
/// judged at its first, the one that takes it from the stash: after that, nothing tells its
/// later sends from a `close_notify`. A connection not yet switched was judged as cleartext
/// (`transfer`).
#[inline(always)]
pub fn ciphertext(sock: u64, conn: &mut Conn, direction: Direction) -> Ciphertext {
    let switched = conn.has(conn_flag::TLS_PLAINTEXT);
    let protocol = conn.protocol;
    if !switched && protocol != Protocol::Tls as u8 && protocol != Protocol::Unknown as u8 {
        return Ciphertext::No;
    }
    // Without the uprobes no call is stashed: undecrypted TLS skips the lookups. (A
    // connection switched under an earlier agent's uprobes keeps its path below.)
    if !switched && !crate::globals::libssl_calls() {
        return Ciphertext::No;
    }
    if stays_ciphertext(conn) {
        return Ciphertext::No;
    }
    if switched && decryption::current_undecrypted() {
        // Its process left decryption: its calls still in flight are not counted, and the
        // connection goes on from its ciphertext.
        forget_call();
        to_ciphertext(conn);
        return Ciphertext::No;
    }
    // One call site: `take_write` is inlined once.
    if let Some(write) = if direction == Direction::Send { take_write(sock) } else { None } {
        if !switched {
            if decryption::current_undecrypted() {
                return Ciphertext::No;
            }
            to_plaintext(conn);
        } else if crate::sock::sent_after_peer_close(sock, conn) {
            conn.flags |= conn_flag::SENT_AFTER_PEER_CLOSE;
        }
        return written(write);
    }
    if switched {
        return Ciphertext::Yes;
    }
    if inside_call(sock) {
        if decryption::current_undecrypted() {
            forget_call();
            return Ciphertext::No;
        }
        to_plaintext(conn);
        return Ciphertext::Yes;
    }
    Ciphertext::No
}

/// Drops the current thread's libssl call: its return finds nothing to count.
#[inline(always)]
fn forget_call() {
    let _ = TLS_CALLS.remove(&bpf_get_current_pid_tgid());
}

/// A taken write's plaintext, if it has any (`SSL_write` with `num` ≤ 0 moves none).
#[inline(always)]
fn written(write: UserBuffer) -> Ciphertext {
    if write.len == 0 { Ciphertext::Yes } else { Ciphertext::Write(write) }
}

/// Takes the current thread's `SSL_write` from the stash when `sock`'s send is its
/// ciphertext, and returns its plaintext. Once per call: whoever removes the entry counts it
/// (during a takeover both generations' hooks may see the send), so a write sent in several
/// `tcp_sendmsg` calls counts at its first. The mapping of its `SSL*` is remembered as
/// [`finish`] does.
///
/// The entry stays until then: a write that sent nothing (an error, `SSL_ERROR_WANT_WRITE`
/// before any byte left, a memory BIO) is still stashed afterwards, until the thread's next
/// libssl call replaces it. Such a stale entry must not be counted on an unrelated socket
/// (an nginx worker's next upstream connection, another `SSL*`'s `close_notify`): an `SSL*`
/// whose socket is known is taken only on that socket, and on another one its entry is
/// dropped, uncounted. An `SSL*` not known yet is taken on the socket it is first seen on,
/// as a read is. (A reused `SSL*` address whose new connection no handshake call taught,
/// as with a handshake implicit in the first `SSL_write`, has its writes counted as
/// undecrypted TLS until a read corrects the mapping.)
///
/// A write that must be retried (`SSL_ERROR_WANT_WRITE`: OpenSSL wants the same buffer and
/// length again) after some of its ciphertext left was counted at that first part, and its
/// retry is counted again at its own first ciphertext. That changes no count: the retry
/// continues the turn the first attempt started (same direction), and the exchange rules
/// look at a turn's later transfers only while `REQUEST_PENDING` or `INTERIM` is set, where
/// reading the same bytes again decides the same (a body stays a body; a request line
/// cleared `REQUEST_PENDING` at the first attempt; an interim head sets `INTERIM` again, a
/// final one cleared it). The turn's last transfer is the retry, as it was when the return
/// probe counted. A transfer the other way counted between the attempt and its retry makes
/// the retry a turn of its own: on HTTP/1.x (which does that only after an early response
/// during a request body) its head is read as any turn's, and a body is no request; on a
/// full-duplex protocol (HTTP/2), where every turn is an exchange, it counts one more than
/// the return probe did. With `SSL_MODE_ENABLE_PARTIAL_WRITE` a turn counts the first
/// call's length, and the calls that write the rest continue it.
#[inline(always)]
fn take_write(sock: u64) -> Option<UserBuffer> {
    let key = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out before the entry is removed.
    let call = unsafe { TLS_CALLS.get(&key) }.copied()?;
    if call.direction != Direction::Send as u8 {
        return None;
    }
    TLS_CALLS.remove(&key).ok()?;
    // SAFETY: the value is copied out.
    match unsafe { TLS_SOCKETS.get(&call.ssl) }.copied() {
        Some(known) if known != sock => return None,
        Some(_) => {}
        None => {
            let _ = TLS_SOCKETS.insert(&call.ssl, &sock, 0);
        }
    }
    Some(UserBuffer { addr: call.buf, len: call.len })
}

/// Whether the current thread is inside a libssl read or handshake; records `sock` in its
/// stash. (A write's entry is taken by [`take_write`]; a receive inside a write, as in a
/// renegotiation, comes on a connection already switched to plaintext.)
#[inline(never)]
fn inside_call(sock: u64) -> bool {
    let Some(call) = TLS_CALLS.get_ptr_mut(&bpf_get_current_pid_tgid()) else { return false };
    // SAFETY: map value pointer from a successful lookup; the entry belongs to this thread.
    unsafe {
        if (*call).direction == Direction::Send as u8 {
            return false;
        }
        (*call).sock = sock;
    }
    true
}

/// Whether a connection is counted from its ciphertext for good: it counted an exchange
/// without plaintext, and switching now would start its plaintext in the middle of a turn,
/// under another protocol label.
#[inline(always)]
pub fn stays_ciphertext(conn: &Conn) -> bool {
    !conn.has(conn_flag::TLS_PLAINTEXT) && conn.exchanges != 0
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

/// Switches a decrypted connection back to counting its ciphertext, when its process left
/// decryption (the agent's budget): turns go on where the plaintext left them
/// (`last_direction` is kept), so the turn in progress is not counted twice, and the next
/// request-direction turn's first application-data record starts the next exchange. The
/// agent keeps the protocol label the connection had.
#[inline(always)]
fn to_ciphertext(conn: &mut Conn) {
    conn.flags &= !(conn_flag::TLS_PLAINTEXT | conn_flag::REQUEST_PENDING | conn_flag::INTERIM);
    conn.protocol = Protocol::Tls as u8;
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
