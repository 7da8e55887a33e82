//! Payload heads are whatever a process on the host sends: the HTTP/1.x head parsers must
//! never panic, and what they return stays within the bounds the metrics rely on.
#![no_main]

use connscope::pipeline::http;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for head in [http::parse_request(data), http::parse_response(data)].into_iter().flatten() {
        // At least one head, at most the pipelining bound (64), never more heads than
        // could fit in the bytes (a minimal head is "GET / HTTP/1.1\r\n\r\n"-like, > 4 bytes).
        assert!(head.count >= 1 && head.count <= 64, "count {}", head.count);
        assert!(head.count as usize <= data.len() / 4 + 1);
        let _ = head.wants_persistence();
        let _ = head.version.label();
    }
});
