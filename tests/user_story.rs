//! How a user writes their own device test: compose the fixtures, then tell the story.
//! Boots a VM, so it runs with `--features e2e` (architecture: ARCH, else the host's).

use devicelab::fixtures::*;
use devicelab::nats::Verdict;
use devicelab::onboard::{AGENT_UNIT, AGENT_USER};

#[rstest]
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(not(feature = "e2e"), ignore = "boots a VM: run with --features e2e")]
async fn onboarded_agent_comes_back_after_pulling_the_plug(#[future] onboarded: OnboardedDevice) {
    let device = onboarded.await;
    let vm = &device.vm;
    let reports = device.nats.status_log(&device.agent.device_id);

    let before = vm.boot_id().await.unwrap();
    vm.power_cycle().await.unwrap();
    let after = vm.boot_id().await.unwrap();
    assert_ne!(before, after, "a power cycle is a new boot");

    vm.wait_for_unit(AGENT_UNIT, Some(AGENT_USER))
        .await
        .unwrap();
    let (_, status) = reports
        .wait_for(0, vm.budgets().first_status, |s| {
            if s.boot_id == after {
                Verdict::Accept
            } else {
                Verdict::Skip
            }
        })
        .await
        .unwrap();
    assert_eq!(status.device_id, device.agent.device_id);
    eprintln!("{}: phases {}", vm.name(), device.timings);
}
