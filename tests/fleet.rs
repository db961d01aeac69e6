//! A fleet of simulated devices on loopback, without a VM: the reference agent as 20 host
//! processes, each logged in as its own NATS user, against a real nats-server. The fleet
//! verbs and verdicts a fleet of real devices uses (`<agent>::fleet` in the matrix) on the
//! cheap devices: a rollout, half of them cut off, the other half losing power at once,
//! everything converged and delivered once; and a failing device naming itself while the
//! others are still judged.

mod common;

use devicelab::Fleet;
use devicelab::config::HarnessConfig;
use devicelab::fixtures::{arch, fleet};
use devicelab::nats::{NatsError, Verdict};
use devicelab::reference;
use devicelab::trials::Select;
use devicelab::trials::simulated::{reference_binary, reference_simulator};
use std::sync::Arc;
use std::time::Duration;

const BUDGET: Duration = Duration::from_secs(30);
/// Fast reports, so a short outage holds a backlog.
const INTERVAL_MS: u64 = 250;

async fn simulated_fleet(count: usize) -> Fleet {
    let config = HarnessConfig::from_env().unwrap();
    let binary = reference_binary(&config).await.unwrap();
    let nats = Arc::new(common::nats_process_server().await);
    Fleet::of(&reference::agent())
        .simulated(count, "sim")
        .simulated_by(reference_simulator(binary, INTERVAL_MS))
        .start_on(None, nats)
        .await
        .unwrap()
}

#[test_log::test(tokio::test(flavor = "multi_thread"))]
async fn a_rollout_through_a_split_and_a_site_outage_converges_and_delivers_once() {
    let fleet = simulated_fleet(20).await;
    let all = fleet.group(Select::All);
    assert_eq!(all.len(), 20);
    assert_eq!(fleet.reporting(&all, BUDGET).await.passed, 20);
    assert_eq!(fleet.desire(&all, 1, "interval = 5").await, 20);
    assert_eq!(fleet.converged(&all, 1, BUDGET).await.passed, 20);

    let marks = fleet.mark(&all, BUDGET).await;
    fleet.desire(&all, 2, "interval = 7").await;
    let cut_ms = devicelab_agent::now_ms();
    let (cut_off, site) = all.halves();
    fleet.partition(&cut_off).await.unwrap();
    let cut = fleet.power_cut(&site).await.unwrap();
    assert_eq!(cut.group.len(), 10);
    // Cut off means silent: once what was in flight has landed (quiet for three report
    // intervals), nothing of a partitioned device lands.
    let log = fleet.members[0].reports();
    let quiet_from = log
        .gate_after_cut(Duration::from_millis(3 * INTERVAL_MS), BUDGET)
        .await
        .unwrap();
    let during = log
        .wait_for(quiet_from, Duration::from_secs(2), |_| Verdict::Accept)
        .await;
    assert!(
        matches!(during, Err(NatsError::StatusTimeout { .. })),
        "a partitioned device's report landed: {during:?}"
    );
    let recovered = fleet.power_on(&cut).await;
    // Taken before the heal: a healed relay may deliver the backlog before `heal` returns.
    let heal_ms = devicelab_agent::now_ms();
    fleet.heal(&cut_off).await.unwrap();
    let converged = fleet.converged(&all, 2, BUDGET).await;
    let delivered = fleet.delivered(&marks, 3, BUDGET).await;
    println!("{}", fleet.table());
    fleet.verdict().unwrap();
    assert_eq!(
        (recovered.passed, converged.passed, delivered.passed),
        (10, 20, 20)
    );
    // The partitioned half kept a backlog and delivered it once healed: reports stamped
    // inside the outage, stored after it (the verdict above checked none is missing).
    let backlog = log
        .collect(quiet_from, BUDGET, |r| r.timestamp_ms > heal_ms)
        .await
        .unwrap()
        .iter()
        .filter(|s| s.stored_ms >= heal_ms && (cut_ms..heal_ms).contains(&s.report.timestamp_ms))
        .count();
    assert!(backlog >= 1, "no report of the outage arrived after it");
}

#[test_log::test(tokio::test(flavor = "multi_thread"))]
async fn a_failing_device_names_itself_and_keeps_its_evidence_while_the_rest_are_judged() {
    let fleet = simulated_fleet(3).await;
    let all = fleet.group(Select::All);
    let stuck = all.first(1).named("stuck");
    // A fault of a VM asked of a simulated device names it and the fix.
    let err = fleet.unplug_network(&stuck).await.unwrap_err().to_string();
    assert!(
        err.contains("acts on real devices only")
            && err.contains(fleet.members[0].device_id())
            && err.contains("Select::Real"),
        "{err}"
    );
    fleet.freeze(&stuck).await.unwrap();
    assert_eq!(fleet.desire(&all, 1, "x").await, 3);
    let converged = fleet.converged(&all, 1, Duration::from_secs(5)).await;
    assert_eq!((converged.passed, converged.judged), (2, 3));
    let err = fleet.verdict().unwrap_err().to_string();
    let evidence = fleet.evidence();
    assert_eq!(evidence.len(), 1, "{evidence:?}");
    assert!(evidence[0].join("agent.log").exists(), "{evidence:?}");
    let _ = std::fs::remove_dir_all(&evidence[0]);
    let stuck_id = fleet.members[0].device_id();
    assert!(
        err.contains(&format!("{stuck_id}: gen 1:")) && err.contains("evidence: "),
        "{err}"
    );
    // The others' cells are in the table beside the failure.
    let table = fleet.table();
    assert_eq!(table.matches("FAILED").count(), 1, "{table}");
    assert!(table.contains("freeze"), "{table}");
    fleet.thaw(&stuck).await.unwrap();
}

/// The `fleet` fixture: two real devices of ARCH's architecture and ten simulated ones, each
/// with an id of its own, all reporting from their current boot.
#[rstest::rstest]
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[cfg_attr(not(feature = "e2e"), ignore = "boots VMs")]
async fn the_fleet_fixture_starts_two_real_devices_and_ten_simulated_ones(
    #[future] fleet: devicelab::fixtures::Fleet,
    arch: devicelab::VmArchitecture,
) {
    let fleet = fleet.await;
    let real = fleet.group(Select::Arch(arch));
    assert_eq!((real.len(), fleet.group(Select::Simulated).len()), (2, 10));
    let all = fleet.group(Select::All);
    assert_eq!(
        fleet.reporting(&all, Duration::from_secs(120)).await.passed,
        12
    );
    let ids: std::collections::BTreeSet<&str> =
        fleet.members.iter().map(|m| m.device_id()).collect();
    assert_eq!(ids.len(), 12, "every device has an id of its own");
    fleet.verdict().unwrap();
}
