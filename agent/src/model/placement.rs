//! The Kubernetes labels of a flow's local process (`namespace`, `pod`, `container`),
//! found by `pipeline::pod_resolver`.

use prometheus_client::encoding::{EncodeLabel as _, EncodeLabelSet, LabelSetEncoder};

/// Kubernetes placement of the local process; each label is present only when known.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, serde::Deserialize)]
pub struct Placement {
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub container: Option<String>,
}

impl EncodeLabelSet for Placement {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        for (name, value) in
            [("namespace", &self.namespace), ("pod", &self.pod), ("container", &self.container)]
        {
            if let Some(value) = value {
                (name, value.as_str()).encode(encoder.encode_label())?;
            }
        }
        Ok(())
    }
}

/// Resolves the Kubernetes placement of a process from its cgroup id.
pub trait PlacementResolver: Send {
    /// `None` when the cgroup is not a known pod's.
    fn resolve(&mut self, cgroup_id: u64) -> Option<&Placement>;
}

/// Outside Kubernetes: no placement labels.
#[derive(Debug, Default)]
pub struct NoPlacement;

impl PlacementResolver for NoPlacement {
    fn resolve(&mut self, _cgroup_id: u64) -> Option<&Placement> {
        None
    }
}
