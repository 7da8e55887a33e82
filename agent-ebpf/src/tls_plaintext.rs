//! The plaintext libssl moved: decrypted TLS counted by the cleartext rules, a read's at its
//! return, a write's with its first ciphertext.

use connscope_common::{Direction, conn_flag};

use crate::{
    exchange::{self, Transfer},
    h2,
    maps::UserBuffer,
    payload_source::PayloadSource,
    tls_calls,
    tracking::tracked,
};

/// TLS plaintext libssl read for `sock` (the uprobes' return probe): counted by the same
/// rules as cleartext, reading `buffer`; its bytes were counted as ciphertext. By any
/// generation: the call was finished by the one return probe that removed it from the
/// shared `TLS_CALLS` (`tls_calls::finish`), and during a takeover a call entered under the
/// old programs returns through theirs only.
#[inline(always)]
pub fn plaintext(sock: u64, direction: Direction, buffer: UserBuffer) {
    let Some(conn) = tracked(sock) else { return };
    if tls_calls::stays_ciphertext(conn) {
        return;
    }
    if !conn.has(conn_flag::TLS_PLAINTEXT) {
        tls_calls::to_plaintext(conn);
    }
    exchange::count(conn, &transfer(sock, direction, buffer), false);
    h2::walk_pending(conn);
}

/// The transfer that counts `buffer`, the plaintext libssl moved for `sock`: at a read's
/// return ([`plaintext`]), or in the send hook that sees a write's first ciphertext (the
/// call taken from `TLS_CALLS` by `tls_calls::ciphertext`, once, by whichever generation's
/// hook removed it), on the connection that hook holds.
#[inline(always)]
pub fn transfer(sock: u64, direction: Direction, buffer: UserBuffer) -> Transfer {
    Transfer { sock, source: PayloadSource::Buffer(buffer), direction, bytes: buffer.len }
}
