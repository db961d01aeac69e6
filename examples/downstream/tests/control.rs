//! acme's control part on loopback, through devicelab's public API only: the real acme-agent
//! binary against a real NATS server that devicelab starts, driven by the harness as its
//! control plane. Its reports carry the device id only in the subject, as MQTT devices do:
//! the description's decoder reads it there, and each device's log holds its own reports.
//! Each device logs in as its own NATS user, allowed only its own subjects and key.
//! `cargo nextest run -p acme-device-tests` (needs `nats-server` on PATH).

mod acme;

use devicelab::VmArchitecture;
use devicelab::config::HarnessConfig;
use devicelab::description::{ReportsOn, TemplateValues};
use devicelab::nats::{NatsServer, Verdict};
use devicelab::trials::ControlPlane;
use devicelab::trials::scenario::device_values;
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

const BUDGET: Duration = Duration::from_secs(20);

async fn nats() -> NatsServer {
    let vars = [("DEVICELAB_NATS".to_owned(), "process".to_owned())];
    let config = HarnessConfig::from_vars(vars.into_iter().collect()).unwrap();
    NatsServer::start(
        &config,
        std::net::Ipv4Addr::LOCALHOST,
        &devicelab::lab::run_owner(),
    )
    .await
    .unwrap()
}

/// Device `id`'s values: its own NATS user, allowed only what acme's description implies.
async fn values(nats: &NatsServer, id: &str) -> TemplateValues {
    device_values(nats, &acme::agent(), id, VmArchitecture::X86_64)
        .await
        .unwrap()
}

/// The agent as a process on this host, its state in `dir`, reporting every 100 ms; killed
/// when dropped.
struct Agent(Child);

impl Agent {
    async fn start(nats: &NatsServer, id: &str, dir: &Path) -> Self {
        let v = values(nats, id).await;
        let config = acme_device_tests::AcmeConfig {
            id: v.device_id,
            nats_url: v.nats_url,
            user: v.nats_user,
            password: v.nats_password,
            state: dir.join(format!("{id}.json")).display().to_string(),
            interval_ms: 100,
        };
        let path = dir.join(format!("{id}-agent.json"));
        std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
        Self(
            Command::new(env!("CARGO_BIN_EXE_acme-agent"))
                .arg(&path)
                .spawn()
                .unwrap(),
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn desired_state_is_applied_and_reports_are_told_apart_by_their_subject() {
    let nats = nats().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = acme::agent();
    let a = ControlPlane::for_device(&nats, &agent, &values(&nats, "acme-a").await)
        .await
        .unwrap();
    let b = ControlPlane::for_device(&nats, &agent, &values(&nats, "acme-b").await)
        .await
        .unwrap();
    let running_a = Agent::start(&nats, "acme-a", dir.path()).await;
    let _running_b = Agent::start(&nats, "acme-b", dir.path()).await;

    a.desire(1, "led=green").await.unwrap();
    let one = a.converged(1, BUDGET).await.unwrap();
    assert_eq!(one.report.device_id, "acme-a", "{one:?}");
    a.desire(2, "led=blue").await.unwrap();
    a.converged(2, BUDGET).await.unwrap();
    let kept: acme_device_tests::AcmeDesired =
        serde_json::from_slice(&std::fs::read(dir.path().join("acme-a.json")).unwrap()).unwrap();
    assert_eq!((kept.generation, kept.settings.as_str()), (2, "led=blue"));

    // Both report on acme.reports.*, payloads without an id: read unfiltered, the reports of
    // both devices are there, each log for one device holds that device's only, and b,
    // desired nothing, applied nothing.
    let all = nats.report_log(
        &ReportsOn::Subject("acme.reports.*".into()),
        agent.reports.decode.clone(),
    );
    let mut seen = std::collections::BTreeSet::new();
    all.collect(0, BUDGET, |r| {
        seen.insert(r.device_id.clone());
        seen.len() == 2
    })
    .await
    .unwrap();
    assert_eq!(seen, ["acme-a", "acme-b"].map(String::from).into());
    b.never_reported(
        "an apply on a device desired nothing",
        Duration::from_millis(500),
        |r| r.applied.is_some() || r.applying.is_some(),
    )
    .await
    .unwrap();
    let ours = a
        .reports()
        .collect(0, BUDGET, |r| r.applied == Some(2))
        .await
        .unwrap();
    assert!(
        ours.iter().any(|s| s.report.applying == Some(2)),
        "no `applying 2`: {ours:?}"
    );

    // Restarted, it resumes from what it kept: generation 2, nothing applied again.
    drop(running_a);
    // Everything the old process sent has landed: what comes after is the new one's.
    let from = a.reports().gate().await.unwrap();
    let _running_a = Agent::start(&nats, "acme-a", dir.path()).await;
    let (_, first) = a
        .reports()
        .wait_for(from, BUDGET, |_| Verdict::Accept)
        .await
        .unwrap();
    assert_eq!(
        (first.applied, first.applying),
        (Some(2), None),
        "{first:?}"
    );
    let after = a
        .reports()
        .collect(from, BUDGET, |r| {
            r.timestamp_ms > first.timestamp_ms + 1_000
        })
        .await
        .unwrap();
    assert!(
        after.iter().all(|s| s.report.applying.is_none()),
        "an apply after the restart: {after:?}"
    );
}

/// A fleet of acme agents as simulated devices (host processes, each its own NATS user): each
/// reports from its simulated boot, a rollout converges on every one, and one frozen device
/// fails alone, named.
#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_of_simulated_acme_devices_converges_and_names_a_stuck_one() {
    use devicelab::trials::{Fleet, Select};
    let nats = std::sync::Arc::new(nats().await);
    let fleet = Fleet::of(&acme::agent())
        .simulated(5, "acme")
        .simulated_by(acme::simulator())
        .start_on(None, nats)
        .await
        .unwrap();
    let all = fleet.group(Select::All);
    // Each reports from the boot the harness gave it (its own, not the host's).
    assert_eq!(fleet.reporting(&all, BUDGET).await.passed, 5);
    assert_eq!(fleet.desire(&all, 1, "led=green").await, 5);
    assert_eq!(fleet.converged(&all, 1, BUDGET).await.passed, 5);
    let stuck = all.first(1);
    fleet.freeze(&stuck).await.unwrap();
    fleet.desire(&all, 2, "led=red").await;
    let two = fleet.converged(&all, 2, Duration::from_secs(10)).await;
    assert_eq!((two.passed, two.judged), (4, 5), "{}", fleet.table());
    let err = fleet.verdict().unwrap_err().to_string();
    assert!(err.contains(fleet.members[0].device_id()), "{err}");
    for kept in fleet.evidence() {
        let _ = std::fs::remove_dir_all(kept);
    }
    fleet.thaw(&stuck).await.unwrap();
}
