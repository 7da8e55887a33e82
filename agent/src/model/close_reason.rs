//! Why a connection closed: the `reason` label of closed connections.

pub use connscope_common::h2_frames::GoAwayCode;

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
    /// HTTP/2: the first `GOAWAY`, by who sent it (the server or the client, whichever end
    /// reports it) and its error code's class.
    GoAway(GoAwayBy, GoAwayCode),
}

/// Which end of an HTTP/2 connection sent its first `GOAWAY`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GoAwayBy {
    Server,
    Client,
}

impl CloseReason {
    pub const ALL: [Self; 14] = [
        Self::ConnectionClose,
        Self::Http10,
        Self::MaxRequests,
        Self::Idle,
        Self::AfterResponse,
        Self::Reset,
        Self::Error,
        Self::Unknown,
        Self::GoAway(GoAwayBy::Server, GoAwayCode::Graceful),
        Self::GoAway(GoAwayBy::Server, GoAwayCode::Error),
        Self::GoAway(GoAwayBy::Server, GoAwayCode::Other),
        Self::GoAway(GoAwayBy::Client, GoAwayCode::Graceful),
        Self::GoAway(GoAwayBy::Client, GoAwayCode::Error),
        Self::GoAway(GoAwayBy::Client, GoAwayCode::Other),
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
            Self::GoAway(GoAwayBy::Server, GoAwayCode::Graceful) => "server_goaway",
            Self::GoAway(GoAwayBy::Server, GoAwayCode::Error) => "server_goaway_error",
            Self::GoAway(GoAwayBy::Server, GoAwayCode::Other) => "server_goaway_other",
            Self::GoAway(GoAwayBy::Client, GoAwayCode::Graceful) => "client_goaway",
            Self::GoAway(GoAwayBy::Client, GoAwayCode::Error) => "client_goaway_error",
            Self::GoAway(GoAwayBy::Client, GoAwayCode::Other) => "client_goaway_other",
        }
    }
}
