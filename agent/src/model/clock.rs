//! The kernel's clock as userspace reads it: records and map values carry
//! `bpf_ktime_get_ns()` times, which are `CLOCK_MONOTONIC`.

/// `CLOCK_MONOTONIC` (the kernel's `bpf_ktime_get_ns()` clock) in ns.
pub fn monotonic_ns() -> u64 {
    read(libc::CLOCK_MONOTONIC)
}

/// `CLOCK_MONOTONIC_COARSE` in ns: the same clock at the last tick (a few ms behind), read
/// without the time source, for checks on the per-record path that only need seconds.
pub fn coarse_monotonic_ns() -> u64 {
    read(libc::CLOCK_MONOTONIC_COARSE)
}

fn read(clock: libc::clockid_t) -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: plain syscall with a pointer to a local struct.
    unsafe { libc::clock_gettime(clock, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}
