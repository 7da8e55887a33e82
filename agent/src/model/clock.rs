//! The kernel's clock as userspace reads it: records and map values carry
//! `bpf_ktime_get_ns()` times, which are `CLOCK_MONOTONIC`.

/// `CLOCK_MONOTONIC` (the kernel's `bpf_ktime_get_ns()` clock) in ns.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: plain syscall with a pointer to a local struct.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}
