//! The sockets that hold a local port now, as the kernel side reads them from each network
//! namespace's `/proc/<pid>/net/tcp{,6}` (`kernel::socket_census`), for the pipeline to
//! attribute to flows by their four-tuple (`pipeline::socket_count`).

use std::{
    collections::HashMap,
    hash::BuildHasher as _,
    net::{Ipv4Addr, Ipv6Addr},
    num::NonZeroU64,
};

use connscope_common::{AF_INET, AF_INET6, Endpoints};
use foldhash::fast::FixedState;

/// A TCP socket's four-tuple (local and remote address and port), folded into 64 bits: the
/// connection table keeps one per connection, so it stays 8 bytes. IPv4 addresses count as
/// their IPv4-mapped IPv6 form, as a dual-stack socket lists them in `tcp6`. Two tuples
/// share a key with a probability of about 2^-64 per pair. The network namespace is not
/// part of it: the kernel's records do not carry it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TupleKey(NonZeroU64);

impl TupleKey {
    pub fn new(local: (Ipv6Addr, u16), remote: (Ipv6Addr, u16)) -> Self {
        // A fixed seed: the same key for the same tuple in every agent and every test. Never
        // 0, so `Option<TupleKey>` stays 8 bytes in every connection of the table.
        let folded = FixedState::with_seed(0x636f_6e6e_7363_6f70).hash_one((local, remote));
        Self(NonZeroU64::new(folded).unwrap_or(NonZeroU64::MIN))
    }

    /// The tuple of a connection record's endpoints; `None` for another family.
    pub fn of_endpoints(endpoints: &Endpoints) -> Option<Self> {
        let address = |bytes: &[u8; 16]| match endpoints.family {
            AF_INET => Some(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).to_ipv6_mapped()),
            AF_INET6 => Some(Ipv6Addr::from(*bytes)),
            _ => None,
        };
        let local = (address(&endpoints.local_addr)?, endpoints.local_port);
        Some(Self::new(local, (address(&endpoints.remote_addr)?, endpoints.remote_port)))
    }
}

/// One socket of a census: its namespace (an index into [`Census::namespaces`]) and
/// whether it is in TIME_WAIT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    pub namespace: u32,
    pub time_wait: bool,
}

/// Every socket that held a local port (any state but listening or closed) in the
/// namespaces read, at one moment.
#[derive(Debug, Default)]
pub struct Census {
    /// `CLOCK_MONOTONIC` when the read began: recently closed connections older than
    /// the TIME_WAIT length from then are forgotten.
    pub taken_ns: u64,
    /// The `netns` label of each namespace read (its inode number, `other` past the cap).
    pub namespaces: Vec<String>,
    /// By four-tuple. A tuple found in two namespaces at once (loopback connections with
    /// the same ports in two pods) is kept once, from the first namespace read.
    pub sockets: HashMap<TupleKey, Held, foldhash::fast::RandomState>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_records_tuple_and_the_same_sockets_table_line_agree() {
        let mut endpoints = Endpoints {
            family: AF_INET,
            local_port: 40000,
            remote_port: 8080,
            ..Endpoints::default()
        };
        endpoints.local_addr[..4].copy_from_slice(&[127, 0, 28, 2]);
        endpoints.remote_addr[..4].copy_from_slice(&[10, 0, 0, 1]);
        let local = (Ipv4Addr::new(127, 0, 28, 2).to_ipv6_mapped(), 40000);
        let remote = (Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped(), 8080);
        assert_eq!(TupleKey::of_endpoints(&endpoints), Some(TupleKey::new(local, remote)));
        // The same ends the other way round are another socket (the peer's).
        assert_ne!(TupleKey::new(local, remote), TupleKey::new(remote, local));
        endpoints.family = 0;
        assert_eq!(TupleKey::of_endpoints(&endpoints), None);
        assert_eq!(size_of::<Option<TupleKey>>(), 8);
    }
}
