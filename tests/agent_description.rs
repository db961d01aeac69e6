//! An agent description's bad input, each a clear error that names the fix, found before a VM
//! boots where it can be: a template naming an unknown value, a binary or `.deb` missing for an
//! architecture or built for the other one, a cargo package that does not exist; and, against
//! a real nats-server, a decoder that rejects every message and a subject nothing publishes on.
//! Also against a real nats-server: reports on a wildcard subject, and in a KV bucket.

mod agents;
mod common;

use devicelab::VmArchitecture;
use devicelab::agent::onboard::{OnboardError, Onboarding};
use devicelab::config::HarnessConfig;
use devicelab::description::{Content, Installed, Package, Reports, ReportsOn, Source};
use devicelab::nats::{NatsError, Verdict};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

fn config() -> HarnessConfig {
    HarnessConfig::from_vars(BTreeMap::new()).unwrap()
}

#[test_log::test(tokio::test)]
async fn a_template_naming_an_unknown_value_fails_before_anything_boots() {
    let mut agent = agents::heartbeat();
    agent.files[1].content = Content::Template("DEVICE={device}\n".into());
    let err = agent
        .check(&[VmArchitecture::X86_64])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("heartbeat") && err.contains("{device}") && err.contains("device_id"),
        "{err}"
    );
    let err = Onboarding::prepare(
        &config(),
        &agent,
        agents::test_values(VmArchitecture::X86_64),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, OnboardError::Description(_)), "{err}");
}

#[test]
fn a_deb_missing_for_an_architecture_is_named() {
    let mut agent = agents::heartbeat();
    if let Package::Deb { files, .. } = &mut agent.packages[2] {
        files.remove(&VmArchitecture::Aarch64);
    }
    agent.check(&[VmArchitecture::X86_64]).unwrap();
    let err = agent
        .check(&[VmArchitecture::Aarch64])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("netcat-openbsd") && err.contains("aarch64"),
        "{err}"
    );
}

/// The x86_64 test binary itself, offered as the aarch64 build of a prebuilt agent.
#[test_log::test(tokio::test)]
async fn a_binary_for_the_other_architecture_is_refused_with_the_fix() {
    let this = std::env::current_exe().unwrap();
    let host = VmArchitecture::host().unwrap();
    let other = VmArchitecture::ALL
        .into_iter()
        .find(|a| *a != host)
        .unwrap();
    let mut agent = agents::heartbeat();
    agent.files[0] = Installed {
        step: "binary".into(),
        path: "/usr/local/bin/agent".into(),
        mode: 0o755,
        group: "root".into(),
        content: Content::Shipped(Source::Prebuilt(BTreeMap::from([(other, this)]))),
    };
    let err = Onboarding::prepare(&config(), &agent, agents::test_values(other))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(host.name()) && err.contains(other.name()),
        "names what it is and what the VM is: {err}"
    );
}

#[test_log::test(tokio::test)]
async fn a_cargo_package_that_does_not_exist_is_a_build_error() {
    let mut agent = agents::heartbeat();
    agent.files[0].content = Content::Shipped(Source::Cargo {
        manifest: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"),
        package: "no-such-agent".into(),
        bin: "no-such-agent".into(),
    });
    let host = VmArchitecture::host().unwrap();
    let err = Onboarding::prepare(&config(), &agent, agents::test_values(host))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no-such-agent"), "cargo's own words: {err}");
}

#[test_log::test(tokio::test(flavor = "multi_thread"))]
async fn a_decoder_that_rejects_every_message_times_out_quoting_them() {
    let nats = common::nats_process_server().await;
    let subject = "acme.heartbeat.dev-1";
    let on = ReportsOn::Subject(subject.into());
    nats.capture(&on).await.unwrap();
    let js = async_nats::jetstream::new(nats.client().clone());
    for text in ["hello", "not a report"] {
        js.publish(subject, text.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let log = nats.report_log(&on, agents::heartbeat().reports.decode);
    let err = log
        .wait_for(0, Duration::from_secs(2), |_| Verdict::Accept)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, NatsError::StatusTimeout { .. }), "{msg}");
    assert!(
        msg.contains("undecodable") && msg.contains("not a report") && msg.contains("hello"),
        "the raw messages are quoted: {msg}"
    );
}

#[test_log::test(tokio::test(flavor = "multi_thread"))]
async fn a_subject_nothing_publishes_on_times_out_saying_so() {
    let nats = common::nats_process_server().await;
    let on = ReportsOn::Subject("acme.heartbeat.dev-2".into());
    nats.capture(&on).await.unwrap();
    let log = nats.report_log(&on, agents::heartbeat().reports.decode);
    let err = log
        .wait_for(0, Duration::from_secs(1), |_| Verdict::Accept)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("acme.heartbeat.dev-2") && err.contains("seen: nothing"),
        "{err}"
    );
}

/// The reports `log` holds, in order, up to the one with timestamp 3.
async fn reports_up_to_3(log: devicelab::nats::ReportLog) -> Vec<devicelab::description::Report> {
    let mut seen = Vec::new();
    log.wait_for(0, Duration::from_secs(10), |r| {
        seen.push(r.clone());
        if r.timestamp_ms == 3 {
            Verdict::Accept
        } else {
            Verdict::Skip
        }
    })
    .await
    .unwrap();
    seen
}

/// A subject with a wildcard takes every subject under it, and only those: here an agent
/// that reports its boot and its beats on two subjects of its own. Where devices share a
/// wildcard, a device's log skips the others' reports.
#[test_log::test(tokio::test(flavor = "multi_thread"))]
async fn a_wildcard_subject_reads_every_subject_under_it() {
    let mut agent = agents::heartbeat();
    agent.reports = Reports::subject("acme.{device_id}.>", agents::decode_heartbeat);
    let own = agent
        .reports_on(&agents::test_values(VmArchitecture::X86_64))
        .unwrap();
    assert_eq!(own, ReportsOn::Subject("acme.dev-1.>".into()));
    // Captured second, the wider subject takes the narrower one's place in the stream.
    let shared = ReportsOn::Subject("acme.>".into());
    let nats = common::nats_process_server().await;
    nats.capture(&own).await.unwrap();
    nats.capture(&shared).await.unwrap();
    let client = nats.client();
    for (subject, line) in [
        ("acme.dev-1.boot", "device=dev-1 boot=b ts=1"),
        ("acme.dev-2.beat", "device=dev-2 boot=b ts=2"),
        ("acme.dev-1.beat", "device=dev-1 boot=b ts=3"),
    ] {
        client.publish(subject, line.into()).await.unwrap();
    }
    client.flush().await.unwrap();
    let read = |log| async move {
        let seen = reports_up_to_3(log).await;
        seen.iter().map(|r| r.timestamp_ms).collect::<Vec<_>>()
    };
    let decode = || agent.reports.decode.clone();
    assert_eq!(read(nats.report_log(&own, decode())).await, [1, 3]);
    assert_eq!(read(nats.report_log(&shared, decode())).await, [1, 2, 3]);
    let dev1 = nats.report_log(&shared, decode()).for_device("dev-1");
    assert_eq!(read(dev1).await, [1, 3], "dev-2's report is not dev-1's");
}

/// An MQTT-style agent: its device id is only in the subject (an MQTT topic `acme/dev-1/state`
/// reaches NATS as `acme.dev-1.state`), its boot id in a header, its timestamp the whole payload.
/// A decoder of the whole message gives each report to its device; the payload alone cannot,
/// so a device's log read that way never finds its reports.
#[test_log::test(tokio::test(flavor = "multi_thread"))]
async fn a_device_id_in_the_subject_and_a_boot_id_in_a_header_are_decoded() {
    use devicelab::description::{Message, Report};
    let timestamp = |payload: &[u8]| -> Result<u64, String> {
        std::str::from_utf8(payload)
            .map_err(|e| e.to_string())?
            .trim()
            .parse()
            .map_err(|e: std::num::ParseIntError| e.to_string())
    };
    let whole = Reports::subject("acme.*.state", |_| Err("unused".into())).decoded_by(
        move |m: &Message<'_>| {
            Ok(Report {
                device_id: m
                    .subject_token(1)
                    .ok_or("no device in the subject")?
                    .to_owned(),
                timestamp_ms: timestamp(m.payload)?,
                boot_marker: m.header("Boot-Id").map(str::to_owned),
                ..Report::default()
            })
        },
    );
    // The same agent, decoded from its payload alone: the device id is not there.
    let payload_only = Reports::subject("acme.*.state", move |p| {
        Ok(Report {
            device_id: String::new(),
            timestamp_ms: timestamp(p)?,
            ..Report::default()
        })
    });
    let nats = common::nats_process_server().await;
    nats.capture(&whole.on).await.unwrap();
    let client = nats.client();
    for (device, ts, boot) in [("dev-2", 1, "b2"), ("dev-1", 2, "b1"), ("dev-1", 3, "b1")] {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Boot-Id", boot);
        client
            .publish_with_headers(
                format!("acme.{device}.state"),
                headers,
                ts.to_string().into(),
            )
            .await
            .unwrap();
    }
    client.flush().await.unwrap();

    let seen: Vec<_> = reports_up_to_3(
        nats.report_log(&whole.on, whole.decode.clone())
            .for_device("dev-1"),
    )
    .await
    .into_iter()
    .map(|r| (r.timestamp_ms, r.boot_marker))
    .collect();
    let b1 = Some("b1".to_owned());
    assert_eq!(
        seen,
        [(2, b1.clone()), (3, b1)],
        "dev-2's report is not dev-1's"
    );

    let err = nats
        .report_log(&payload_only.on, payload_only.decode.clone())
        .for_device("dev-1")
        .wait_for(0, Duration::from_secs(2), |_| Verdict::Accept)
        .await
        .expect_err("the payload alone names no device");
    assert!(matches!(err, NatsError::StatusTimeout { .. }), "{err}");
}

/// An agent that puts its reports to a JetStream key-value bucket: the harness creates the
/// bucket (keeping 64 revisions per key), and reads a device's revisions in order, from a gate
/// on, like a subject's messages. The device publishes plainly on `$KV.<bucket>.<key>`, as the
/// heartbeat agent does.
#[test_log::test(tokio::test(flavor = "multi_thread"))]
async fn reports_put_to_a_kv_bucket_are_read_in_order_from_a_gate() {
    let agent = agents::heartbeat();
    let on = agent
        .reports_on(&agents::test_values(VmArchitecture::X86_64))
        .unwrap();
    assert_eq!(
        on,
        ReportsOn::KeyValue {
            bucket: "heartbeat".into(),
            key: "dev-1".into()
        }
    );
    let nats = common::nats_process_server().await;
    nats.capture(&on).await.unwrap();
    nats.capture(&on).await.unwrap(); // the bucket exists now: kept as it is
    let js = async_nats::jetstream::new(nats.client().clone());
    let kv = js.get_key_value("heartbeat").await.unwrap();
    assert_eq!(kv.status().await.unwrap().history(), 64);

    let put = |ts: u64| {
        let client = nats.client().clone();
        async move {
            let line = format!("device=dev-1 boot=b ts={ts}");
            client
                .publish("$KV.heartbeat.dev-1", line.into())
                .await
                .unwrap();
            client.flush().await.unwrap();
        }
    };
    put(1).await;
    kv.put("dev-2", "device=dev-2 boot=b ts=2".into())
        .await
        .unwrap();
    let log = nats.report_log(&on, agent.reports.decode.clone());
    let (_, first) = log
        .wait_for(0, Duration::from_secs(10), |_| Verdict::Accept)
        .await
        .unwrap();
    assert_eq!((first.device_id.as_str(), first.timestamp_ms), ("dev-1", 1));

    let gate = log.last_sequence().await.unwrap();
    put(3).await;
    let mut seen = Vec::new();
    log.wait_for(gate, Duration::from_secs(10), |r| {
        seen.push(r.timestamp_ms);
        Verdict::Accept
    })
    .await
    .unwrap();
    assert_eq!(seen, [3], "only what came after the gate");
}

#[test]
fn a_kv_bucket_name_jetstream_refuses_is_an_error_before_anything_boots() {
    let mut agent = agents::heartbeat();
    agent.reports = Reports::key_value("heart beat", "{device_id}", agents::decode_heartbeat);
    let err = agent
        .check(&[VmArchitecture::X86_64])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"heart beat\"") && err.contains("letters, digits"),
        "{err}"
    );
}

/// A heartbeat line decodes to what the verdicts need.
#[test]
fn the_heartbeat_decoder_reads_its_line() {
    let r = agents::decode_heartbeat(b"device=d1 boot=b-2 ts=1700000000123").unwrap();
    assert_eq!(
        (
            r.device_id.as_str(),
            r.boot_marker.as_deref(),
            r.timestamp_ms
        ),
        ("d1", Some("b-2"), 1_700_000_000_123)
    );
    assert!(agents::decode_heartbeat(b"{\"json\": 1}").is_err());
}

/// The README's "Testing your own agent" example is the downstream crate's real matrix, line
/// for line (its doc comment aside).
#[test]
fn the_readme_example_is_the_downstream_crates_code() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let section = &readme[readme
        .find("## Testing your own agent")
        .expect("the README's section")..];
    let start = section.find("```rust\n").expect("its example") + "```rust\n".len();
    let example = &section[start..start + section[start..].find("```").unwrap()];
    let code = std::fs::read_to_string(root.join("examples/downstream/tests/matrix.rs")).unwrap();
    let code: String = code
        .lines()
        .skip_while(|l| l.starts_with("//!") || l.is_empty())
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(example, code);
}

/// A process-mode server started with `nats_config`, as a description gives it.
async fn server_with(
    nats_config: &str,
) -> Result<devicelab::nats::NatsServer, devicelab::nats::NatsError> {
    let vars = BTreeMap::from([("DEVICELAB_NATS".to_owned(), "process".to_owned())]);
    let config = HarnessConfig::from_vars(vars).unwrap();
    devicelab::nats::NatsServer::start_with(
        &config,
        std::net::Ipv4Addr::LOCALHOST,
        &devicelab::lab::run_owner(),
        nats_config,
    )
    .await
}

/// What a description asks of the server (`nats_config`) is in the server's configuration:
/// here a smaller maximum payload, which the server then announces to its clients.
#[test_log::test(tokio::test(flavor = "multi_thread"))]
async fn the_descriptions_nats_config_reaches_the_server() {
    let mut agent = agents::heartbeat();
    agent.nats_config = "max_payload: 4096".into();
    let nats = server_with(&agent.nats_config).await.unwrap();
    assert_eq!(nats.client().server_info().max_payload, 4096);
}

/// The run's server is named, so an agent whose description turns on nats-server's MQTT
/// listener (which refuses to start on an unnamed server) needs no more than its own block.
#[test_log::test(tokio::test(flavor = "multi_thread"))]
async fn an_mqtt_listener_needs_no_more_than_the_agents_own_block() {
    let mut agent = agents::heartbeat();
    agent.nats_config = "mqtt {\n  host: 127.0.0.1\n  port: -1\n}".into();
    let nats = server_with(&agent.nats_config)
        .await
        .expect("a server with an MQTT listener starts");
    let name = nats.client().server_info().server_name;
    assert!(name.starts_with("devicelab-nats-"), "{name}");
}

/// Each malformed description is refused by `check` before anything boots, with a message that
/// names the part to fix. Both bundled agents stay valid (the table starts from them).
#[test]
fn a_malformed_description_is_refused_naming_what_to_fix() {
    use devicelab::description::{AgentDescription, Service};
    let archs = [VmArchitecture::X86_64, VmArchitecture::Aarch64];
    agents::heartbeat().check(&archs).unwrap();
    devicelab::reference::agent().check(&archs).unwrap();
    type Break = Box<dyn Fn(&mut AgentDescription)>;
    let file = |step: &str, path: &str| Installed {
        step: step.into(),
        path: path.into(),
        mode: 0o644,
        group: "root".into(),
        content: Content::Template("x".into()),
    };
    let cases: Vec<(&str, Break, &str)> = vec![
        (
            "empty step",
            Box::new(move |a| a.files[0].step = String::new()),
            "step name \"\"",
        ),
        (
            "step with a space",
            Box::new(|a| a.files[0].step = "my config".into()),
            "step name \"my config\"",
        ),
        (
            "step with a quote",
            Box::new(|a| a.files[0].step = "it's".into()),
            "letters, digits",
        ),
        (
            "reserved step",
            Box::new(|a| a.files[0].step = "unit".into()),
            "onboarding's own",
        ),
        (
            "duplicate step",
            Box::new(|a| {
                let s = a.files[0].step.clone();
                a.files[1].step = s;
            }),
            "give each its own",
        ),
        (
            "relative path",
            Box::new(|a| a.files[0].path = "etc/agent.toml".into()),
            "not absolute",
        ),
        (
            "dot-dot path",
            Box::new(|a| a.files[0].path = "/etc/../root/x".into()),
            "`..`",
        ),
        (
            "directory path",
            Box::new(|a| a.files[0].path = "/etc/acme/".into()),
            "name the file",
        ),
        (
            "newline in path",
            Box::new(|a| a.files[0].path = "/etc/a\nb".into()),
            "control character",
        ),
        (
            "duplicate path",
            Box::new(|a| {
                let p = a.files[0].path.clone();
                a.files[1].path = p;
            }),
            "installed twice",
        ),
        (
            "path of the unit",
            Box::new(|a| {
                let p = a.service.path();
                a.files[0].path = p;
            }),
            "installed twice",
        ),
        (
            "mode out of range",
            Box::new(|a| a.files[0].mode = 0o100644),
            "at most 0o7777",
        ),
        (
            "group with a space",
            Box::new(|a| a.files[0].group = "agent users".into()),
            "not a group name",
        ),
        (
            "unit without .service",
            Box::new(|a| {
                let (Service::System { unit, .. } | Service::User { unit, .. }) = &mut a.service;
                *unit = "acme".into();
            }),
            "ending in `.service`",
        ),
        (
            "unit with a space",
            Box::new(|a| {
                let (Service::System { unit, .. } | Service::User { unit, .. }) = &mut a.service;
                *unit = "acme agent.service".into();
            }),
            "not a systemd service name",
        ),
        (
            "user with capitals",
            Box::new(|a| a.user = Some("Agent".into())),
            "useradd",
        ),
        (
            "package with a space",
            Box::new(|a| a.packages.push(Package::Mirror("curl wget".into()))),
            "not a Debian package name",
        ),
        (
            "package twice",
            Box::new(|a| {
                a.packages.push(Package::Mirror("jq".into()));
                a.packages.push(Package::Mirror("jq".into()));
            }),
            "listed twice",
        ),
        (
            "empty agent name",
            Box::new(|a| a.name = String::new()),
            "agent's name",
        ),
        (
            "extra file",
            Box::new(move |a| a.files.push(file("extra", "relative"))),
            "not absolute",
        ),
    ];
    for (what, break_it, expect) in cases {
        let mut agent = agents::heartbeat();
        break_it(&mut agent);
        let err = agent
            .check(&archs)
            .map(|()| "accepted".to_owned())
            .unwrap_or_else(|e| e.to_string());
        assert!(
            err.contains(expect),
            "{what}: expected {expect:?} in: {err}"
        );
    }
}

/// The journal command quotes the unit: a templated unit's escaped instance name reaches
/// journalctl as it is.
#[test]
fn the_journal_command_quotes_the_unit() {
    use devicelab::description::Service;
    let unit = Service::System {
        unit: "agent@dev\\x2d1.service".into(),
        text: String::new(),
    };
    let cmd = unit.journal_command(10);
    assert!(
        cmd.ends_with("'_SYSTEMD_UNIT=agent@dev\\x2d1.service'"),
        "{cmd}"
    );
}

/// `Debug` of what onboarding carries never prints the NATS password.
#[tokio::test]
async fn debug_output_leaves_the_nats_password_out() {
    let mut values = agents::test_values(VmArchitecture::X86_64);
    values.nats_password = "s3cret-passw0rd".into();
    assert!(!format!("{values:?}").contains("s3cret-passw0rd"));
    let agent = agents::heartbeat();
    let onboarding = Onboarding::prepare(&config(), &agent, values)
        .await
        .unwrap();
    let shown = format!("{onboarding:?}");
    assert!(!shown.contains("s3cret-passw0rd"), "{shown}");
}
