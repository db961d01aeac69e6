//! How a user writes their own device test: compose the fixtures, then tell the story.
//! Boots a VM, so it runs with `--features e2e` (architecture: ARCH, else the host's).

use devicelab::fixtures::*;
use devicelab::nats::Verdict;

#[rstest]
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[cfg_attr(not(feature = "e2e"), ignore = "boots a VM: run with --features e2e")]
async fn onboarded_agent_comes_back_after_pulling_the_plug(#[future] onboarded: OnboardedDevice) {
    let device = onboarded.await;
    let vm = &device.vm;
    let reports = device.reports();

    let before = vm.boot_id().await.unwrap();
    vm.power_off().await.unwrap();
    // The plug is out: once what the old boot sent last has landed, nothing of it can come.
    // After this gate, only the new boot may speak.
    let gate = reports.gate().await.unwrap();
    vm.power_on().await.unwrap();
    vm.wait_for_ssh().await.unwrap();
    let after = vm.boot_id().await.unwrap();
    assert_ne!(before, after, "a power cycle is a new boot");

    let service = &device.agent.service;
    vm.wait_for_unit(service.unit(), service.user())
        .await
        .unwrap();
    let (seq, status) = reports
        .wait_for(gate, vm.budgets().first_status, |r| {
            match r.boot_marker.as_deref() {
                Some(b) if b == before => {
                    Verdict::Reject(format!("a report from the old boot after the gate: {r:?}"))
                }
                Some(b) if b == after => Verdict::Accept,
                _ => Verdict::Skip,
            }
        })
        .await
        .unwrap();
    eprintln!("first report of the new boot: stream sequence {seq} (gate {gate}): {status:?}");
    eprintln!("{}: phases {}", vm.name(), device.timings);
}
