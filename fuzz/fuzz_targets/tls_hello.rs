//! A TLS hello is whatever a process on the host sends: the agent's ALPN walk
//! (`connscope::pipeline::tls_hello`) runs on the first bytes of an undecrypted TLS
//! connection's first transfer in each direction. It must never panic, on a hello cut
//! anywhere (heads are cut at 512 bytes), and may only say HTTP/2 when the bytes hold the
//! ALPN name `h2`.
#![no_main]

use connscope::pipeline::tls_hello::h2_verdict;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for len in 0..=data.len().min(600) {
        let head = &data[..len];
        if h2_verdict(head).is_some() {
            assert!(head.windows(3).any(|w| w == b"\x02h2"), "h2 from {head:?}");
        }
    }
});
