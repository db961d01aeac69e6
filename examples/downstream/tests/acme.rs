//! The acme agent, described for devicelab: what it ships, how it runs, how its reports read
//! (its id from the subject, as MQTT devices do) and where its desired state goes.

use acme_device_tests::{AcmeConfig, AcmeDesired, AcmeReport, DESIRED_BUCKET};
use devicelab::description::*;
use std::path::Path;
use std::sync::Arc;

pub fn agent() -> AgentDescription {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let config = |v: &TemplateValues| {
        let c = AcmeConfig {
            id: v.device_id.clone(),
            nats_url: v.nats_url.clone(),
            user: v.nats_user.clone(),
            password: v.nats_password.clone(),
            state: "/var/lib/acme/applied.json".into(),
            interval_ms: 2_000,
        };
        serde_json::to_string_pretty(&c).unwrap_or_default()
    };
    let file = |step: &str, path: &str, mode, group: &str, content| Installed {
        step: step.into(),
        path: path.into(),
        mode,
        group: group.into(),
        content,
    };
    AgentDescription {
        name: "acme-agent".into(),
        user: Some("acme".into()),
        packages: vec![],
        files: vec![
            file("binary", "/usr/local/bin/acme-agent", 0o755, "root",
                Content::Shipped(Source::Cargo {
                    manifest,
                    package: "acme-device-tests".into(),
                    bin: "acme-agent".into(),
                })),
            file("config", "/etc/acme/agent.json", 0o640, "acme",
                Content::Render(Renderer(Arc::new(config)))),
        ],
        service: Service::System {
            unit: "acme-agent.service".into(),
            text: "[Service]\nUser=acme\nStateDirectory=acme\nExecStart=/usr/local/bin/acme-agent\nRestart=always\nRestartSec=1\n\n[Install]\nWantedBy=multi-user.target\n".into(),
        },
        // The id is the subject's third token: acme.reports.<id>.
        reports: Reports {
            on: ReportsOn::Subject("acme.reports.{device_id}".into()),
            decode: Arc::new(|m: &Message<'_>| {
                let r: AcmeReport = serde_json::from_slice(m.payload).map_err(|e| e.to_string())?;
                let id = m.subject_token(2).ok_or("no device id in the subject")?;
                Ok(Report {
                    device_id: id.into(),
                    timestamp_ms: r.t,
                    boot_marker: Some(r.boot),
                    applied: r.applied,
                    applying: r.applying,
                    ..Report::default()
                })
            }),
        },
        nats_config: String::new(),
        nats_permissions: Default::default(),
        control: Some(Control::key_value(DESIRED_BUCKET, "{device_id}", |generation, settings| {
            let desired = AcmeDesired { generation, settings: settings.into() };
            serde_json::to_vec(&desired).unwrap_or_default()
        })),
    }
}

/// acme's agent as a simulated device of a fleet: the binary cargo built for these tests, run
/// on the host with its config and state in the device's own directory.
pub fn simulator() -> devicelab::trials::Simulator {
    Arc::new(|v: &TemplateValues, dir: &Path| {
        let config = AcmeConfig {
            id: v.device_id.clone(),
            nats_url: v.nats_url.clone(),
            user: v.nats_user.clone(),
            password: v.nats_password.clone(),
            state: dir.join("applied.json").display().to_string(),
            interval_ms: 2_000,
        };
        let path = dir.join("agent.json");
        std::fs::write(&path, serde_json::to_vec(&config)?)?;
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_acme-agent"));
        command.arg(path);
        Ok(command)
    })
}
