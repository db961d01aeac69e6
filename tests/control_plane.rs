//! The harness as the control plane, on loopback: the real reference agent loop (its desired
//! state read from a real JetStream KV bucket, its applied state written to a real file)
//! against a real nats-server, driven through the public [`ControlPlane`] verbs. The same
//! verbs on a booted device, with a power cut inside an apply, are in `tests/update.rs`.

mod common;

use devicelab::VmArchitecture;
use devicelab::description::{AgentDescription, TemplateValues};
use devicelab::nats::NatsServer;
use devicelab::reference;
use devicelab::trials::ControlPlane;
use devicelab::trials::scenario::{ScenarioError, device_values};
use devicelab_agent::{AgentConfig, ApplyMode, CommandReply, OnDisk, run, state};
use std::path::{Path, PathBuf};
use std::time::Duration;

const BUDGET: Duration = Duration::from_secs(20);

/// `device`'s template values: its own NATS user, allowed what the reference agent needs.
async fn values(nats: &NatsServer, device: &str) -> TemplateValues {
    device_values(nats, &reference::agent(), device, VmArchitecture::X86_64)
        .await
        .unwrap()
}

/// The reference agent's own config for `device`, reporting every 100 ms, its state in `dir`.
async fn agent_config(nats: &NatsServer, device: &str, dir: &Path) -> AgentConfig {
    let mut config = reference::config_applying(&values(nats, device).await, ApplyMode::Careful);
    config.interval_ms = 100;
    let control = config
        .control
        .as_mut()
        .expect("the reference agent is two-way");
    control.state_path = dir.join("state");
    control.apply_ms = 200;
    config
}

/// The agent, running until the handle is dropped (its process killed, as far as NATS and
/// its files can tell).
struct Running(tokio::task::JoinHandle<()>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn start(config: &AgentConfig, boot: &str) -> Running {
    let (config, boot) = (config.clone(), boot.to_owned());
    Running(tokio::spawn(async move {
        if let Err(e) = run(&config, &boot, None).await {
            panic!("the agent failed: {e}");
        }
    }))
}

async fn plane(nats: &NatsServer, device: &str, agent: &AgentDescription) -> ControlPlane {
    ControlPlane::for_device(nats, agent, &values(nats, device).await)
        .await
        .unwrap()
}

fn state_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("state")
}

#[test_log::test(tokio::test(flavor = "multi_thread"))]
async fn a_desired_generation_is_applied_reported_and_kept_across_a_restart() {
    let nats = common::nats_process_server().await;
    let dir = tempfile::tempdir().unwrap();
    let device = plane(&nats, "dev-desire", &reference::agent()).await;
    let config = agent_config(&nats, "dev-desire", dir.path()).await;
    let agent = start(&config, "boot-1");

    device.desire(1, "interval = 5").await.unwrap();
    let one = device.converged(1, BUDGET).await.unwrap();
    assert_eq!(one.report.applied, Some(1), "{one:?}");
    // Measured from the put to the report's storing: the apply alone takes 200 ms.
    assert!(
        one.took >= Duration::from_millis(200) && one.took < BUDGET,
        "{one:?}"
    );
    device.desire(2, "interval = 7").await.unwrap();
    let two = device.converged(2, BUDGET).await.unwrap();
    assert_eq!(two.report.applied, Some(2));
    // What is on disk is the generation the agent reports.
    assert_eq!(
        state::read(&state_path(&dir)).unwrap(),
        OnDisk::Applied(devicelab_agent::Desired {
            generation: 2,
            document: "interval = 7".into()
        })
    );
    // The agent announced each apply before it started it.
    let log = device.reports();
    let applying = log
        .collect(0, BUDGET, |r| r.applying == Some(2))
        .await
        .unwrap();
    assert!(
        applying.iter().any(|s| s.report.applying == Some(1)),
        "no `applying 1` report: {applying:?}"
    );

    // A restart resumes from disk: generation 2 at once, nothing applied again.
    drop(agent);
    let from = log.last_sequence().await.unwrap();
    let _agent = start(&config, "boot-2");
    let first = log
        .wait_for(from, BUDGET, |r| {
            if r.boot_marker.as_deref() == Some("boot-2") {
                devicelab::nats::Verdict::Accept
            } else {
                devicelab::nats::Verdict::Skip
            }
        })
        .await
        .unwrap()
        .1;
    assert_eq!(
        (first.applied, first.applying),
        (Some(2), None),
        "{first:?}"
    );
    device
        .never_reported("an apply after the restart", Duration::from_secs(1), |r| {
            r.applying.is_some()
        })
        .await
        .unwrap();
}

#[test_log::test(tokio::test(flavor = "multi_thread"))]
async fn a_torn_state_is_reported_as_nothing_applied_then_repaired() {
    let nats = common::nats_process_server().await;
    let dir = tempfile::tempdir().unwrap();
    let device = plane(&nats, "dev-torn", &reference::agent()).await;
    device.desire(3, "c").await.unwrap();
    // What a cut inside an in-place write leaves: the new header, half the new body, the rest
    // of the old one.
    let old = state::encode(&devicelab_agent::Desired {
        generation: 2,
        document: "b".into(),
    })
    .unwrap();
    let new = state::encode(&devicelab_agent::Desired {
        generation: 3,
        document: "c".into(),
    })
    .unwrap();
    let mut torn = new[..new.len() / 2].to_vec();
    torn.extend_from_slice(&old[new.len() / 2..]);
    std::fs::write(state_path(&dir), &torn).unwrap();

    let _agent = start(&agent_config(&nats, "dev-torn", dir.path()).await, "boot-1");
    let first = device
        .reports()
        .wait_for(0, BUDGET, |_| devicelab::nats::Verdict::Accept)
        .await
        .unwrap()
        .1;
    assert_eq!(
        first.applied, None,
        "a torn state is nothing applied: {first:?}"
    );
    device.converged(3, BUDGET).await.unwrap();
    assert!(
        matches!(state::read(&state_path(&dir)).unwrap(), OnDisk::Applied(d) if d.generation == 3)
    ); // What the agent found is kept beside the repaired state: the sweep's "on disk" column.
    assert_eq!(
        std::fs::read(state::found_path(&state_path(&dir))).unwrap(),
        torn
    );
    assert!(reference::read_state(&torn).starts_with("torn ("));
    assert_eq!(
        state::found_path(Path::new(reference::STATE_PATH)),
        Path::new(reference::STATE_FOUND_PATH)
    );
}

#[test_log::test(tokio::test(flavor = "multi_thread"))]
async fn a_generation_applied_that_was_never_desired_fails_at_once() {
    let nats = common::nats_process_server().await;
    let dir = tempfile::tempdir().unwrap();
    let device = plane(&nats, "dev-stray", &reference::agent()).await;
    let _agent = start(
        &agent_config(&nats, "dev-stray", dir.path()).await,
        "boot-1",
    );
    device.desire(1, "a").await.unwrap();
    device.converged(1, BUDGET).await.unwrap();
    // Someone else (not this control plane) desires generation 5.
    let stray = reference::encode(5, "not ours");
    nats.client()
        .publish(
            format!("$KV.{}.dev-stray", reference::DESIRED_BUCKET),
            stray.into(),
        )
        .await
        .unwrap();
    nats.client().flush().await.unwrap();
    let started = std::time::Instant::now();
    device
        .reports()
        .wait_for(0, BUDGET, |r| match r.applied {
            Some(5) => devicelab::nats::Verdict::Accept,
            _ => devicelab::nats::Verdict::Skip,
        })
        .await
        .unwrap();
    // Generation 2 is older than what the agent runs: it keeps reporting 5.
    device.desire(2, "b").await.unwrap();
    let err = device.converged(2, BUDGET).await.unwrap_err().to_string();
    assert!(
        err.contains("generation 5 applied") && err.contains("highest desired is 2"),
        "{err}"
    );
    assert!(
        started.elapsed() < BUDGET,
        "it failed at the first report of 5, not at the budget"
    );
}

#[test_log::test(tokio::test(flavor = "multi_thread"))]
async fn an_agent_that_never_applies_fails_convergence_quoting_its_reports() {
    let nats = common::nats_process_server().await;
    let device = plane(&nats, "dev-deaf", &reference::agent()).await;
    // The agent only reports: its config has no control part.
    let dir = tempfile::tempdir().unwrap();
    let mut config = agent_config(&nats, "dev-deaf", dir.path()).await;
    config.control = None;
    let _agent = start(&config, "boot-1");
    device.desire(1, "a").await.unwrap();
    let err = device
        .converged(1, Duration::from_secs(2))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("did not report generation 1 applied within 2s") && err.contains("dev-deaf"),
        "{err}"
    );
    assert!(
        err.contains("applied: None"),
        "the last reports are quoted: {err}"
    );
}

#[test_log::test(tokio::test(flavor = "multi_thread"))]
async fn commands_are_answered_and_bad_requests_are_named() {
    let nats = common::nats_process_server().await;
    let dir = tempfile::tempdir().unwrap();
    let device = plane(&nats, "dev-cmd", &reference::agent()).await;
    // Nothing listens yet.
    let err = device
        .command(b"status", Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ScenarioError::Command { subject, reason }
            if subject == "devicelab.command.dev-cmd" && reason.contains("nothing listens")),
        "{err}"
    );
    let _agent = start(&agent_config(&nats, "dev-cmd", dir.path()).await, "boot-1");
    device.desire(4, "d").await.unwrap();
    device.converged(4, BUDGET).await.unwrap();
    let reply: CommandReply =
        serde_json::from_slice(&device.command(b"status", BUDGET).await.unwrap()).unwrap();
    match reply {
        CommandReply::Status(s) => {
            assert_eq!((s.device_id.as_str(), s.applied), ("dev-cmd", Some(4)))
        }
        other => panic!("expected a status: {other:?}"),
    }
    let reply: CommandReply =
        serde_json::from_slice(&device.command(b"reboot", BUDGET).await.unwrap()).unwrap();
    assert!(
        matches!(&reply, CommandReply::Error(e) if e.contains("unknown command \"reboot\"")),
        "{reply:?}"
    );
}

#[test_log::test(tokio::test(flavor = "multi_thread"))]
async fn the_verbs_refuse_what_cannot_be_judged() {
    let nats = common::nats_process_server().await;
    let device = plane(&nats, "dev-verbs", &reference::agent()).await;
    let err = device.converged(1, BUDGET).await.unwrap_err().to_string();
    assert!(
        err.contains("never desired") && err.contains("desire(1"),
        "{err}"
    );
    device.desire(2, "b").await.unwrap();
    let err = device.desire(2, "again").await.unwrap_err().to_string();
    assert!(err.contains("not newer than generation 2"), "{err}");
    // Two puts of one generation at once: one is refused, whichever comes second.
    let (a, b) = tokio::join!(device.desire(3, "c"), device.desire(3, "c again"));
    assert!(a.is_ok() != b.is_ok(), "{a:?} {b:?}");

    let listener = AgentDescription {
        control: None,
        ..reference::agent()
    };
    let only_reports = plane(&nats, "dev-listen", &listener).await;
    for err in [
        only_reports.desire(1, "a").await.unwrap_err(),
        only_reports.command(b"status", BUDGET).await.unwrap_err(),
    ] {
        assert!(err.to_string().contains("has no Control part"), "{err}");
    }
    let no_commands = AgentDescription {
        control: Some(devicelab::description::Control::key_value(
            reference::DESIRED_BUCKET,
            "{device_id}",
            reference::encode,
        )),
        ..reference::agent()
    };
    let err = plane(&nats, "dev-nocmd", &no_commands)
        .await
        .command(b"status", BUDGET)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("takes no commands") && err.contains("with_commands"),
        "{err}"
    );
}

#[test_log::test(tokio::test(flavor = "multi_thread"))]
async fn never_reported_passes_a_quiet_window_and_fails_at_the_first_match() {
    let nats = common::nats_process_server().await;
    let dir = tempfile::tempdir().unwrap();
    let device = plane(&nats, "dev-never", &reference::agent()).await;
    let _agent = start(
        &agent_config(&nats, "dev-never", dir.path()).await,
        "boot-1",
    );
    device
        .never_reported("a torn state", Duration::from_secs(1), |r| {
            r.applied.is_none()
        })
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let err = device
        .never_reported("generation 0", BUDGET, |r| r.applied == Some(0))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("dev-never reported generation 0"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "at the first match"
    );

    // A device that sends nothing proves nothing.
    let silent = plane(&nats, "dev-silent", &reference::agent()).await;
    let err = silent
        .never_reported("a torn state", Duration::from_secs(1), |r| {
            r.applied.is_none()
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("dev-silent sent no report"), "{err}");
}
