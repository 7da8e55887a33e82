//! Ring buffer records are bytes from the kernel: decoding any byte string must return an
//! event or an error, never panic or read out of bounds; a decoded event must re-encode to
//! the bytes it came from (open/close) or to a prefix-consistent turn record.
#![no_main]

use connscope::events::{self, Event};
use connscope_common::TURN_FIXED_LEN;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match events::decode(data) {
        Ok(Event::Open(event) | Event::Close(event)) => {
            assert_eq!(events::encode(&event), data);
        }
        Ok(Event::Turn(turn)) => {
            let head_len = turn.head_len as usize;
            assert_eq!(TURN_FIXED_LEN + head_len, data.len());
            assert_eq!(&events::encode(&*turn)[..data.len()], data);
        }
        Err(_) => {}
    }
});
