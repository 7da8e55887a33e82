//! The plaintext path at libssl's returns: decrypted TLS counted by the cleartext rules.

use connscope_common::{Direction, conn_flag};

use crate::{
    exchange::{self, Transfer},
    maps::UserBuffer,
    payload_source::PayloadSource,
    tls_calls,
    tracking::tracked,
};

/// TLS plaintext libssl moved for `sock` (the uprobes' return probe): counted by the same
/// rules as cleartext, reading `buffer`; its bytes were counted as ciphertext. By any
/// generation: the call was finished by the one return probe that removed it from the
/// shared `TLS_CALLS` (`tls_calls::finish`), and during a takeover a call entered under the
/// old programs returns through theirs only.
#[inline(always)]
pub fn plaintext(sock: u64, direction: Direction, bytes: u64, buffer: UserBuffer) {
    let Some(conn) = tracked(sock) else { return };
    if !conn.has(conn_flag::TLS_PLAINTEXT) {
        tls_calls::to_plaintext(conn);
    }
    let source = PayloadSource::Buffer(buffer);
    exchange::count(conn, &Transfer { sock, source, direction, bytes }, false);
}
