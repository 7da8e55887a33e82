//! The label sets of the metric families (the names each row of the metric table lists).

use prometheus_client::encoding::EncodeLabelSet;
use serde::Deserialize;

use crate::model::placement::Placement;

/// Who talks to which server: the labels of most connection metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct Flow {
    pub role: String,
    pub process: String,
    pub server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct PlacedFlow {
    #[prometheus(flatten)]
    #[serde(flatten)]
    pub flow: Flow,
    #[prometheus(flatten)]
    #[serde(flatten)]
    pub placement: Placement,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct Closed {
    #[prometheus(flatten)]
    #[serde(flatten)]
    pub flow: PlacedFlow,
    pub closed_by: String,
    pub close_kind: String,
    pub reason: String,
    pub protocol: String,
}

/// Why a client's connect failed (`ConnectFailure`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct ConnectFailed {
    #[prometheus(flatten)]
    #[serde(flatten)]
    pub flow: PlacedFlow,
    pub reason: String,
}

/// A client flow's ports, per network namespace.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct PlacedFlowNetns {
    #[prometheus(flatten)]
    #[serde(flatten)]
    pub flow: PlacedFlow,
    pub netns: String,
}

/// A network namespace's inode number (`other` past the cap).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct Netns {
    pub netns: String,
}

/// Requests per connection are read differently per protocol (HTTP/1.x requests, exchanges
/// of other request/response protocols, TLS records, WebSocket upgrades).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct FlowProtocol {
    #[prometheus(flatten)]
    #[serde(flatten)]
    pub flow: Flow,
    pub protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct OpenState {
    #[prometheus(flatten)]
    #[serde(flatten)]
    pub flow: Flow,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct ClosedByLabels {
    #[prometheus(flatten)]
    #[serde(flatten)]
    pub flow: Flow,
    pub closed_by: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct HttpRequest {
    #[prometheus(flatten)]
    #[serde(flatten)]
    pub flow: Flow,
    pub http_version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct Server {
    pub server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct Probe {
    pub hook: String,
    pub attach: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct EventKindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct CappedLabel {
    pub label: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct SkipReason {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct Build {
    pub version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct ProcessLabel {
    pub process: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct ProcessDecryption {
    pub process: String,
    pub state: String,
}
