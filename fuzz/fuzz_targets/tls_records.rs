//! TLS records are whatever a process on the host sends: the record rule the kernel runs on
//! undecrypted TLS (`connscope_common::tls_record`) must never read outside the transfer,
//! must stay a handful of reads (the kernel's cost), and may only call a transfer a request
//! when an application-data record header says so. Every truncation of the input is tried
//! too (a transfer can end anywhere in a record).
#![no_main]

use std::cell::Cell;

use connscope_common::tls_record::{
    APPLICATION_DATA, CHANGE_CIPHER_SPEC, TransferBytes, carries_request,
};
use libfuzzer_sys::fuzz_target;

/// A transfer of `len` bytes; every read is checked against it and counted.
struct Transfer<'a> {
    data: &'a [u8],
    reads: Cell<u32>,
}

impl Transfer<'_> {
    fn read<const N: usize>(&self, offset: u64) -> Option<[u8; N]> {
        self.reads.set(self.reads.get() + 1);
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(N)?;
        assert!(end <= self.data.len(), "read of {N} at {offset} past {}", self.data.len());
        self.data[start..end].try_into().ok()
    }
}

impl TransferBytes for Transfer<'_> {
    fn byte_at(&self, offset: u64) -> Option<u8> {
        self.read::<1>(offset).map(|[byte]| byte)
    }
    fn header_at(&self, offset: u64) -> Option<[u8; 5]> {
        self.read(offset)
    }
}

fuzz_target!(|data: &[u8]| {
    for len in 0..=data.len().min(64) {
        let transfer = Transfer { data: &data[..len], reads: Cell::new(0) };
        let request = carries_request(&transfer, len as u64);
        assert!(transfer.reads.get() <= 4, "{} reads", transfer.reads.get());
        if request {
            match data[0] {
                APPLICATION_DATA => {}
                // The request is an application-data record after CCS and Finished.
                CHANGE_CIPHER_SPEC => {
                    assert!(data[1..len].contains(&APPLICATION_DATA), "{:?}", &data[..len])
                }
                other => panic!("record type {other:#x} called a request"),
            }
        }
    }
    let whole = Transfer { data, reads: Cell::new(0) };
    let _ = carries_request(&whole, data.len() as u64);
});
