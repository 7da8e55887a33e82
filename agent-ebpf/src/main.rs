//! connscope kernel programs.
//!
//! `conn` holds the per-socket state machine; the other modules are thin entry points that
//! feed it from one kind of hook each. The agent chooses, per hook, which entry point to
//! attach (fentry where the kernel allows, kprobes otherwise, tracepoints as the fallback).
#![no_std]
#![no_main]

mod btf_tracepoints;
mod conn;
mod fentry;
mod kprobes;
mod maps;
mod payload;
mod tracepoints;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic, so this is dead code.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
