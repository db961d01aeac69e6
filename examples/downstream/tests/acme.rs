//! The acme agent, described for devicelab.

use acme_device_tests::{AcmeConfig, AcmeReport};
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
            text: "[Service]\nUser=acme\nExecStart=/usr/local/bin/acme-agent\nRestart=always\nRestartSec=1\n\n[Install]\nWantedBy=multi-user.target\n".into(),
        },
        reports: Reports::subject("acme.reports.{device_id}", |payload| {
            let r: AcmeReport = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
            Ok(Report { device_id: r.id, timestamp_ms: r.t, boot_marker: Some(r.boot), ..Report::default() })
        }),
        nats_config: String::new(),
        control: None,
    }
}
