//! Decoding of ring buffer records. Every length is checked before a byte is read; a
//! record that does not match its tag is an error the caller counts, never a panic.

use std::mem::size_of;

use connscope_common::{ConnEvent, EventHeader, EventKind, TURN_FIXED_LEN, TurnEvent};
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Open(ConnEvent),
    Close(ConnEvent),
    Turn(Box<TurnEvent>),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than an event header")]
    Truncated { len: usize },
    #[error("unknown event kind {kind}")]
    UnknownKind { kind: u32 },
    #[error("{kind:?} record has {len} bytes, expected {expected}")]
    WrongLength { kind: EventKind, len: usize, expected: usize },
}

/// Reads a `T` from the start of `bytes`, which must be exactly `size_of::<T>()` long.
fn read_exact<T: Copy>(bytes: &[u8], kind: EventKind) -> Result<T, DecodeError> {
    if bytes.len() != size_of::<T>() {
        return Err(DecodeError::WrongLength { kind, len: bytes.len(), expected: size_of::<T>() });
    }
    // SAFETY: the length matches and `T` is plain `#[repr(C)]` data valid for any bit
    // pattern (connscope-common types); ring buffer records need not be aligned for `T`.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    if bytes.len() < size_of::<EventHeader>() {
        return Err(DecodeError::Truncated { len: bytes.len() });
    }
    let kind = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    match EventKind::from_u32(kind) {
        Some(kind @ EventKind::Open) => read_exact(bytes, kind).map(Event::Open),
        Some(kind @ EventKind::Close) => read_exact(bytes, kind).map(Event::Close),
        Some(EventKind::Turn) => decode_turn(bytes).map(Event::Turn),
        None => Err(DecodeError::UnknownKind { kind }),
    }
}

/// Turn records carry only the captured part of the head.
fn decode_turn(bytes: &[u8]) -> Result<Box<TurnEvent>, DecodeError> {
    let wrong_length = DecodeError::WrongLength {
        kind: EventKind::Turn,
        len: bytes.len(),
        expected: TURN_FIXED_LEN,
    };
    if bytes.len() < TURN_FIXED_LEN || bytes.len() > size_of::<TurnEvent>() {
        return Err(wrong_length);
    }
    let mut full = [0u8; size_of::<TurnEvent>()];
    full[..bytes.len()].copy_from_slice(bytes);
    let turn: TurnEvent = read_exact(&full, EventKind::Turn)?;
    if turn.head_len as usize != bytes.len() - TURN_FIXED_LEN {
        return Err(wrong_length);
    }
    Ok(Box::new(turn))
}

/// Raw bytes of a record, for tests and fuzzing.
pub fn encode<T: Copy>(value: &T) -> Vec<u8> {
    // SAFETY: `T` is plain data; we only read its bytes.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}

#[cfg(test)]
mod tests {
    use connscope_common::{Conn, HEAD_LEN};
    use proptest::prelude::*;

    use super::*;

    fn conn_event(kind: EventKind) -> ConnEvent {
        ConnEvent {
            header: EventHeader {
                kind: kind as u32,
                _pad: 0,
                sock: 0xffff_8880_1234_5678,
                ts_ns: 42,
            },
            conn: Conn { open_ns: 7, exchanges: 3, role: 1, ..Conn::default() },
        }
    }

    #[test]
    fn decodes_open_close_and_turn() {
        let open = conn_event(EventKind::Open);
        assert_eq!(decode(&encode(&open)), Ok(Event::Open(open)));
        let close = conn_event(EventKind::Close);
        assert_eq!(decode(&encode(&close)), Ok(Event::Close(close)));
        let mut turn = TurnEvent {
            header: EventHeader { kind: EventKind::Turn as u32, _pad: 0, sock: 1, ts_ns: 2 },
            open_ns: 3,
            gap_ns: 4,
            bytes_sent: 5,
            bytes_received: 6,
            exchanges: 1,
            head_len: 3,
            tgid: 9,
            direction: 1,
            role: 1,
            _pad: [0; 2],
            comm: [0; 16],
            head: [0; HEAD_LEN],
        };
        turn.head[..3].copy_from_slice(b"GET");
        let record = &encode(&turn)[..TURN_FIXED_LEN + 3];
        assert_eq!(decode(record), Ok(Event::Turn(Box::new(turn))));
        // A head length that disagrees with the record length is rejected.
        assert!(matches!(decode(&encode(&turn)), Err(DecodeError::WrongLength { .. })));
    }

    #[test]
    fn rejects_bad_records() {
        assert_eq!(decode(&[1, 0, 0]), Err(DecodeError::Truncated { len: 3 }));
        let mut bytes = encode(&conn_event(EventKind::Open));
        bytes[0] = 99;
        assert_eq!(decode(&bytes), Err(DecodeError::UnknownKind { kind: 99 }));
        let bytes = encode(&conn_event(EventKind::Close));
        assert!(matches!(decode(&bytes[..100]), Err(DecodeError::WrongLength { .. })));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(decode(&longer), Err(DecodeError::WrongLength { .. })));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
        }
    }
}
