//! The acme agent's wire format, shared by the agent and the tests.

use serde::{Deserialize, Serialize};

/// One report, published as JSON on `acme.reports.<id>`. As with most MQTT devices, the
/// device's id is in the subject (the topic), not in the payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcmeReport {
    /// The kernel's boot id.
    pub boot: String,
    /// Milliseconds since the epoch, device clock.
    pub t: u64,
    /// The generation of the desired state the device runs (absent: none yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied: Option<u64>,
    /// The generation the device is about to apply, sent once before it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applying: Option<u64>,
}

/// The desired state, as the platform puts it to the device's key (its id) of the KV bucket
/// [`DESIRED_BUCKET`], and as the agent keeps it once applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcmeDesired {
    pub generation: u64,
    pub settings: String,
}

/// The JetStream KV bucket acme devices read their desired state from.
pub const DESIRED_BUCKET: &str = "acme-desired";

/// The agent's configuration, rendered per device into /etc/acme/agent.json.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcmeConfig {
    pub id: String,
    pub nats_url: String,
    pub user: String,
    pub password: String,
    /// Where the applied desired state is kept.
    #[serde(default = "default_state")]
    pub state: String,
    /// Milliseconds between reports.
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
}

fn default_state() -> String {
    "/var/lib/acme/applied.json".into()
}

fn default_interval() -> u64 {
    2_000
}
