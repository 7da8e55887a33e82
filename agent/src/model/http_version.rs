//! HTTP versions as the `http_version` label names them.

/// The HTTP version of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Version {
    Http10,
    Http11,
}

impl Version {
    pub const fn label(self) -> &'static str {
        match self {
            Self::Http10 => "1.0",
            Self::Http11 => "1.1",
        }
    }
}

/// The `http_version` label of a counted request: a head's version, or none read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RequestVersion {
    Read(Version),
    /// An HTTP/2 stream the client opened, counted from frame headers (no head is parsed).
    Http2,
    /// A request counted from its ciphertext, by a process seen speaking HTTP inside
    /// decrypted TLS that left decryption (the budget): its version was not read.
    Unread,
}

impl RequestVersion {
    pub const ALL: [Self; 4] =
        [Self::Read(Version::Http10), Self::Read(Version::Http11), Self::Http2, Self::Unread];

    pub const fn label(self) -> &'static str {
        match self {
            Self::Read(version) => version.label(),
            Self::Http2 => "2",
            Self::Unread => "unread",
        }
    }
}
