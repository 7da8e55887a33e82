//! The first hello of each direction of an undecrypted TLS connection, sent to the agent as
//! a `Head` of content `TlsHello` for its ALPN (does the connection speak HTTP/2?): the
//! ClientHello in the request direction, the ServerHello in the response one, each once
//! (`conn_flag::HELLO_PENDING_REQUEST`/`_RESPONSE`, set when the connection is sniffed as
//! TLS). A lone 5-byte record header (OpenSSL and BoringSSL read a record's header, then its
//! body) leaves the direction pending: the hello is its next transfer.
//!
//! The read and the send run in [`connscope_tls_hello`], a global function the kernel
//! verifies once per program, apart from its callers' states, and called from one place:
//! the hook's own body once the transfer is counted, as the HTTP/2 walk is. The agent's
//! start on 5.10 under emulation (every program verified): 10.5 s without the hellos,
//! 11.9 s with them (11.2 s with them inlined at three places of the exchange rules).

use aya_ebpf::helpers::bpf_probe_read_kernel;
use connscope_common::{
    Conn, Direction, HeadContent, Protocol, conn_flag, is_request, tls_record::RECORD_HEADER,
};

use crate::{head, maps::CONNS, payload_source::PayloadSource, records::now_ns};

/// The pending flag of the hellos that move in `direction` on `conn`.
#[inline(always)]
fn pending_flag(conn: &Conn, direction: Direction) -> Option<u16> {
    let request = is_request(conn.role()?, direction);
    Some(if request { conn_flag::HELLO_PENDING_REQUEST } else { conn_flag::HELLO_PENDING_RESPONSE })
}

/// Sends the system call's transfer of `bytes` in `direction` as `sock`'s hello, when one is
/// pending in that direction. A flag test and a compare for every other transfer.
#[inline(always)]
pub fn send_pending(sock: u64, conn: &Conn, direction: Direction, bytes: u64) {
    if conn.protocol != Protocol::Tls as u8 || bytes <= RECORD_HEADER {
        return;
    }
    if pending_flag(conn, direction).is_some_and(|flag| conn.has(flag)) {
        // A global function takes scalars only, and the verifier still types a BTF hook's
        // socket pointer as one once cast to an integer ("R1 is not a scalar" on 5.10): a
        // copy through a helper is a scalar.
        // SAFETY: reading a local.
        let Ok(sock) = (unsafe { bpf_probe_read_kernel(&sock) }) else { return };
        connscope_tls_hello(sock, direction as u64, bytes);
    }
}

/// Reads the current system call's payload (`PayloadSource::Syscall`) and sends it as the
/// hello of `sock` in `direction` (a `Direction` as `u64`); the direction is done with, sent
/// or not (an unreadable hello is not read again).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn connscope_tls_hello(sock: u64, direction: u64, bytes: u64) -> i64 {
    let Some(conn) = CONNS.get_ptr_mut(&sock) else { return 0 };
    // SAFETY: the map value of this socket; the caller is done with its own reference.
    let conn = unsafe { &mut *conn };
    let direction =
        if direction == Direction::Send as u64 { Direction::Send } else { Direction::Recv };
    let Some(flag) = pending_flag(conn, direction) else { return 0 };
    conn.flags &= !flag;
    let Some(head) = head::read(PayloadSource::Syscall, direction, bytes) else { return 0 };
    let request = flag == conn_flag::HELLO_PENDING_REQUEST;
    head::send(sock, conn, head, request, HeadContent::TlsHello, now_ns());
    0
}
