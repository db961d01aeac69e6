//! The acme agent's wire format, shared by the agent and the tests.

use serde::{Deserialize, Serialize};

/// One report, published as JSON on `acme.reports.<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcmeReport {
    pub id: String,
    /// The kernel's boot id.
    pub boot: String,
    /// Milliseconds since the epoch, device clock.
    pub t: u64,
}

/// The agent's configuration, rendered per device into /etc/acme/agent.json.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcmeConfig {
    pub id: String,
    pub nats_url: String,
    pub user: String,
    pub password: String,
}
