//! HTTP/2 frames are whatever a process on the host sends: the frame walk the kernel runs on
//! every transfer of an HTTP/2 connection (`connscope_common::h2_frames`) must never read
//! outside the segment it walks, must stay within its step bound, and may only count
//! streams a client `HEADERS` opened. The input is cut into segments at the positions its
//! first bytes choose (a transfer and an iovec can end anywhere in a frame).
#![no_main]

use connscope_common::h2_frames::{
    FRAME_HEADER, FrameBytes, H2State, MAX_STEPS_PER_TRANSFER, Unit, frame_type, walk,
};
use libfuzzer_sys::fuzz_target;

/// A segment; every read is checked against it.
struct Segment<'a>(&'a [u8]);

impl FrameBytes for Segment<'_> {
    fn read_into(&self, offset: u64, len: u64, out: &mut [u8; FRAME_HEADER]) -> bool {
        assert!((1..=FRAME_HEADER as u64).contains(&len), "read of {len} bytes");
        let start = usize::try_from(offset).expect("offset");
        let end = start + len as usize;
        assert!(end <= self.0.len(), "read of {len} at {offset} past {}", self.0.len());
        out[..len as usize].copy_from_slice(&self.0[start..end]);
        true
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&cuts, data)) = data.split_first() else { return };
    let mut state = H2State::default();
    state.start_at_preface();
    let mut steps = MAX_STEPS_PER_TRANSFER;
    let mut headers = 0u32;
    // Up to 4 cuts, each at a position taken from the cut byte's bits.
    let mut rest = data;
    for index in 0..4 {
        let take = if index == 3 {
            rest.len()
        } else {
            (usize::from(cuts >> (2 * index)) * 7) % (rest.len() + 1)
        };
        let (segment, after) = rest.split_at(take);
        rest = after;
        let from_client = cuts & 0x80 == 0;
        let dir = if from_client { &mut state.request } else { &mut state.response };
        let mut units = Vec::new();
        let walked =
            walk(dir, &Segment(segment), segment.len() as u64, &mut steps, |u| units.push(u));
        for unit in units {
            match unit {
                Unit::Header(header) => {
                    assert!(header.plausible());
                    headers += u32::from(header.kind == frame_type::HEADERS);
                    state.streams.on_frame(&header, from_client);
                }
                Unit::GoAway(code) => state.streams.on_goaway(code, 2),
            }
        }
        if walked.is_err() {
            break;
        }
    }
    let streams = &state.streams;
    assert!(state.request.partial_len <= 8 && state.response.partial_len <= 8);
    // Stream ids are counted, not HEADERS frames, so the count can pass them only through
    // skipped ids; with none opened it is 0.
    if headers == 0 {
        assert_eq!(streams.streams(), 0);
    }
    assert!(streams.in_flight <= streams.streams() + streams.outside_window);
});
