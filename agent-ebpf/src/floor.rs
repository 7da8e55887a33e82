//! The benchmark's floor arm (`connscope bench-floor`): the same hooks as the tp_btf
//! backend, each program only looking the socket up and adding its bytes. What any
//! per-socket byte counter costs; connscope is measured against it.

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use connscope_common::tcp_state;

use crate::maps::FLOOR_BYTES;

#[inline(always)]
fn add_bytes(ctx: &BtfTracePointContext) {
    let sock: u64 = ctx.arg(0);
    let ret: i32 = ctx.arg(1);
    if ret > 0 {
        if let Some(bytes) = FLOOR_BYTES.get_ptr_mut(&sock) {
            // SAFETY: map value pointer from a successful lookup.
            unsafe { *bytes += ret as u64 };
        }
    }
}

#[btf_tracepoint(function = "sock_send_length")]
pub fn floor_sock_send(ctx: BtfTracePointContext) -> i32 {
    add_bytes(&ctx);
    0
}

#[btf_tracepoint(function = "sock_recv_length")]
pub fn floor_sock_recv(ctx: BtfTracePointContext) -> i32 {
    add_bytes(&ctx);
    0
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn floor_set_state(ctx: BtfTracePointContext) -> i32 {
    let sock: u64 = ctx.arg(0);
    let new: i32 = ctx.arg(2);
    if new == tcp_state::ESTABLISHED {
        let _ = FLOOR_BYTES.insert(&sock, &0, 0);
    } else {
        let _ = FLOOR_BYTES.get_ptr(&sock);
    }
    0
}

#[btf_tracepoint(function = "tcp_destroy_sock")]
pub fn floor_destroy(ctx: BtfTracePointContext) -> i32 {
    let sock: u64 = ctx.arg(0);
    let _ = FLOOR_BYTES.remove(&sock);
    0
}
