//! libssl uprobes (`--tls.uprobes`): `SSL_write`, `SSL_write_ex`, `SSL_read`, `SSL_read_ex`
//! and `SSL_do_handshake` (OpenSSL 1.1 and 3; the same prototypes). Entries stash the call
//! (`tls_calls`); one return probe, attached to all five, counts the plaintext the call moved
//! on its socket (`tls_plaintext::plaintext`). Prototypes (`ssl/ssl_lib.c`):
//! `int SSL_write(SSL *s, const void *buf, int num)`,
//! `int SSL_write_ex(SSL *s, const void *buf, size_t num, size_t *written)`, and the same
//! for `SSL_read`/`SSL_read_ex`; `_ex` return 1 on success, the others the byte count.

use aya_ebpf::{
    helpers::bpf_probe_read_user,
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use connscope_common::Direction;

use crate::{maps::UserBuffer, tls_calls, tls_plaintext};

#[uprobe]
pub fn connscope_ssl_write(ctx: ProbeContext) -> u32 {
    enter(&ctx, Direction::Send, false);
    0
}

#[uprobe]
pub fn connscope_ssl_write_ex(ctx: ProbeContext) -> u32 {
    enter(&ctx, Direction::Send, true);
    0
}

#[uprobe]
pub fn connscope_ssl_read(ctx: ProbeContext) -> u32 {
    enter(&ctx, Direction::Recv, false);
    0
}

#[uprobe]
pub fn connscope_ssl_read_ex(ctx: ProbeContext) -> u32 {
    enter(&ctx, Direction::Recv, true);
    0
}

/// `int SSL_do_handshake(SSL *s)` (`SSL_accept` and `SSL_connect` call it): its flights
/// tell the socket of the `SSL*` before any read.
#[uprobe]
pub fn connscope_ssl_do_handshake(ctx: ProbeContext) -> u32 {
    if let Some(ssl) = ctx.arg::<u64>(0) {
        tls_calls::begin(ssl, 0, 0, Direction::None);
    }
    0
}

#[inline(always)]
fn enter(ctx: &ProbeContext, direction: Direction, ex: bool) {
    let (Some(ssl), Some(buf)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) else { return };
    let moved_out = if ex { ctx.arg::<u64>(3).unwrap_or(0) } else { 0 };
    if ex && moved_out == 0 {
        return;
    }
    tls_calls::begin(ssl, buf, moved_out, direction);
}

#[uretprobe]
pub fn connscope_ssl_return(ctx: RetProbeContext) -> u32 {
    let Some((call, sock)) = tls_calls::finish() else { return 0 };
    let direction = match Direction::from_wire(call.direction) {
        Some(direction @ (Direction::Send | Direction::Recv)) => direction,
        _ => return 0,
    };
    if sock == 0 || call.buf == 0 {
        return 0;
    }
    let ret = ctx.ret::<i32>();
    let bytes = if call.moved_out != 0 {
        if ret != 1 {
            return 0;
        }
        // SAFETY: user memory of the calling thread, read through the fault-tolerant helper.
        unsafe { bpf_probe_read_user(call.moved_out as *const u64) }.unwrap_or(0)
    } else if ret > 0 {
        ret as u64
    } else {
        0
    };
    if bytes != 0 {
        tls_plaintext::plaintext(sock, direction, bytes, UserBuffer { addr: call.buf, len: bytes });
    }
    0
}
