//! Label values: formatting, sanitising and bounding their number.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, Ipv6Addr},
};

use connscope_common::{AF_INET, Endpoints, Role, process_label_byte};

/// Label value for anything past a cap.
pub const OTHER: &str = "other";
/// Label value when a process is not known (e.g. an accepted socket never touched by its owner).
pub const UNKNOWN: &str = "unknown";

/// A task's `comm` as a label value: up to the first NUL, characters outside
/// `[A-Za-z0-9._:+-]` replaced by `_`, at most 16 characters.
pub fn process_label(comm: &[u8]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len()).min(16);
    let name: String = comm[..end].iter().map(|&b| char::from(process_label_byte(b))).collect();
    if name.is_empty() { UNKNOWN.to_owned() } else { name }
}

/// `ip:port` (`[ip]:port` for IPv6; IPv4-mapped IPv6 shown as IPv4).
pub fn endpoint_label(family: u16, addr: &[u8; 16], port: u16) -> String {
    if family == AF_INET {
        let ip = Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]);
        return format!("{ip}:{port}");
    }
    let ip = Ipv6Addr::from(*addr);
    match ip.to_ipv4_mapped() {
        Some(v4) => format!("{v4}:{port}"),
        None => format!("[{ip}]:{port}"),
    }
}

/// The server end of a connection: the peer for clients, the local side for servers.
pub fn server_label(endpoints: &Endpoints, role: Role) -> String {
    if role == Role::Server {
        endpoint_label(endpoints.family, &endpoints.local_addr, endpoints.local_port)
    } else {
        endpoint_label(endpoints.family, &endpoints.remote_addr, endpoints.remote_port)
    }
}

/// Bounds the distinct values of one label: the first `max` values seen keep their own
/// label, later ones are reported as [`OTHER`]. Admission is stable on purpose: a value
/// that lost its label later would leave its series behind and the bound would not hold.
#[derive(Debug)]
pub struct LabelCap {
    max: usize,
    admitted: HashSet<String>,
}

impl LabelCap {
    pub fn new(max: usize) -> Self {
        Self { max: max.max(1), admitted: HashSet::new() }
    }

    /// The label value to use for `value`.
    pub fn admit(&mut self, value: &str) -> String {
        if self.admitted.contains(value) {
            return value.to_owned();
        }
        if self.admitted.len() < self.max {
            self.admitted.insert(value.to_owned());
            return value.to_owned();
        }
        OTHER.to_owned()
    }

    pub fn len(&self) -> usize {
        self.admitted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.admitted.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_names_are_sanitised() {
        assert_eq!(process_label(b"curl\0\0\0\0\0\0\0\0\0\0\0\0"), "curl");
        assert_eq!(process_label(b"nginx: worker\0\0\0"), "nginx:_worker");
        assert_eq!(process_label(b"a\"b{c}\\\n\xff\0"), "a_b_c____");
        assert_eq!(process_label(b"\0"), UNKNOWN);
        assert_eq!(process_label(b"0123456789abcdefXYZ"), "0123456789abcdef");
    }

    #[test]
    fn endpoints_render() {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(endpoint_label(AF_INET, &addr, 80), "127.0.0.1:80");
        let mapped = Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped().octets();
        assert_eq!(endpoint_label(10, &mapped, 443), "10.1.2.3:443");
        assert_eq!(endpoint_label(10, &Ipv6Addr::LOCALHOST.octets(), 8080), "[::1]:8080");
        let ep = Endpoints {
            family: AF_INET,
            local_port: 8080,
            remote_port: 50000,
            local_addr: addr,
            remote_addr: addr,
            _pad: 0,
        };
        assert_eq!(server_label(&ep, Role::Server), "127.0.0.1:8080");
        assert_eq!(server_label(&ep, Role::Client), "127.0.0.1:50000");
    }

    #[test]
    fn cap_admits_up_to_max_then_other() {
        let mut cap = LabelCap::new(2);
        assert_eq!(cap.admit("a"), "a");
        assert_eq!(cap.admit("b"), "b");
        assert_eq!(cap.admit("c"), OTHER);
        assert_eq!(cap.admit("a"), "a");
        assert_eq!(cap.len(), 2);
    }

    #[test]
    fn admission_is_stable() {
        let mut cap = LabelCap::new(2);
        cap.admit("a");
        cap.admit("b");
        for _ in 0..100 {
            assert_eq!(cap.admit("c"), OTHER);
        }
        assert_eq!(cap.admit("b"), "b");
    }

    #[test]
    fn cardinality_stays_bounded_under_many_values() {
        let mut cap = LabelCap::new(10);
        let mut distinct = std::collections::HashSet::new();
        for i in 0..10_000 {
            distinct.insert(cap.admit(&format!("10.0.{}.{}:80", i / 256, i % 256)));
        }
        assert_eq!(cap.len(), 10);
        // Every value is new, so after the first ten only "other" is handed out.
        assert_eq!(distinct.len(), 11);
    }
}
