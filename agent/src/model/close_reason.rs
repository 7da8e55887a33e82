//! Why a connection closed: the `reason` label of closed connections.

/// The `reason` label of `connscope_connections_closed_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    ConnectionClose,
    Http10,
    MaxRequests,
    Idle,
    /// Undecrypted TLS closed within `classify::CLOSE_AFTER_RESPONSE_WITHIN` of its last
    /// answer (its headers, which would say why, were not read).
    AfterResponse,
    Reset,
    Error,
    Unknown,
}

impl CloseReason {
    pub const ALL: [Self; 8] = [
        Self::ConnectionClose,
        Self::Http10,
        Self::MaxRequests,
        Self::Idle,
        Self::AfterResponse,
        Self::Reset,
        Self::Error,
        Self::Unknown,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            Self::ConnectionClose => "connection_close",
            Self::Http10 => "http10",
            Self::MaxRequests => "max_requests",
            Self::Idle => "idle",
            Self::AfterResponse => "after_response",
            Self::Reset => "reset",
            Self::Error => "error",
            Self::Unknown => "unknown",
        }
    }
}
