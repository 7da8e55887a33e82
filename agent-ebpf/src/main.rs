//! connscope kernel programs. Layers, bottom-up (no module imports one above it):
//!
//! 1. `maps`, `globals`, `fill`: every map, the values the agent writes before loading, and
//!    in-place fills of records and map values with plain stores; `decryption`, the
//!    budget's per-process hit counts and the processes left undecrypted.
//! 2. `sock`, `syscall_args`, `syscall_stash`, `fd_socket`, `payload_source`: reading the
//!    socket, the current system call's user buffer (or a library's), a descriptor's socket.
//! 3. `records`, `head`, `tls_calls`: writing records; reading and sending
//!    heads; libssl calls in flight and their sockets.
//! 4. The per-socket state machine, in three tiers:
//!    - `exchange` (the exchange rules a `Transfer` is counted by) and `tracking` (whether
//!      these programs count, a socket's `CONNS` entry, process attribution);
//!    - `lifecycle` (open, close, resets, destruction), `adopt` (untracked sockets, at
//!      their first transfer), `tls_plaintext` (the plaintext at libssl's returns);
//!    - `transfer`: the common tail of every send/receive backend.
//! 5. One thin file per hook backend, translating its arguments: `tp_btf`, `tracepoint`,
//!    `fentry`, `kprobe`, `syscall_exit`, `tls_uprobes`; `floor`, the benchmark's floor
//!    arm; and `adoption_start`, run once by the agent before it attaches the rest.
#![no_std]
#![no_main]
// aya-ebpf's maps take `impl Borrow<K>`: references keep keys and values where they are; and
// nested `if let`s keep the verifier-sensitive control flow as written. Code generation
// for the bpf target is what these files are checked for (the VM tier), not host lints.
#![allow(clippy::needless_borrows_for_generic_args, clippy::collapsible_if)]

mod adopt;
mod adoption_start;
mod decryption;
mod exchange;
mod fd_socket;
mod fentry;
mod fill;
mod floor;
mod globals;
mod h2;
mod head;
mod kprobe;
mod lifecycle;
mod maps;
mod payload_source;
mod records;
mod sock;
mod syscall_args;
mod syscall_exit;
mod syscall_stash;
mod tls_calls;
mod tls_hello;
mod tls_plaintext;
mod tls_uprobes;
mod tp_btf;
mod tracepoint;
mod tracking;
mod transfer;

// Host builds (clippy) link a dependency's std, which has its own handler.
#[cfg(all(not(test), target_arch = "bpf"))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic, so this is dead code.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
