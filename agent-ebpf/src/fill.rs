//! Filling records and map values in place with plain stores: zeros, and endpoints.
//!
//! This toolchain lowers a zero-fill of more than a few bytes (a `Default` value, a zeroed
//! array, `write_bytes`) to a call to `memset`, which for the bpf target is a loop of five
//! instructions per byte: every new connection paid 97 bytes of it in its state-change
//! program. Volatile stores are kept as written; the optimiser does not merge them back
//! into a `memset`. Bottom layer: it imports nothing from the rest of the crate.

use connscope_common::{AF_INET, AF_INET6, Endpoints};

/// Zeroes the `count` values of `T` at `dst`.
///
/// # Safety
/// `dst` is valid for `count` aligned writes of `T`.
#[inline(always)]
pub unsafe fn zero<T: Default>(dst: *mut T, count: usize) {
    for index in 0..count {
        // SAFETY: in bounds and aligned, by the caller's contract.
        unsafe { dst.add(index).write_volatile(T::default()) };
    }
}

/// Zeroes every element of `array` (padding fields, byte buffers).
#[inline(always)]
pub fn zero_array<T: Default, const N: usize>(array: &mut [T; N]) {
    // SAFETY: the array's own elements.
    unsafe { zero(array.as_mut_ptr(), N) };
}

/// Zeroes a whole `T` with 8-byte stores.
///
/// # Safety
/// `dst` is valid for writing a `T`.
#[inline(always)]
pub unsafe fn zero_words<T>(dst: *mut T) {
    const { assert!(size_of::<T>().is_multiple_of(8) && align_of::<T>() >= 8) };
    // SAFETY: `T` is a whole number of aligned words (checked above).
    unsafe { zero(dst.cast::<u64>(), size_of::<T>() / 8) };
}

/// The addresses of a connection as the socket holds them: 4 bytes each for IPv4, 16 for
/// IPv6 (network order).
pub enum Addresses {
    V4 { local: [u8; 4], remote: [u8; 4] },
    V6 { local: [u8; 16], remote: [u8; 16] },
}

/// Writes every byte of `*out` (an IPv4 address's unused 12 bytes and the padding as zeros).
///
/// # Safety
/// `out` is valid for writing an `Endpoints`.
#[inline(always)]
pub unsafe fn endpoints(
    out: *mut Endpoints,
    local_port: u16,
    remote_port: u16,
    addresses: &Addresses,
) {
    // SAFETY: fields of a valid `Endpoints`; the address arrays start 8-aligned
    // (`Endpoints` is `align(8)`), so the word stores into them are aligned.
    unsafe {
        (*out).local_port = local_port;
        (*out).remote_port = remote_port;
        (*out)._pad = 0;
        match addresses {
            Addresses::V4 { local, remote } => {
                (*out).family = AF_INET;
                v4_address((&raw mut (*out).local_addr).cast(), *local);
                v4_address((&raw mut (*out).remote_addr).cast(), *remote);
            }
            Addresses::V6 { local, remote } => {
                (*out).family = AF_INET6;
                (*out).local_addr = *local;
                (*out).remote_addr = *remote;
            }
        }
    }
}

/// An IPv4 address in the first 4 bytes of a 16-byte field, zeros after it.
///
/// # Safety
/// `dst` is valid for 4 aligned `u32` writes.
#[inline(always)]
unsafe fn v4_address(dst: *mut u32, address: [u8; 4]) {
    // SAFETY: by the caller's contract; native order keeps the bytes in memory order.
    unsafe {
        dst.write_volatile(u32::from_ne_bytes(address));
        zero(dst.add(1), 3);
    }
}
