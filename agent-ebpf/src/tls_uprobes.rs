//! libssl uprobes (`--tls.uprobes`): `SSL_write`, `SSL_write_ex`, `SSL_read`, `SSL_read_ex`
//! and `SSL_do_handshake` (OpenSSL 1.1 and 3; the same prototypes). Entries stash the call
//! (`tls_calls`). A write's plaintext is known at entry (`buf`, `num`): the send hook that
//! sees its first ciphertext counts it (`tls_calls::ciphertext`), so writes have no return
//! probe. A read's byte count exists only at its return: one return probe, attached to the
//! reads and `SSL_do_handshake`, counts the plaintext the call read on its socket
//! (`tls_plaintext::plaintext`) and remembers the handshake's socket. Prototypes
//! (`ssl/ssl_lib.c`): `int SSL_write(SSL *s, const void *buf, int num)`,
//! `int SSL_write_ex(SSL *s, const void *buf, size_t num, size_t *written)`, and the same
//! for `SSL_read`/`SSL_read_ex`; `_ex` return 1 on success, the others the byte count.

use aya_ebpf::{
    helpers::bpf_probe_read_user,
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use connscope_common::Direction;

use crate::{decryption, maps::UserBuffer, tls_calls, tls_plaintext};

/// `SSL_write(s, buf, int num)`: a negative `num` writes nothing.
#[uprobe]
pub fn connscope_ssl_write(ctx: ProbeContext) -> u32 {
    decryption::count_hit();
    let num = ctx.arg::<i32>(2).and_then(|num| u64::try_from(num).ok());
    write(&ctx, num);
    0
}

/// `SSL_write_ex(s, buf, size_t num, written)`.
#[uprobe]
pub fn connscope_ssl_write_ex(ctx: ProbeContext) -> u32 {
    decryption::count_hit();
    write(&ctx, ctx.arg::<u64>(2));
    0
}

#[uprobe]
pub fn connscope_ssl_read(ctx: ProbeContext) -> u32 {
    decryption::count_hit();
    read(&ctx, false);
    0
}

#[uprobe]
pub fn connscope_ssl_read_ex(ctx: ProbeContext) -> u32 {
    decryption::count_hit();
    read(&ctx, true);
    0
}

/// `int SSL_do_handshake(SSL *s)` (`SSL_accept` and `SSL_connect` call it): its flights
/// tell the socket of the `SSL*` before any read or write.
#[uprobe]
pub fn connscope_ssl_do_handshake(ctx: ProbeContext) -> u32 {
    decryption::count_hit();
    if let Some(ssl) = ctx.arg::<u64>(0) {
        tls_calls::begin(ssl, 0, 0, 0, Direction::None);
    }
    0
}

/// A write, stashed with its length (0 when none can be counted).
#[inline(always)]
fn write(ctx: &ProbeContext, num: Option<u64>) {
    let (Some(ssl), Some(buf)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) else { return };
    tls_calls::begin(ssl, buf, 0, num.unwrap_or(0), Direction::Send);
}

#[inline(always)]
fn read(ctx: &ProbeContext, ex: bool) {
    let (Some(ssl), Some(buf)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) else { return };
    let moved_out = if ex { ctx.arg::<u64>(3).unwrap_or(0) } else { 0 };
    if ex && moved_out == 0 {
        return;
    }
    tls_calls::begin(ssl, buf, moved_out, 0, Direction::Recv);
}

/// The return of `SSL_read`, `SSL_read_ex` and `SSL_do_handshake`.
#[uretprobe]
pub fn connscope_ssl_return(ctx: RetProbeContext) -> u32 {
    decryption::count_hit();
    let Some((call, sock)) = tls_calls::finish() else { return 0 };
    if call.direction != Direction::Recv as u8 || sock == 0 || call.buf == 0 {
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
        tls_plaintext::plaintext(sock, Direction::Recv, UserBuffer { addr: call.buf, len: bytes });
    }
    0
}

/// The agent's own calibration target's entry: what a hit costs beyond the program (the
/// trap and the kernel's uprobe work) is what the budget prices, so this one only counts.
#[uprobe]
pub fn connscope_calibration_entry(_ctx: ProbeContext) -> u32 {
    decryption::count_hit();
    0
}

/// The calibration target's return: a return probe costs more than an entry (a second
/// trap), and the reads pay both.
#[uretprobe]
pub fn connscope_calibration_return(_ctx: RetProbeContext) -> u32 {
    decryption::count_hit();
    0
}
