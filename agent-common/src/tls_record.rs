//! TLS record headers (RFC 8446 §5.1) at the start of one transfer, for undecrypted TLS:
//! whether a request-direction transfer carries application data (a request). The kernel
//! reads the bytes from user memory, the fuzz target (`fuzz/fuzz_targets/tls_records.rs`)
//! from a slice: one rule, run by both.

/// Record content types.
pub const CHANGE_CIPHER_SPEC: u8 = 0x14;
pub const HANDSHAKE: u8 = 0x16;
pub const APPLICATION_DATA: u8 = 0x17;
/// `type(1) legacy_version(2) length(2)`.
pub const RECORD_HEADER: u64 = 5;
/// Length of an encrypted alert record under TLS 1.3's AEAD suites: 2 alert bytes, 1 inner
/// content type byte (RFC 8446 §5.2 `TLSInnerPlaintext`) and a 16-byte tag. TLS 1.3 sends
/// its `close_notify` (§6.1) as such an application-data record.
pub const TLS13_ALERT_RECORD_LEN: u16 = 2 + 1 + 16;

/// Whether `len` is the length of one whole encrypted alert record, as a TLS library writes
/// its `close_notify` when the connection closes: TLS 1.3 with any AEAD suite
/// ([`TLS13_ALERT_RECORD_LEN`]); TLS 1.2 with AES-GCM or AES-CCM (an 8-byte explicit nonce)
/// or ChaCha20-Poly1305. No HTTP/1.x message is this short once encrypted (the shortest
/// response is 19 bytes, a 41-byte record). Without reading the bytes, this can also be a
/// lone 9-byte HTTP/2 frame in TLS 1.3 (a `SETTINGS` acknowledgement): neither a request
/// nor an answer either.
pub const fn is_alert_record_len(len: u64) -> bool {
    const HEADER: u64 = RECORD_HEADER;
    const TAG: u64 = 16;
    len == HEADER + TLS13_ALERT_RECORD_LEN as u64
        || len == HEADER + 8 + 2 + TAG
        || len == HEADER + 2 + TAG
}

/// The bytes of one transfer, read at an offset (`None`: unreadable).
pub trait TransferBytes {
    fn byte_at(&self, offset: u64) -> Option<u8>;
    fn header_at(&self, offset: u64) -> Option<[u8; 5]>;
}

/// Whether a request-direction transfer of `len` bytes on undecrypted TLS carries
/// application data (a request), from its record headers only (at most four reads; the
/// steady path reads one byte):
/// - it starts with an application-data record that is not TLS 1.3's encrypted
///   `close_notify` (a lone record of [`TLS13_ALERT_RECORD_LEN`], read whole or header
///   first), which would otherwise count the close as a request;
/// - or it starts with `ChangeCipherSpec` and, after the record that follows it (the
///   client's `Finished`: a handshake record in TLS 1.2, an application-data record in
///   TLS 1.3's middlebox compatibility mode, RFC 8446 §D.4), holds an application-data
///   record: the server read the end of the handshake and the first request at once.
///
/// Handshake records, alerts and unreadable bytes carry no request. Nothing is read at or
/// past `len`.
#[inline(always)]
pub fn carries_request(bytes: &impl TransferBytes, len: u64) -> bool {
    if len == 0 {
        return false;
    }
    // A header read alone (OpenSSL reads a record's header, then its body) or a lone record
    // the size of TLS 1.3's alert: its header, read once, tells. Nothing this short holds a
    // ChangeCipherSpec, a Finished and application data.
    if len == RECORD_HEADER || len == RECORD_HEADER + u64::from(TLS13_ALERT_RECORD_LEN) {
        let Some(header) = bytes.header_at(0) else { return false };
        let record_len = u16::from_be_bytes([header[3], header[4]]);
        return header[0] == APPLICATION_DATA && record_len != TLS13_ALERT_RECORD_LEN;
    }
    let Some(content_type) = bytes.byte_at(0) else { return false };
    match content_type {
        APPLICATION_DATA => true,
        CHANGE_CIPHER_SPEC => {
            let Some(ccs_len) = record_len(bytes, 0, len) else { return false };
            let finished = RECORD_HEADER + u64::from(ccs_len);
            let Some(finished_len) = record_len(bytes, finished, len) else { return false };
            let next = finished + RECORD_HEADER + u64::from(finished_len);
            next < len && bytes.byte_at(next) == Some(APPLICATION_DATA)
        }
        _ => false,
    }
}

/// The length field of the record header starting `offset` bytes into the transfer, when
/// the whole header lies inside it.
#[inline(always)]
fn record_len(bytes: &impl TransferBytes, offset: u64, len: u64) -> Option<u16> {
    if offset.saturating_add(RECORD_HEADER) > len {
        return None;
    }
    let header = bytes.header_at(offset)?;
    Some(u16::from_be_bytes([header[3], header[4]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Slice<'a>(&'a [u8]);

    impl TransferBytes for Slice<'_> {
        fn byte_at(&self, offset: u64) -> Option<u8> {
            self.0.get(offset as usize).copied()
        }
        fn header_at(&self, offset: u64) -> Option<[u8; 5]> {
            self.0.get(offset as usize..offset as usize + 5)?.try_into().ok()
        }
    }

    fn carries(data: &[u8]) -> bool {
        carries_request(&Slice(data), data.len() as u64)
    }

    #[test]
    fn records() {
        assert!(carries(&[APPLICATION_DATA, 3, 3, 0, 40, 0, 0]));
        assert!(!carries(&[HANDSHAKE, 3, 1, 0, 1, 0]));
        // TLS 1.3 close_notify: whole, or its header alone.
        let mut close = [0u8; 24];
        close[..5].copy_from_slice(&[APPLICATION_DATA, 3, 3, 0, 19]);
        assert!(!carries(&close[..5]));
        assert!(!carries(&close));
        assert!(carries(&close[..6]));
        // CCS, Finished, then application data; and without the data.
        let flight =
            [CHANGE_CIPHER_SPEC, 3, 3, 0, 1, 1, HANDSHAKE, 3, 3, 0, 2, 0, 0, APPLICATION_DATA];
        assert!(!carries(&flight[..13]));
        assert!(carries(&flight));
        assert!(!carries(&[]));
    }

    #[test]
    fn alert_record_lengths() {
        let lengths: [u64; 3] = [24, 31, 23];
        assert!(lengths.iter().all(|&len| is_alert_record_len(len)));
        assert!(!is_alert_record_len(RECORD_HEADER));
        assert!(!is_alert_record_len(41), "the shortest HTTP/1.x response in TLS 1.3");
    }
}
