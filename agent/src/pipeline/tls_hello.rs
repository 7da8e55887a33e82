//! ALPN from the first handshake message of an undecrypted TLS connection (RFC 8446 §4.1,
//! RFC 7301): whether it will speak HTTP/2. Only the hello's fixed fields and extension
//! headers are walked; the one extension read is ALPN's protocol list. Server names, keys
//! and everything else are skipped over by length.
//!
//! The input is a head: at most `HEAD_LEN` bytes of one transfer, starting either at the
//! record header (the writer's whole flight) or at the handshake header (a reader that took
//! the 5-byte record header in a read of its own, as OpenSSL and BoringSSL do). A hello is
//! often longer than a head, so a cut hello is walked as far as it goes: ALPN comes before
//! the padding and key shares in the hellos of OpenSSL, BoringSSL, Go and rustls. Crates
//! that parse hellos reject a cut one, hence this walker.

use connscope_common::tls_record::{HANDSHAKE, RECORD_HEADER};

const CLIENT_HELLO: u8 = 1;
const SERVER_HELLO: u8 = 2;
/// `type(1) length(3)`.
const HANDSHAKE_HEADER: usize = 4;
/// `legacy_version(2) random(32)`.
const VERSION_AND_RANDOM: usize = 2 + 32;
const ALPN_EXTENSION: u16 = 16;
/// The ALPN name of HTTP/2 over TLS (RFC 9113 §3.2).
const H2: &[u8] = b"h2";

/// What a hello's ALPN extension says about HTTP/2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlpnVerdict {
    /// A ClientHello offering `h2` and nothing else (gRPC clients): the connection speaks
    /// HTTP/2 or fails.
    ClientOffersOnlyH2,
    /// A ServerHello that selected `h2`: TLS 1.2, where ALPN is in the clear (TLS 1.3 moves
    /// it into the encrypted extensions).
    ServerSelectedH2,
}

/// The verdict of the hello at the start of `head`; `None` when it is no hello, its ALPN
/// says something else, or the head ends before the ALPN extension.
pub fn h2_verdict(head: &[u8]) -> Option<AlpnVerdict> {
    let mut reader = Reader(head);
    // A record header, when the transfer starts with one: the first record of a hello
    // flight is a handshake record.
    if head.first() == Some(&HANDSHAKE) {
        reader.skip(RECORD_HEADER as usize)?;
    }
    let message = reader.u8()?;
    reader.skip(HANDSHAKE_HEADER - 1)?;
    reader.skip(VERSION_AND_RANDOM)?;
    reader.skip_vec8()?; // legacy_session_id
    match message {
        CLIENT_HELLO => {
            reader.skip_vec16()?; // cipher_suites
            reader.skip_vec8()?; // legacy_compression_methods
            let alpn = alpn_extension(reader)?;
            offers_only_h2(alpn).then_some(AlpnVerdict::ClientOffersOnlyH2)
        }
        SERVER_HELLO => {
            reader.skip(2 + 1)?; // cipher_suite, legacy_compression_method
            let alpn = alpn_extension(reader)?;
            // The server's list holds exactly the one protocol it selected.
            offers_only_h2(alpn).then_some(AlpnVerdict::ServerSelectedH2)
        }
        _ => None,
    }
}

/// The ALPN extension's body among the extensions at `reader` (cut or whole).
fn alpn_extension(mut reader: Reader<'_>) -> Option<&[u8]> {
    reader.u16()?; // the extensions' total length: the head may end before it does
    loop {
        let kind = reader.u16()?;
        let len = usize::from(reader.u16()?);
        let body = reader.take(len)?;
        if kind == ALPN_EXTENSION {
            return Some(body);
        }
    }
}

/// Whether an ALPN `protocol_name_list` names `h2` and nothing else.
fn offers_only_h2(body: &[u8]) -> bool {
    let mut reader = Reader(body);
    let Some(list_len) = reader.u16() else { return false };
    let Some(list) = reader.take(usize::from(list_len)) else { return false };
    let mut names = Reader(list);
    let mut seen_h2 = false;
    while !names.0.is_empty() {
        let Some(name) = names.vec8() else { return false };
        if name != H2 {
            return false;
        }
        seen_h2 = true;
    }
    seen_h2
}

/// Bounds-checked reads off the front of a slice: every read past the end is `None`.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        if len > self.0.len() {
            return None;
        }
        let (taken, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(taken)
    }

    fn skip(&mut self, len: usize) -> Option<()> {
        self.take(len).map(drop)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn vec8(&mut self) -> Option<&'a [u8]> {
        let len = self.u8()?;
        self.take(usize::from(len))
    }

    fn skip_vec8(&mut self) -> Option<()> {
        self.vec8().map(drop)
    }

    fn skip_vec16(&mut self) -> Option<()> {
        let len = self.u16()?;
        self.skip(usize::from(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hello of `message` type with `extensions` (type, body), behind a record header
    /// when `record`.
    fn hello(message: u8, extensions: &[(u16, Vec<u8>)], record: bool) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.extend([32]);
        body.extend([9u8; 32]);
        if message == CLIENT_HELLO {
            body.extend([0, 4, 0x13, 0x01, 0x13, 0x02, 1, 0]);
        } else {
            body.extend([0x13, 0x01, 0]);
        }
        let mut exts = Vec::new();
        for (kind, data) in extensions {
            exts.extend(kind.to_be_bytes());
            exts.extend((data.len() as u16).to_be_bytes());
            exts.extend(data);
        }
        body.extend((exts.len() as u16).to_be_bytes());
        body.extend(exts);
        let mut handshake = vec![message];
        handshake.extend(&(body.len() as u32).to_be_bytes()[1..]);
        handshake.extend(body);
        if !record {
            return handshake;
        }
        let mut out = vec![HANDSHAKE, 3, 1];
        out.extend((handshake.len() as u16).to_be_bytes());
        out.extend(handshake);
        out
    }

    fn alpn(names: &[&[u8]]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for name in names {
            list.push(name.len() as u8);
            list.extend(*name);
        }
        let mut body = (list.len() as u16).to_be_bytes().to_vec();
        body.extend(list);
        (ALPN_EXTENSION, body)
    }

    fn sni() -> (u16, Vec<u8>) {
        (0, b"\x00\x0c\x00\x00\x09localhost".to_vec())
    }

    #[test]
    fn a_client_offering_only_h2_speaks_http2() {
        let only_h2 = hello(CLIENT_HELLO, &[sni(), alpn(&[b"h2"])], true);
        assert_eq!(h2_verdict(&only_h2), Some(AlpnVerdict::ClientOffersOnlyH2));
        // Read without its record header.
        assert_eq!(h2_verdict(&only_h2[5..]), Some(AlpnVerdict::ClientOffersOnlyH2));
        let both = hello(CLIENT_HELLO, &[alpn(&[b"h2", b"http/1.1"])], true);
        assert_eq!(h2_verdict(&both), None);
        assert_eq!(h2_verdict(&hello(CLIENT_HELLO, &[sni()], true)), None);
        assert_eq!(h2_verdict(&hello(CLIENT_HELLO, &[alpn(&[])], true)), None);
    }

    #[test]
    fn a_server_selecting_h2_speaks_http2() {
        let selected = hello(SERVER_HELLO, &[(0xff01, vec![0]), alpn(&[b"h2"])], true);
        assert_eq!(h2_verdict(&selected), Some(AlpnVerdict::ServerSelectedH2));
        assert_eq!(h2_verdict(&selected[5..]), Some(AlpnVerdict::ServerSelectedH2));
        let http1 = hello(SERVER_HELLO, &[alpn(&[b"http/1.1"])], true);
        assert_eq!(h2_verdict(&http1), None);
    }

    #[test]
    fn a_cut_hello_says_what_it_reached() {
        let mut padded = hello(CLIENT_HELLO, &[sni(), alpn(&[b"h2"]), (21, vec![0; 600])], true);
        // The head ends inside the padding: the ALPN before it was read.
        padded.truncate(512);
        assert_eq!(h2_verdict(&padded), Some(AlpnVerdict::ClientOffersOnlyH2));
        let whole = hello(CLIENT_HELLO, &[sni(), alpn(&[b"h2"])], true);
        for len in 0..whole.len() {
            assert_eq!(h2_verdict(&whole[..len]), None, "cut at {len}");
        }
    }

    #[test]
    fn real_hellos() {
        // The first 512 bytes of the ClientHellos of grpcio (BoringSSL, 1445 bytes whole)
        // and curl `--http2` (OpenSSL 3.0), as a head holds them.
        let grpc = include_bytes!("../../../fuzz/seeds/tls_hello/grpc_client_hello");
        assert_eq!(h2_verdict(grpc), Some(AlpnVerdict::ClientOffersOnlyH2));
        let curl = include_bytes!("../../../fuzz/seeds/tls_hello/curl_client_hello");
        assert_eq!(h2_verdict(curl), None, "curl offers h2 and http/1.1");
    }

    #[test]
    fn other_bytes_are_no_hello() {
        assert_eq!(h2_verdict(b""), None);
        assert_eq!(h2_verdict(b"GET / HTTP/1.1\r\n\r\n"), None);
        assert_eq!(h2_verdict(&[HANDSHAKE, 3, 3, 0, 4, 11, 0, 0, 0]), None);
        // A length that claims more than the list holds.
        let (kind, mut body) = alpn(&[b"h2"]);
        body[1] = 200;
        assert_eq!(h2_verdict(&hello(CLIENT_HELLO, &[(kind, body)], true)), None);
    }
}
