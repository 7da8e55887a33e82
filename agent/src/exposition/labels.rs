//! Label values: formatting, sanitising and bounding their number.

use std::{
    collections::HashMap,
    hash::Hash,
    net::{Ipv4Addr, Ipv6Addr},
};

use connscope_common::{AF_INET, COMM_LEN, Endpoints, Role, process_label_byte};
use prometheus_client::metrics::gauge::Gauge;

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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServerEndpoint {
    family: u16,
    port: u16,
    addr: [u8; 16],
}

impl ServerEndpoint {
    pub fn of(endpoints: &Endpoints, role: Role) -> Self {
        let (addr, port) = if role == Role::Server {
            (endpoints.local_addr, endpoints.local_port)
        } else {
            (endpoints.remote_addr, endpoints.remote_port)
        };
        Self { family: endpoints.family, port, addr }
    }

    pub fn label(&self) -> String {
        endpoint_label(self.family, &self.addr, self.port)
    }
}

/// A task's `comm` up to its first NUL, zero-padded: equal names give equal keys.
pub fn comm_key(comm: &[u8; COMM_LEN]) -> [u8; COMM_LEN] {
    let mut key = [0; COMM_LEN];
    for (to, &from) in key.iter_mut().zip(comm.iter().take_while(|&&b| b != 0)) {
        *to = from;
    }
    key
}

/// Raw values (endpoints, `comm`s) already labelled, so a connection of a known flow
/// formats and allocates nothing. Cleared when full: admission is stable, so a value seen
/// again gets the same label back.
#[derive(Debug)]
pub struct LabelMemo<K> {
    ids: HashMap<K, LabelId, foldhash::fast::RandomState>,
}

/// Distinct raw values remembered per label (about 2 MiB at most for endpoints).
const MEMO_MAX: usize = 65_536;

impl<K> Default for LabelMemo<K> {
    fn default() -> Self {
        Self { ids: HashMap::default() }
    }
}

impl<K: Hash + Eq> LabelMemo<K> {
    pub fn get_or_label(&mut self, key: K, label: impl FnOnce() -> LabelId) -> LabelId {
        if let Some(&id) = self.ids.get(&key) {
            return id;
        }
        if self.ids.len() >= MEMO_MAX {
            self.ids.clear();
        }
        let id = label();
        self.ids.insert(key, id);
        id
    }
}

/// A label value a [`LabelCap`] handed out: an index into its values, so flows are keyed
/// and connections remember their server without a string of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LabelId(u32);

impl LabelId {
    pub const OTHER: Self = Self(0);
    pub const UNKNOWN: Self = Self(1);
}

/// A cap shared by the producers of one label (`process`: the flows and the decryption
/// budget), so that every metric together keeps within it.
#[derive(Clone, Debug)]
pub struct SharedLabelCap(std::sync::Arc<std::sync::Mutex<LabelCap>>);

impl SharedLabelCap {
    pub fn new(cap: LabelCap) -> Self {
        Self(std::sync::Arc::new(std::sync::Mutex::new(cap)))
    }

    /// The cap, for a few calls (a poisoned lock still holds a consistent cap: every
    /// change is one insert).
    pub fn lock(&self) -> std::sync::MutexGuard<'_, LabelCap> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The label to use for `value`, as a string.
    pub fn admitted(&self, value: &str) -> String {
        let mut cap = self.lock();
        let id = cap.admit(value);
        cap.name(id).to_owned()
    }
}

/// Bounds the distinct values of one label: the first `max` values seen keep their own
/// label, later ones are reported as [`OTHER`]. Admission is stable on purpose: a value
/// that lost its label later would leave its series behind and the bound would not hold.
/// [`OTHER`] and [`UNKNOWN`] are always there and take no place under the cap.
#[derive(Debug)]
pub struct LabelCap {
    max: usize,
    values: Vec<Box<str>>,
    ids: HashMap<Box<str>, LabelId, foldhash::fast::RandomState>,
    /// How many values are admitted (`label_values`), kept as they are.
    in_use: Gauge,
}

impl LabelCap {
    /// A cap whose number of values is not exported (`label_values` reports the flows').
    pub fn unreported(max: usize) -> Self {
        Self::reporting(max, Gauge::default())
    }

    #[cfg(test)]
    pub fn new(max: usize) -> Self {
        Self::unreported(max)
    }

    /// A cap that keeps `in_use` at its number of admitted values.
    pub fn reporting(max: usize, in_use: Gauge) -> Self {
        let values = Vec::new();
        let mut cap = Self { max: max.max(1), values, ids: HashMap::default(), in_use };
        for value in [OTHER, UNKNOWN] {
            cap.insert(value);
        }
        cap
    }

    /// The label to use for `value`.
    pub fn admit(&mut self, value: &str) -> LabelId {
        match self.ids.get(value) {
            Some(&id) => id,
            None if self.len() < self.max => self.insert(value),
            None => LabelId::OTHER,
        }
    }

    /// `value` as the previous agent exported it, kept even past the cap: its series
    /// already exist.
    pub fn restore(&mut self, value: &str) -> LabelId {
        match self.ids.get(value) {
            Some(&id) => id,
            None => self.insert(value),
        }
    }

    /// Every value, [`OTHER`] and [`UNKNOWN`] included.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.values.iter().map(|value| &**value)
    }

    pub fn name(&self, id: LabelId) -> &str {
        self.values.get(id.0 as usize).map_or(OTHER, |value| value)
    }

    fn insert(&mut self, value: &str) -> LabelId {
        let Ok(index) = u32::try_from(self.values.len()) else { return LabelId::OTHER };
        let id = LabelId(index);
        self.values.push(value.into());
        self.ids.insert(value.into(), id);
        self.in_use.set(self.len() as i64);
        id
    }

    /// Values admitted under the cap ([`OTHER`] and [`UNKNOWN`], inserted first, take no
    /// place under it).
    pub fn len(&self) -> usize {
        self.values.len().saturating_sub(2)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
        assert_eq!(ServerEndpoint::of(&ep, Role::Server).label(), "127.0.0.1:8080");
        assert_eq!(ServerEndpoint::of(&ep, Role::Client).label(), "127.0.0.1:50000");
    }

    #[test]
    fn cap_admits_up_to_max_then_other() {
        let mut cap = LabelCap::new(2);
        let a = cap.admit("a");
        assert_eq!(cap.name(a), "a");
        let b = cap.admit("b");
        assert_eq!(cap.name(b), "b");
        assert_eq!(cap.admit("c"), LabelId::OTHER);
        assert_eq!(cap.name(LabelId::OTHER), OTHER);
        assert_eq!(cap.admit("a"), a);
        assert_eq!(cap.len(), 2);
        assert_eq!(cap.admit(UNKNOWN), LabelId::UNKNOWN);
        assert_eq!(cap.len(), 2, "unknown takes no place under the cap");
    }

    #[test]
    fn a_reporting_cap_keeps_its_gauge_at_the_values_admitted() {
        let in_use = Gauge::default();
        let mut cap = LabelCap::reporting(2, in_use.clone());
        assert_eq!(in_use.get(), 0);
        cap.admit("a");
        cap.admit("a");
        assert_eq!(in_use.get(), 1);
        cap.admit("b");
        cap.admit("c");
        assert_eq!(in_use.get(), 2, "at the cap: c is other");
        cap.restore("d");
        assert_eq!(in_use.get(), 3, "a restored value is kept past the cap");
    }

    #[test]
    fn admission_is_stable() {
        let mut cap = LabelCap::new(2);
        cap.admit("a");
        cap.admit("b");
        for _ in 0..100 {
            assert_eq!(cap.admit("c"), LabelId::OTHER);
        }
        let b = cap.admit("b");
        assert_eq!(cap.name(b), "b");
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

    #[test]
    fn comm_keys_ignore_what_follows_the_name() {
        let mut a = *b"curl\0\0\0\0\0\0\0\0\0\0\0\0";
        assert_eq!(comm_key(&a), a);
        a[10] = b'x';
        assert_eq!(comm_key(&a), *b"curl\0\0\0\0\0\0\0\0\0\0\0\0");
        assert_eq!(comm_key(b"0123456789abcdef"), *b"0123456789abcdef");
    }

    #[test]
    fn memo_labels_once_and_relabels_the_same_after_clearing() {
        let mut cap = LabelCap::new(4);
        let mut memo = LabelMemo::default();
        let mut calls = 0;
        let mut label = |memo: &mut LabelMemo<u32>, key: u32, cap: &mut LabelCap| {
            memo.get_or_label(key, || {
                calls += 1;
                cap.admit(&key.to_string())
            })
        };
        let first = label(&mut memo, 7, &mut cap);
        assert_eq!(label(&mut memo, 7, &mut cap), first);
        for key in 0..MEMO_MAX as u32 + 10 {
            label(&mut memo, 100 + key, &mut cap);
        }
        assert_eq!(label(&mut memo, 7, &mut cap), first, "stable across a clear");
        assert!(memo.ids.len() <= MEMO_MAX);
        assert_eq!(calls, 1 + MEMO_MAX + 10 + 1);
    }

    #[test]
    fn restored_values_keep_their_label_past_the_cap() {
        let mut cap = LabelCap::new(1);
        cap.admit("a");
        let restored = cap.restore("b");
        assert_eq!(cap.name(restored), "b");
        assert_eq!(cap.admit("b"), restored);
    }
}
