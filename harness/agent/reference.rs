//! The reference agent (fixtures/agent) as a description: one instance of what a user writes
//! for their own agent. A cargo package shipped as one binary, a typed TOML config rendered per
//! device, a user unit with linger, JSON statuses on `devicelab.status.<device>` carrying the
//! kernel's boot id. Two ways: it reads its desired state from the KV bucket
//! [`DESIRED_BUCKET`] (key: its device id), applies a newer generation to its state file and
//! reports `applying` then `applied`; it answers `status` on `devicelab.command.<device>`.

use crate::agent::build::{REFERENCE_PACKAGE, reference_source};
use crate::agent::description::{
    AgentDescription, Content, Control, Installed, Renderer, Report, Reports, Service,
    TemplateValues,
};
use devicelab_agent::{
    AgentConfig, ApplyMode, ControlConfig, DEFAULT_SUBJECT_PREFIX, Desired, Status,
};
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
/// The KV bucket the reference agent reads its desired state from; its key is the device id.
pub const DESIRED_BUCKET: &str = "devicelab-desired";
/// The subject prefix the reference agent takes commands on (`<prefix>.<device id>`).
pub const COMMAND_PREFIX: &str = "devicelab.command";
/// Where the reference agent keeps its applied state (in its user's home).
pub const STATE_PATH: &str = "/home/devicelab-agent/state/applied";
/// How long one apply of the reference agent takes: long enough that a power cut triggered by
/// its `applying` report lands inside it.
pub const APPLY_MS: u64 = 4_000;

/// The reference agent's configuration for one device, applying the careful way.
pub fn config_for(values: &TemplateValues) -> AgentConfig {
    config_applying(values, ApplyMode::Careful)
}

/// The reference agent's configuration for one device, applying the way `mode` says.
pub fn config_applying(values: &TemplateValues, mode: ApplyMode) -> AgentConfig {
    AgentConfig {
        device_id: values.device_id.clone(),
        nats_url: values.nats_url.clone(),
        interval_ms: INTERVAL_MS,
        subject_prefix: DEFAULT_SUBJECT_PREFIX.into(),
        nats_user: Some(values.nats_user.clone()),
        nats_password: Some(values.nats_password.clone()),
        control: Some(ControlConfig {
            desired_bucket: DESIRED_BUCKET.into(),
            desired_key: values.device_id.clone(),
            state_path: STATE_PATH.into(),
            apply_ms: APPLY_MS,
            apply: mode,
            command_subject: Some(format!("{COMMAND_PREFIX}.{}", values.device_id)),
        }),
    }
}

/// A generation and its document as the reference agent reads them: a JSON [`Desired`].
pub fn encode(generation: u64, document: &str) -> Vec<u8> {
    serde_json::to_vec(&Desired {
        generation,
        document: document.to_owned(),
    })
    .expect("Desired always serializes")
}

/// A status of the reference protocol, as the verdicts read it.
pub fn decode(payload: &[u8]) -> Result<Report, String> {
    let s: Status = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    Ok(Report {
        device_id: s.device_id,
        timestamp_ms: s.timestamp_ms,
        boot_marker: Some(s.boot_id),
        seq: Some(s.seq),
        applied: s.applied,
        applying: s.applying,
        version: s.version,
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

/// The copy of its state the reference agent keeps as it found it when it started: what the
/// last power cut left on disk.
pub const STATE_FOUND_PATH: &str = "/home/devicelab-agent/state/applied.found";

/// The reference agent's state file, read the agent's own way: `generation N` or `torn (…)`.
pub fn read_state(bytes: &[u8]) -> String {
    match devicelab_agent::state::decode(bytes) {
        devicelab_agent::OnDisk::Applied(d) => format!("generation {}", d.generation),
        devicelab_agent::OnDisk::Torn(why) => format!("torn ({why})"),
        devicelab_agent::OnDisk::Missing => "missing".into(),
    }
}

/// The reference agent, described: it applies desired states carefully.
pub fn agent() -> AgentDescription {
    agent_applying(ApplyMode::Careful)
}

/// The reference agent applying desired states the way `mode` says: [`ApplyMode::InPlace`]
/// is the unsafe agent a power cut inside an apply can tear (its name says so:
/// `devicelab-agent-in-place`).
pub fn agent_applying(mode: ApplyMode) -> AgentDescription {
    let name = match mode {
        ApplyMode::Careful => "devicelab-agent",
        ApplyMode::InPlace => "devicelab-agent-in-place",
    };
    described(name, REFERENCE_PACKAGE, move |v| config_applying(v, mode))
}

/// The reference agent's next release, described: the binary `devicelab-agent-next` (it
/// reports [`NEXT_VERSION`](devicelab_agent::NEXT_VERSION)) at the same path, and a config
/// that reports every [`NEXT_INTERVAL_MS`]: what an update of the agent itself installs over
/// [`agent`] (same unit, same reports, same control part).
pub fn agent_next() -> AgentDescription {
    described("devicelab-agent-next", NEXT_BIN, |v| AgentConfig {
        interval_ms: NEXT_INTERVAL_MS,
        ..config_for(v)
    })
}

/// The binary of the reference agent's next release (a bin of the same package).
pub const NEXT_BIN: &str = "devicelab-agent-next";
/// How often the reference agent's next release reports.
pub const NEXT_INTERVAL_MS: u64 = 1_000;

fn described(
    name: &str,
    bin: &str,
    config: impl Fn(&TemplateValues) -> AgentConfig + Send + Sync + 'static,
) -> AgentDescription {
    AgentDescription {
        name: name.into(),
        user: Some(AGENT_USER.into()),
        packages: Vec::new(),
        files: vec![
            Installed {
                step: "binary".into(),
                path: BINARY_PATH.into(),
                mode: 0o755,
                group: "root".into(),
                content: Content::Shipped(reference_source(bin)),
            },
            Installed {
                // Holds the NATS password: readable by root and the agent's group only.
                step: "config".into(),
                path: CONFIG_PATH.into(),
                mode: 0o640,
                group: AGENT_USER.into(),
                content: Content::Render(Renderer(Arc::new(move |v| config(v).to_toml()))),
            },
        ],
        service: Service::User {
            user: AGENT_USER.into(),
            unit: AGENT_UNIT.into(),
            text: unit_file(),
        },
        reports: Reports::subject(format!("{DEFAULT_SUBJECT_PREFIX}.{{device_id}}"), decode),
        nats_config: String::new(),
        nats_permissions: Default::default(),
        control: Some(
            Control::key_value(DESIRED_BUCKET, "{device_id}", encode)
                .with_commands(format!("{COMMAND_PREFIX}.{{device_id}}")),
        ),
    }
}
