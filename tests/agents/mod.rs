//! Agents described through the public API, as a user would describe their own.
#![allow(dead_code)] // each test binary uses its own part

use devicelab::VmArchitecture;
use devicelab::description::{
    AgentDescription, Content, Installed, Package, Report, Reports, Service, Source, TemplateValues,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/agents/heartbeat")
}

/// A `.deb` per architecture from the fixture's `debs/` (Debian's names: amd64, arm64).
fn deb(name: &str, version: &str) -> Package {
    let files = VmArchitecture::ALL
        .into_iter()
        .map(|arch| {
            let file = format!("{name}_{version}_{}.deb", arch.debian_name());
            (arch, fixtures().join("debs").join(file))
        })
        .collect::<BTreeMap<_, _>>();
    Package::Deb {
        name: name.into(),
        files,
    }
}

/// `device=<id> boot=<boot id> ts=<ms>`: the heartbeat's line of text.
pub fn decode_heartbeat(payload: &[u8]) -> Result<Report, String> {
    let text = std::str::from_utf8(payload).map_err(|e| e.to_string())?;
    let field = |key: &str| {
        text.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .ok_or_else(|| format!("no {key}= in {text:?}"))
    };
    Ok(Report {
        device_id: field("device")?.to_owned(),
        timestamp_ms: field("ts")?
            .parse()
            .map_err(|e| format!("ts is not a number: {e}"))?,
        boot_marker: Some(field("boot")?.to_owned()),
        // Fire and forget: no counter (a report it could not send is gone).
        seq: None,
        ..Report::default()
    })
}

/// A second agent, deliberately unlike the reference: a shell script (not built by cargo)
/// around Debian's netcat (`.deb` files provided offline), a system unit running as its own
/// user, a shell-variable config, and one line of text per report, put to a key of a
/// JetStream key-value bucket.
pub fn heartbeat() -> AgentDescription {
    AgentDescription {
        name: "heartbeat".into(),
        user: Some("heartbeat".into()),
        packages: vec![
            deb("libmd0", "1.0.4-2"),
            deb("libbsd0", "0.11.7-2"),
            deb("netcat-openbsd", "1.219-1"),
        ],
        files: vec![
            Installed {
                step: "script".into(),
                path: "/usr/local/bin/heartbeat".into(),
                mode: 0o755,
                group: "root".into(),
                content: Content::Shipped(Source::File(fixtures().join("heartbeat.sh"))),
            },
            Installed {
                step: "config".into(),
                path: "/etc/heartbeat/heartbeat.conf".into(),
                mode: 0o640,
                group: "heartbeat".into(),
                content: Content::Template(
                    r#"DEVICE={device_id}
NATS_URL={nats_url}
NATS_USER={nats_user}
NATS_PASSWORD={nats_password}
SUBJECT='$KV.heartbeat.{device_id}'
INTERVAL=2
"#
                    .into(),
                ),
            },
        ],
        service: Service::System {
            unit: "heartbeat.service".into(),
            text: r#"[Unit]
Description=heartbeat agent (devicelab's second agent)
StartLimitIntervalSec=0

[Service]
User=heartbeat
ExecStart=/usr/local/bin/heartbeat
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
"#
            .into(),
        },
        // Reports go to a JetStream key-value bucket, the reference's to a plain subject.
        reports: Reports::key_value("heartbeat", "{device_id}", decode_heartbeat),
        nats_config: String::new(),
        nats_permissions: Default::default(),
        control: None,
    }
}

/// A device's template values for tests that never reach a NATS server.
pub fn test_values(arch: VmArchitecture) -> TemplateValues {
    TemplateValues {
        device_id: "dev-1".into(),
        nats_url: "nats://192.0.2.1:4222".into(),
        nats_user: "u".into(),
        nats_password: "p".into(),
        arch,
    }
}
