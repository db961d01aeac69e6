//! The reference agent (fixtures/agent) as a description: one instance of what a user writes
//! for their own agent. A cargo package shipped as one binary, a typed TOML config rendered per
//! device, a user unit with linger, JSON statuses on `devicelab.status.<device>` carrying the
//! kernel's boot id.

use crate::agent::build::reference_source;
use crate::agent::description::{
    AgentDescription, Content, Installed, Renderer, Report, Reports, Service, TemplateValues,
};
use devicelab_agent::{AgentConfig, DEFAULT_SUBJECT_PREFIX, Status};
use std::sync::Arc;

/// The user the reference agent runs as, created on the device; its group may read the
/// agent's config (which holds the NATS password).
pub const AGENT_USER: &str = "devicelab-agent";
/// The reference agent's systemd unit, a user unit of [`AGENT_USER`].
pub const AGENT_UNIT: &str = "devicelab-agent.service";
const BINARY_PATH: &str = "/usr/local/bin/devicelab-agent";
const CONFIG_PATH: &str = "/etc/devicelab-agent/agent.toml";
/// How often the reference agent reports in the trials.
pub const INTERVAL_MS: u64 = 2_000;

/// The reference agent's configuration for one device.
pub fn config_for(values: &TemplateValues) -> AgentConfig {
    AgentConfig {
        device_id: values.device_id.clone(),
        nats_url: values.nats_url.clone(),
        interval_ms: INTERVAL_MS,
        subject_prefix: DEFAULT_SUBJECT_PREFIX.into(),
        nats_user: Some(values.nats_user.clone()),
        nats_password: Some(values.nats_password.clone()),
    }
}

/// A status of the reference protocol, as the verdicts read it.
pub fn decode(payload: &[u8]) -> Result<Report, String> {
    let s: Status = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    Ok(Report {
        device_id: s.device_id,
        timestamp_ms: s.timestamp_ms,
        boot_marker: Some(s.boot_id),
        seq: Some(s.seq),
    })
}

fn unit_file() -> String {
    format!(
        r#"[Unit]
Description=devicelab reference agent
StartLimitIntervalSec=0

[Service]
ExecStart={BINARY_PATH} {CONFIG_PATH}
Restart=always
RestartSec=1

[Install]
WantedBy=default.target
"#
    )
}

/// The reference agent, described.
pub fn agent() -> AgentDescription {
    AgentDescription {
        name: "devicelab-agent".into(),
        user: Some(AGENT_USER.into()),
        packages: Vec::new(),
        files: vec![
            Installed {
                step: "binary".into(),
                path: BINARY_PATH.into(),
                mode: 0o755,
                group: "root".into(),
                content: Content::Shipped(reference_source()),
            },
            Installed {
                // Holds the NATS password: readable by root and the agent's group only.
                step: "config".into(),
                path: CONFIG_PATH.into(),
                mode: 0o640,
                group: AGENT_USER.into(),
                content: Content::Render(Renderer(Arc::new(|v| config_for(v).to_toml()))),
            },
        ],
        service: Service::User {
            user: AGENT_USER.into(),
            unit: AGENT_UNIT.into(),
            text: unit_file(),
        },
        reports: Reports::subject(format!("{DEFAULT_SUBJECT_PREFIX}.{{device_id}}"), decode),
        nats_config: String::new(),
    }
}
