//! Decoding of ring buffer records (`connscope_common::records`). Every length is checked
//! before a byte is read; a record that does not match its tag is an error the caller
//! counts, never a panic. Nothing is allocated: a head borrows the record's bytes.

use std::mem::size_of;

use connscope_common::{
    AttributeEvent, Attribution, ConnectFailedEvent, EventHeader, EventKind, HEAD_FIXED_LEN,
    HEAD_LEN, HeadContent, HeadEvent, Http2CloseEvent, OpenEvent, SnapshotEvent,
};
use thiserror::Error;

/// The fixed part of a `Head` record and the head bytes it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head<'a> {
    pub header: EventHeader,
    pub open_token: u32,
    pub exchanges: u32,
    pub direction: u8,
    pub role: u8,
    pub content: HeadContent,
    /// The process of an accepted socket, in the first head of its first use.
    pub owner: Option<Attribution>,
    pub bytes: &'a [u8],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    Open(OpenEvent),
    Attribute(AttributeEvent),
    Head(Head<'a>),
    Progress(SnapshotEvent),
    Close(SnapshotEvent),
    ConnectFailed(ConnectFailedEvent),
    Http2Close(Http2CloseEvent),
}

impl Event<'_> {
    pub const fn kind(&self) -> EventKind {
        match self {
            Self::Open(_) => EventKind::Open,
            Self::Attribute(_) => EventKind::Attribute,
            Self::Head(_) => EventKind::Head,
            Self::Progress(_) => EventKind::Progress,
            Self::Close(_) => EventKind::Close,
            Self::ConnectFailed(_) => EventKind::ConnectFailed,
            Self::Http2Close(_) => EventKind::Http2Close,
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than an event header")]
    Truncated { len: usize },
    #[error("unknown event kind {kind}")]
    UnknownKind { kind: u32 },
    #[error("{kind:?} record has {len} bytes, expected {expected}")]
    WrongLength { kind: EventKind, len: usize, expected: usize },
    #[error("head record of unknown content {content}")]
    UnknownHeadContent { content: u8 },
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

pub fn decode(bytes: &[u8]) -> Result<Event<'_>, DecodeError> {
    if bytes.len() < size_of::<EventHeader>() {
        return Err(DecodeError::Truncated { len: bytes.len() });
    }
    let kind = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let Some(kind) = EventKind::from_wire(kind) else {
        return Err(DecodeError::UnknownKind { kind });
    };
    match kind {
        EventKind::Open => read_exact(bytes, kind).map(Event::Open),
        EventKind::Attribute => read_exact(bytes, kind).map(Event::Attribute),
        EventKind::Progress => read_exact(bytes, kind).map(Event::Progress),
        EventKind::Close => read_exact(bytes, kind).map(Event::Close),
        EventKind::Head => decode_head(bytes).map(Event::Head),
        EventKind::ConnectFailed => read_exact(bytes, kind).map(Event::ConnectFailed),
        EventKind::Http2Close => read_exact(bytes, kind).map(Event::Http2Close),
    }
}

/// Head records carry only the captured part of the head.
fn decode_head(bytes: &[u8]) -> Result<Head<'_>, DecodeError> {
    let wrong_length = DecodeError::WrongLength {
        kind: EventKind::Head,
        len: bytes.len(),
        expected: HEAD_FIXED_LEN,
    };
    if bytes.len() < HEAD_FIXED_LEN || bytes.len() > size_of::<HeadEvent>() {
        return Err(wrong_length);
    }
    let fixed: HeadFixed = read_exact(&bytes[..HEAD_FIXED_LEN], EventKind::Head)?;
    let head = &bytes[HEAD_FIXED_LEN..];
    if fixed.head_len as usize != head.len() || head.len() > HEAD_LEN {
        return Err(wrong_length);
    }
    let Some(content) = HeadContent::from_wire(fixed.content) else {
        return Err(DecodeError::UnknownHeadContent { content: fixed.content });
    };
    Ok(Head {
        header: fixed.header,
        open_token: fixed.open_token,
        exchanges: fixed.exchanges,
        direction: fixed.direction,
        role: fixed.role,
        content,
        owner: (fixed.attribution.valid != 0).then_some(fixed.attribution),
        bytes: head,
    })
}

/// `HeadEvent` without its head bytes.
#[repr(C)]
#[derive(Clone, Copy)]
struct HeadFixed {
    header: EventHeader,
    open_token: u32,
    _pad0: u32,
    exchanges: u32,
    head_len: u32,
    direction: u8,
    role: u8,
    content: u8,
    _pad: [u8; 5],
    attribution: Attribution,
}
const _: () = assert!(size_of::<HeadFixed>() == HEAD_FIXED_LEN);

/// Raw bytes of a record, for tests and fuzzing.
pub fn encode<T: Copy>(value: &T) -> Vec<u8> {
    // SAFETY: `T` is plain data; we only read its bytes.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}

/// The bytes of the `Head` record `head` decodes from, for tests and fuzzing.
pub fn encode_head(head: &Head<'_>) -> Vec<u8> {
    let fixed = HeadFixed {
        header: head.header,
        open_token: head.open_token,
        _pad0: 0,
        exchanges: head.exchanges,
        head_len: head.bytes.len() as u32,
        direction: head.direction,
        role: head.role,
        content: head.content as u8,
        _pad: [0; 5],
        attribution: head.owner.unwrap_or_default(),
    };
    let mut bytes = encode(&fixed);
    bytes.extend_from_slice(head.bytes);
    bytes
}

#[cfg(test)]
mod tests {
    use connscope_common::{Conn, Direction, Role};
    use proptest::prelude::*;

    use super::*;

    fn snapshot(kind: EventKind) -> SnapshotEvent {
        SnapshotEvent {
            header: EventHeader::new(kind, 0xffff_8880_1234_5678, 42),
            conn: Conn { open_token: 7, exchanges: 3, role: Role::Client as u8, ..Conn::default() },
        }
    }

    fn get_head() -> Head<'static> {
        Head {
            header: EventHeader::new(EventKind::Head, 1, 4),
            open_token: 2,
            exchanges: 1,
            direction: Direction::Send as u8,
            role: Role::Client as u8,
            content: HeadContent::Http,
            owner: None,
            bytes: b"GET",
        }
    }

    #[test]
    fn decodes_every_kind() {
        let close = snapshot(EventKind::Close);
        assert_eq!(decode(&encode(&close)), Ok(Event::Close(close)));
        let progress = snapshot(EventKind::Progress);
        assert_eq!(decode(&encode(&progress)), Ok(Event::Progress(progress)));
        let open = OpenEvent {
            header: EventHeader::new(EventKind::Open, 1, 2),
            open_ns: 2,
            role: Role::Server as u8,
            ..OpenEvent::default()
        };
        assert_eq!(decode(&encode(&open)), Ok(Event::Open(open)));
        let attribute = AttributeEvent {
            header: EventHeader::new(EventKind::Attribute, 1, 3),
            open_token: 2,
            ..AttributeEvent::default()
        };
        assert_eq!(decode(&encode(&attribute)), Ok(Event::Attribute(attribute)));
        let failed = ConnectFailedEvent {
            header: EventHeader::new(EventKind::ConnectFailed, 1, 5),
            reason: connscope_common::ConnectFailure::Refused as u8,
            ..ConnectFailedEvent::default()
        };
        assert_eq!(decode(&encode(&failed)), Ok(Event::ConnectFailed(failed)));
        let head = get_head();
        assert_eq!(decode(&encode_head(&head)), Ok(Event::Head(head)));
        let owner = Attribution { tgid: 9, valid: 1, ..Attribution::default() };
        let attributed = Head { owner: Some(owner), ..head };
        assert_eq!(decode(&encode_head(&attributed)), Ok(Event::Head(attributed)));
    }

    #[test]
    fn rejects_bad_records() {
        assert_eq!(decode(&[1, 0, 0]), Err(DecodeError::Truncated { len: 3 }));
        let mut bytes = encode(&snapshot(EventKind::Close));
        bytes[0] = 99;
        assert_eq!(decode(&bytes), Err(DecodeError::UnknownKind { kind: 99 }));
        let bytes = encode(&snapshot(EventKind::Close));
        assert!(matches!(decode(&bytes[..bytes.len() - 12]), Err(DecodeError::WrongLength { .. })));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(decode(&longer), Err(DecodeError::WrongLength { .. })));
        // A head length that disagrees with the record length is rejected.
        let mut record = encode_head(&get_head());
        record.push(b' ');
        assert!(matches!(decode(&record), Err(DecodeError::WrongLength { .. })));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            let _ = decode(&bytes);
        }
    }
}
