//! Enums of the kernel↔user contract. Records carry them as plain integers (a wire value
//! the other side does not know must not be undefined behaviour), and each enum converts
//! from its integer with a check, as aya-log-common does for its records.

/// Declares a wire enum with `ALL`, a checked `from_wire` and a `label()`.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident: $repr:ty {
            $($(#[$vmeta:meta])* $variant:ident = $value:literal => $label:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[repr($repr)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $value,)+
        }

        impl $name {
            pub const ALL: &'static [Self] = &[$(Self::$variant,)+];

            /// The enum for a value read off the wire; `None` for a value this build does
            /// not know.
            pub const fn from_wire(value: $repr) -> Option<Self> {
                match value {
                    $($value => Some(Self::$variant),)+
                    _ => None,
                }
            }

            /// Label value in the exported metrics.
            pub const fn label(self) -> &'static str {
                match self {
                    $(Self::$variant => $label,)+
                }
            }
        }
    };
}

wire_enum! {
    /// Which end of the connection a socket is.
    pub enum Role: u8 {
        /// The local side called `connect()`.
        Client = 1 => "client",
        /// The local side accepted the connection.
        Server = 2 => "server",
    }
}

wire_enum! {
    /// Which side sent the first FIN or reset.
    pub enum ClosedBy: u8 {
        Unknown = 0 => "unknown",
        Local = 1 => "local",
        Peer = 2 => "peer",
    }
}

wire_enum! {
    /// How the first close happened.
    pub enum CloseKind: u8 {
        None = 0 => "unknown",
        Fin = 1 => "fin",
        Reset = 2 => "reset",
    }
}

wire_enum! {
    /// Direction of payload on a socket.
    pub enum Direction: u8 {
        None = 0 => "none",
        Send = 1 => "send",
        Recv = 2 => "recv",
    }
}

impl Direction {
    /// The other way (`None` stays `None`).
    pub const fn opposite(self) -> Self {
        match self {
            Self::Send => Self::Recv,
            Self::Recv => Self::Send,
            Self::None => Self::None,
        }
    }
}

/// Whether payload moving in `direction` on a socket of `role` belongs to a request (client
/// sends, server receives) rather than a response.
pub const fn is_request(role: Role, direction: Direction) -> bool {
    matches!((role, direction), (Role::Client, Direction::Send) | (Role::Server, Direction::Recv))
}

wire_enum! {
    /// What the first payload bytes of a connection say it speaks (the `protocol` label).
    pub enum Protocol: u8 {
        /// No payload inspected yet (or none readable).
        Unknown = 0 => "other",
        Http1 = 1 => "http1",
        /// The HTTP/2 client preface in cleartext.
        Http2 = 2 => "http2",
        /// TLS records whose plaintext is not visible.
        Tls = 3 => "tls",
        /// HTTP/1.x upgraded by `101 Switching Protocols`.
        WebSocket = 4 => "websocket",
        Other = 5 => "other",
    }
}

wire_enum! {
    /// What the bytes of a `Head` record are ([`crate::HeadEvent::content`]).
    pub enum HeadContent: u8 {
        /// The head of an HTTP/1.x request or response.
        Http = 0 => "http",
        /// The first handshake message of one direction of an undecrypted TLS connection,
        /// sent once for its ALPN (whether the connection speaks HTTP/2).
        TlsHello = 1 => "tls_hello",
    }
}

wire_enum! {
    /// Type tag of a ring buffer record (`EventHeader::kind`).
    pub enum EventKind: u32 {
        /// A connection was established ([`crate::OpenEvent`]).
        Open = 1 => "open",
        /// A connection's socket was destroyed: its final state ([`crate::SnapshotEvent`]).
        Close = 2 => "close",
        /// A request or response head that differs from the previous one in its direction
        /// ([`crate::HeadEvent`]).
        Head = 3 => "head",
        /// The state of a live connection, sent when the agent could otherwise miss counts
        /// ([`crate::SnapshotEvent`]).
        Progress = 4 => "progress",
        /// The owning process of an accepted connection ([`crate::AttributeEvent`]).
        Attribute = 5 => "attribute",
        /// A client's connect ended before the connection was established
        /// ([`crate::ConnectFailedEvent`]).
        ConnectFailed = 6 => "connect_failed",
        /// An HTTP/2 connection's streams, concurrency and first `GOAWAY`, sent just before
        /// its `Close` ([`crate::Http2CloseEvent`]).
        Http2Close = 7 => "http2_close",
    }
}

wire_enum! {
    /// Why a client's connect failed: a `SYN_SENT` socket moved to `CLOSE`
    /// (`ConnectFailedEvent::reason`).
    pub enum ConnectFailure: u8 {
        /// A reset answered the SYN (or an ICMP port unreachable): `ECONNREFUSED`.
        Refused = 1 => "refused",
        /// The SYN retries ran out (`net.ipv4.tcp_syn_retries`): `ETIMEDOUT`.
        Timeout = 2 => "timeout",
        /// An ICMP error said the host or network cannot be reached.
        Unreachable = 3 => "unreachable",
        /// No local port was free (`EADDRNOTAVAIL`): `tcp_v4_connect` and `tcp_v6_connect`
        /// enter `SYN_SENT` before they pick a port, and leave it for `CLOSE` with none.
        NoLocalPort = 4 => "no_local_port",
        /// The application closed (or disconnected) the connecting socket itself, with no
        /// socket error, as on its own connect timeout.
        Abandoned = 5 => "abandoned",
        /// Any other socket error, or one that could not be read (no kernel BTF).
        Other = 6 => "other",
    }
}

impl ConnectFailure {
    /// The reason of a connect that left `SYN_SENT` for `CLOSE`, from the socket's error
    /// at that moment and the local port its connect picked (`inet_sport`: 0 when none
    /// was), each `None` where it cannot be read. The kernel sets the error before it
    /// closes a connecting socket (`tcp_reset`, `tcp_write_err`, `tcp_v4_err`); a close by
    /// the application sets none, and a failed port search picks no port.
    pub const fn of(socket_error: Option<i32>, source_port: Option<u16>) -> Self {
        use crate::net::errno;
        match (socket_error, source_port) {
            (Some(errno::ECONNREFUSED), _) => Self::Refused,
            (Some(errno::ETIMEDOUT), _) => Self::Timeout,
            (
                Some(errno::EHOSTUNREACH | errno::ENETUNREACH | errno::EHOSTDOWN | errno::ENONET),
                _,
            ) => Self::Unreachable,
            (Some(0) | None, Some(0)) => Self::NoLocalPort,
            (Some(0), Some(_)) => Self::Abandoned,
            _ => Self::Other,
        }
    }
}

wire_enum! {
    /// Index of the per-CPU loss counters (`LOST` map).
    pub enum LostReason: u32 {
        /// The ring buffer had no room for a record.
        RingbufFull = 0 => "ringbuf_full",
        /// The per-socket map was full: a connection was not tracked.
        MapFull = 1 => "map_full",
        /// Payload on a socket the agent does not track (opened before it started).
        UntrackedSocket = 2 => "untracked_socket",
        /// A payload head could not be read from the caller's memory.
        PayloadUnreadable = 3 => "payload_unreadable",
        /// An HTTP/2 connection whose frame boundaries were lost (or whose frame state had
        /// no room): its streams are not counted. Once per connection.
        Http2Unparsed = 4 => "http2_unparsed",
    }
}

impl LostReason {
    pub const COUNT: u32 = Self::ALL.len() as u32;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_values_round_trip_and_unknown_values_are_rejected() {
        for role in Role::ALL {
            assert_eq!(Role::from_wire(*role as u8), Some(*role));
        }
        assert_eq!(Role::from_wire(0), None);
        assert_eq!(EventKind::from_wire(99), None);
        assert_eq!(Protocol::from_wire(Protocol::Tls as u8).map(Protocol::label), Some("tls"));
        assert_eq!(LostReason::COUNT, 5);
    }

    #[test]
    fn connect_failures_are_classified_by_socket_error_and_port() {
        use crate::net::errno;
        use ConnectFailure::*;
        let port = Some(40_000);
        let cases = [
            (Some(errno::ECONNREFUSED), port, Refused),
            (Some(errno::ETIMEDOUT), port, Timeout),
            (Some(errno::EHOSTUNREACH), port, Unreachable),
            (Some(errno::ENETUNREACH), None, Unreachable),
            (Some(0), Some(0), NoLocalPort),
            (None, Some(0), NoLocalPort),
            (Some(0), port, Abandoned),
            (Some(0), None, Other),
            (Some(71), port, Other),
            (None, port, Other),
        ];
        for (error, port, reason) in cases {
            assert_eq!(ConnectFailure::of(error, port), reason, "{error:?} {port:?}");
        }
    }
}
