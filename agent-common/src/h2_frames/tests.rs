use super::*;

struct Slice<'a>(&'a [u8]);

impl Slice<'_> {
    fn read_slice(&self, offset: u64, len: u64) -> Option<&[u8]> {
        let start = usize::try_from(offset).ok()?;
        self.0.get(start..start.checked_add(len as usize)?)
    }
}

impl FrameBytes for Slice<'_> {
    fn read_into(&self, offset: u64, len: u64, out: &mut [u8; FRAME_HEADER]) -> bool {
        assert!((1..=9).contains(&len), "{len}");
        let Some(part) = self.read_slice(offset, len) else { return false };
        out[..part.len()].copy_from_slice(part);
        true
    }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> std::vec::Vec<u8> {
    let len = payload.len() as u32;
    let mut bytes = std::vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    bytes.extend_from_slice(&stream.to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

extern crate std;
use std::vec::Vec;

/// Walks `data` cut into `cuts` segments in one direction of `state`.
fn feed(state: &mut H2State, from_client: bool, segments: &[&[u8]]) -> Result<(), Lost> {
    let mut budget = MAX_STEPS_PER_TRANSFER;
    for segment in segments {
        let mut units = Vec::new();
        let dir = if from_client { &mut state.request } else { &mut state.response };
        let result =
            walk(dir, &Slice(segment), segment.len() as u64, &mut budget, |unit| units.push(unit));
        for unit in units {
            match unit {
                Unit::Header(header) => {
                    state.streams.on_frame(&header, from_client);
                }
                Unit::GoAway(code) => {
                    state.streams.on_goaway(code, if from_client { 1 } else { 2 })
                }
            }
        }
        result?;
    }
    Ok(())
}

fn client_flight(streams: core::ops::Range<u32>) -> Vec<u8> {
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(frame_type::SETTINGS, 0, 0, &[0; 12]));
    for index in streams {
        let stream = 2 * index + 1;
        bytes.extend(frame(frame_type::HEADERS, 0x4, stream, b"\x82\x86\x84"));
        bytes.extend(frame(frame_type::DATA, END_STREAM, stream, b"hello"));
    }
    bytes
}

#[test]
fn streams_are_counted_by_id_across_every_cut() {
    let data = client_flight(0..3);
    // Every cut, and every pair of cuts: a header split anywhere is carried.
    for first in 0..=data.len() {
        for second in first..=data.len().min(first + 12) {
            let mut state = H2State::default();
            state.start_at_preface();
            let segments = [&data[..first], &data[first..second], &data[second..]];
            feed(&mut state, true, &segments).unwrap();
            assert_eq!(state.streams.streams(), 3, "cut at {first}, {second}");
            assert_eq!(state.streams.in_flight, 3);
            assert_eq!((state.request.skip, state.request.partial_len), (0, 0));
        }
    }
}

#[test]
fn trailers_do_not_count_and_streams_end_both_ways_or_by_reset() {
    let mut state = H2State::default();
    state.start_at_preface();
    let mut client = PREFACE.to_vec();
    client.extend(frame(frame_type::HEADERS, 0x4, 1, b"h"));
    client.extend(frame(frame_type::HEADERS, 0x4, 3, b"h"));
    client.extend(frame(frame_type::DATA, END_STREAM, 1, b""));
    feed(&mut state, true, &[&client]).unwrap();
    assert_eq!(state.streams.concurrency_sum, 1 + 2);
    assert_eq!(state.streams.in_flight, 2);
    let mut server = frame(frame_type::HEADERS, 0x4, 1, b"h");
    // Trailers end stream 1 (both sides now); stream 3 is reset.
    server.extend(frame(frame_type::HEADERS, 0x4 | END_STREAM, 1, b"t"));
    server.extend(frame(frame_type::RST_STREAM, 0, 3, &8u32.to_be_bytes()));
    feed(&mut state, false, &[&server]).unwrap();
    assert_eq!((state.streams.in_flight, state.streams.streams()), (0, 2));
    assert_eq!(state.streams.concurrency[concurrency_bucket(2)], 1);
}

#[test]
fn goaway_codes_are_read_even_when_cut() {
    let mut server = frame(frame_type::SETTINGS, 0, 0, &[]);
    let mut payload = 7u32.to_be_bytes().to_vec();
    payload.extend(2u32.to_be_bytes());
    payload.extend(b"debug data");
    server.extend(frame(frame_type::GOAWAY, 0, 0, &payload));
    server.extend(frame(frame_type::PING, 0, 0, &[0; 8]));
    for cut in 0..=server.len() {
        let mut state = H2State::default();
        feed(&mut state, false, &[&server[..cut], &server[cut..]]).unwrap();
        assert_eq!((state.streams.goaway_by, state.streams.goaway_code), (2, 2), "cut at {cut}");
        assert_eq!(state.response.skip, 0);
    }
    assert_eq!(GoAwayCode::of(0), GoAwayCode::Graceful);
    assert_eq!(GoAwayCode::of(2), GoAwayCode::Error);
    assert_eq!(GoAwayCode::of(0xd), GoAwayCode::Error);
    assert_eq!(GoAwayCode::of(0xe), GoAwayCode::Other);
}

#[test]
fn hostile_frames_lose_sync_and_never_read_past_the_segment() {
    let mut state = H2State::default();
    // A GOAWAY shorter than its 8 bytes of ids and code.
    let short = frame(frame_type::GOAWAY, 0, 0, &[0; 4]);
    assert_eq!(feed(&mut state, false, &[&short]), Err(Lost::Sync));
    // Random bytes after the preface (a fixed pattern: the reserved bit set).
    let mut state = H2State::default();
    state.start_at_preface();
    let mut noise = PREFACE.to_vec();
    noise.extend([0xa7u8; 40]);
    assert_eq!(feed(&mut state, true, &[&noise]), Err(Lost::Sync));
    // A frame longer than the transfer: passed over into the next one.
    let mut state = H2State::default();
    let long = frame(frame_type::DATA, 0, 1, &[0; 10]);
    let mut huge = long.clone();
    huge[..3].copy_from_slice(&[0xff, 0xff, 0xff]);
    feed(&mut state, true, &[&huge]).unwrap();
    assert_eq!(state.request.skip, 0xff_ffff - 10);
    // An interleaved preface after the first is not a frame.
    let mut state = H2State::default();
    state.start_at_preface();
    let mut twice = PREFACE.to_vec();
    twice.extend(PREFACE);
    assert_eq!(feed(&mut state, true, &[&twice]), Err(Lost::Sync));
    // More headers in one transfer than the walk reads.
    let mut state = H2State::default();
    let many: Vec<u8> = (0..MAX_STEPS_PER_TRANSFER + 1)
        .flat_map(|_| frame(frame_type::PING, 0, 0, &[0; 8]))
        .collect();
    assert_eq!(feed(&mut state, false, &[&many]), Err(Lost::TooManyFrames));
}

#[test]
fn unreadable_bytes_pass_only_inside_a_payload() {
    let mut state = H2State::default();
    let header = &frame(frame_type::DATA, END_STREAM, 1, &[0; 100])[..FRAME_HEADER];
    feed(&mut state, false, &[header]).unwrap();
    assert_eq!(pass_unread(&mut state.response, 60), Ok(()));
    assert_eq!(pass_unread(&mut state.response, 40), Ok(()));
    assert_eq!(pass_unread(&mut state.response, 1), Err(Lost::Sync));
}

#[test]
fn long_lived_streams_stay_in_flight_past_the_window() {
    let mut state = H2Streams::default();
    let open = |state: &mut H2Streams, stream: u32, end: bool| {
        let flags = 0x4 | if end { END_STREAM } else { 0 };
        state.on_frame(&FrameHeader { len: 1, kind: frame_type::HEADERS, flags, stream }, true)
    };
    let server_end = |state: &mut H2Streams, stream: u32| {
        let header = FrameHeader { len: 1, kind: frame_type::DATA, flags: END_STREAM, stream };
        state.on_frame(&header, false)
    };
    assert!(open(&mut state, 1, false).after_idle);
    // 200 unary calls beside it, each answered before the next.
    for index in 1..=200 {
        let stream = 2 * index + 1;
        let change = open(&mut state, stream, true);
        assert!(change.opened && !change.after_idle);
        assert!(server_end(&mut state, stream).ended);
    }
    assert_eq!((state.in_flight, state.streams()), (1, 201));
    assert!(server_end(&mut state, 1).ended, "the long stream ends at the server's end");
    assert_eq!(state.in_flight, 0);
    assert_eq!(state.concurrency[concurrency_bucket(2)], 200);
}

#[test]
fn concurrency_buckets() {
    assert_eq!(concurrency_bucket(1), 0);
    assert_eq!(concurrency_bucket(6), 5);
    assert_eq!(concurrency_bucket(100), 8);
    assert_eq!(concurrency_bucket(101), CONCURRENCY_BUCKETS - 1);
}
