//! HTTP/2 bytes the raw-socket tests write: the client preface and frame headers.

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A frame header: `len` bytes of payload follow (or are claimed to).
pub fn frame_header(len: u32, kind: u8, flags: u8, stream: u32) -> Vec<u8> {
    let mut frame = len.to_be_bytes()[1..].to_vec();
    frame.extend([kind, flags]);
    frame.extend(stream.to_be_bytes());
    frame
}
