//! The faults a field device meets (`harness/faults.rs`), each against the reference agent
//! reporting from a real VM (warm: these prove delivery, not the first boot): a pulled cable, a
//! frozen device, a bad link, a clock thrown back and then a power cut, a full disk; and a
//! package manager another process holds at onboarding (the second agent, which installs
//! `.deb`s). Each prints its figures. `--features e2e`.

mod agents;

use devicelab::Start;
use devicelab::fixtures::*;
use devicelab::nats::Stored;
use devicelab::trials::outage::{Outage, judge_delivery, ride_out};
use devicelab::trials::scenario::{
    AfterCut, OnboardedDevice, onboarded_device_started, pull_the_plug,
};
use devicelab::vm::faults::BadLink;
use devicelab_agent::now_ms;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

async fn device(lab: &Lab, arch: VmArchitecture, what: &str) -> OnboardedDevice {
    onboarded_device_started(
        lab,
        arch,
        what,
        &devicelab::reference::agent(),
        Some(Start::Warm),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

async fn carrier_downs(vm: &Vm) -> u64 {
    vm.succeed("cat /sys/class/net/$(ip -o route show default | awk '{print $5; exit}')/carrier_down_count")
        .await
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[rstest]
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[cfg_attr(not(feature = "e2e"), ignore = "boots a VM: run with --features e2e")]
async fn a_pulled_cable_and_a_frozen_device_lose_no_report(
    #[future] lab: Arc<Lab>,
    arch: VmArchitecture,
) {
    let lab = lab.await;
    let device = device(&lab, arch, "cable").await;
    let vm = &device.vm;

    let downs = carrier_downs(vm).await;
    let (delivery, first_after) = ride_out(
        &device,
        Outage::silent(Duration::from_secs(20)),
        async || vm.unplug_network().await,
        async || vm.plug_network().await,
    )
    .await
    .unwrap();
    assert!(
        carrier_downs(vm).await > downs,
        "the guest saw the carrier go down"
    );
    eprintln!(
        "cable pulled 20 s: backlog {} delivered once each, in order; first report {:.1} s after plugging",
        delivery.backlog,
        first_after.as_secs_f64()
    );
    assert!(
        delivery.backlog > 0,
        "the agent kept what it made while unplugged"
    );

    let (delivery, first_after) = ride_out(
        &device,
        Outage::silent(Duration::from_secs(20)),
        async || vm.freeze().await,
        async || vm.thaw().await,
    )
    .await
    .unwrap();
    eprintln!(
        "frozen 20 s: {} reports after thawing, in order, none twice; first {:.1} s after thawing",
        delivery.reports,
        first_after.as_secs_f64()
    );
    let log: Vec<String> = vm.fault_log().into_iter().map(|(what, _)| what).collect();
    assert_eq!(log.len(), 4, "every fault is logged with its time: {log:?}");
}

#[rstest]
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[cfg_attr(not(feature = "e2e"), ignore = "boots a VM: run with --features e2e")]
async fn every_report_arrives_once_in_order_over_a_bad_link(
    #[future] lab: Arc<Lab>,
    arch: VmArchitecture,
) {
    let lab = lab.await;
    let device = device(&lab, arch, "badlink").await;
    let vm = &device.vm;
    let log = device.reports();
    // Report-to-store latency on the good link first: the device's clock and the host's differ
    // by a little even once stepped, and the slow link must add its delay to that.
    let latency_of = |stored: &[Stored<devicelab::description::Report>]| {
        let mut ms: Vec<i64> = stored
            .iter()
            .map(|s| s.stored_ms as i64 - s.report.timestamp_ms as i64)
            .collect();
        ms.sort_unstable();
        ms
    };
    let pct = |ms: &[i64], p: usize| ms[(ms.len() * p / 100).min(ms.len() - 1)];
    let until = now_ms() + 10_000;
    let good = latency_of(
        &log.collect(
            log.last_sequence().await.unwrap(),
            Duration::from_secs(60),
            |r| r.timestamp_ms > until,
        )
        .await
        .unwrap(),
    );
    let link = BadLink {
        latency: Duration::from_millis(300),
        jitter: Duration::from_millis(50),
        loss_percent: 5.0,
        rate_kbit: None,
    };
    vm.degrade_link(link).await.unwrap();
    // Measured after the qdisc is in place: from the next report on.
    let (gate, last_before) = log
        .wait_for(
            log.last_sequence().await.unwrap(),
            Duration::from_secs(60),
            |_| devicelab::nats::Verdict::Accept,
        )
        .await
        .unwrap();
    let until = now_ms() + 40_000;
    let stored: Vec<Stored<_>> = log
        .collect(gate, Duration::from_secs(120), |r| r.timestamp_ms > until)
        .await
        .unwrap();
    vm.restore_link().await.unwrap();
    let reports: Vec<_> = stored.iter().map(|s| s.report.clone()).collect();
    let delivery = judge_delivery(&last_before, &reports, (0, 0), Duration::from_secs(2)).unwrap();
    let latency = latency_of(&stored);
    let added = pct(&latency, 50) - pct(&good, 50);
    eprintln!(
        "bad link (300 ms ± 50 ms, 5 % loss): {} reports once each, in order; report-to-store \
         latency p50 {} ms, p99 {} ms, against p50 {} ms on the good link ({} reports)",
        delivery.reports,
        pct(&latency, 50),
        pct(&latency, 99),
        pct(&good, 50),
        good.len()
    );
    assert!(delivery.reports >= 15, "about 20 reports in 40 s");
    assert!(
        added >= 250,
        "the link really was slow: p50 {added} ms more than on the good link"
    );
}

#[rstest]
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[cfg_attr(not(feature = "e2e"), ignore = "boots a VM: run with --features e2e")]
async fn a_clock_thrown_back_does_not_fool_the_power_cycle_verdict(
    #[future] lab: Arc<Lab>,
    arch: VmArchitecture,
) {
    let lab = lab.await;
    let device = device(&lab, arch, "clock").await;
    let vm = &device.vm;
    // Six hours back, now and in the RTC the next boot reads (within e2fsck's one-day fudge
    // for a last-mount time in the future, so the boot does not stop at a file system check).
    vm.set_clock(SystemTime::now() - Duration::from_secs(6 * 3600))
        .await
        .unwrap();
    // The power_cycle trial's own verdict: the report after the gate from another boot, whose
    // marker is the device's new boot id.
    let AfterCut { report, gate_ms } = pull_the_plug(&device).await.unwrap();
    let new_boot = vm.boot_id().await.unwrap();
    assert_eq!(report.boot_marker.as_deref(), Some(new_boot.as_str()));
    assert!(
        report.timestamp_ms + 3_600_000 < gate_ms,
        "the new boot's clock really was behind: its report is stamped {} ms before the gate",
        gate_ms as i64 - report.timestamp_ms as i64
    );
    eprintln!(
        "clock 6 h behind across a power cut: the new boot's first report (stamped {:.1} h \
         before the gate) was accepted on its boot marker and stream position",
        (gate_ms - report.timestamp_ms) as f64 / 3.6e6
    );
    vm.restore_clock().await.unwrap();
}

#[rstest]
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[cfg_attr(not(feature = "e2e"), ignore = "boots a VM: run with --features e2e")]
async fn the_agent_keeps_reporting_on_a_full_disk_and_after_it(
    #[future] lab: Arc<Lab>,
    arch: VmArchitecture,
) {
    let lab = lab.await;
    let device = device(&lab, arch, "fulldisk").await;
    let vm = &device.vm;
    let (delivery, first_after) = ride_out(
        &device,
        Outage::reachable(Duration::from_secs(30)),
        async || {
            let left = vm.fill_disk(0).await?;
            eprintln!("disk filled: {left} bytes left");
            // Full for root too: even a small write fails.
            let refused = vm
                .fail("sudo -n dd if=/dev/zero of=/var/devicelab-probe bs=1M count=4 conv=fsync")
                .await?;
            assert!(refused.contains("No space left"), "{refused}");
            Ok(())
        },
        async || vm.free_disk().await,
    )
    .await
    .unwrap();
    eprintln!(
        "disk full 30 s: the agent kept reporting ({} reports, {} stamped while full, once each, \
         in order); first report {:.1} s after space came back",
        delivery.reports,
        delivery.backlog,
        first_after.as_secs_f64()
    );
    assert!(
        delivery.backlog >= 10,
        "it reported while the disk was full"
    );
    vm.succeed("sudo -n dd if=/dev/zero of=/var/devicelab-probe bs=1M count=4 conv=fsync && sudo -n rm /var/devicelab-probe")
        .await
        .unwrap();
}

/// The guest's package manager held by another process when onboarding begins, as apt-daily
/// holds it in an Ubuntu image's first minutes: the packages step waits for the lock (trying
/// again every 5 s, within half the command budget), then installs.
#[rstest]
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[cfg_attr(not(feature = "e2e"), ignore = "boots a VM: run with --features e2e")]
async fn onboarding_waits_for_a_package_manager_another_process_holds(
    #[future] lab: Arc<Lab>,
    arch: VmArchitecture,
) {
    use devicelab::agent::onboard::Onboarding;
    let lab = lab.await;
    let agent = agents::heartbeat();
    let nats = lab.nats_for(&agent).await.unwrap();
    let name = lab.vm_name("dpkglock", arch);
    let values = devicelab::trials::scenario::device_values(&nats, &agent, &name, arch)
        .await
        .unwrap();
    let vm = lab
        .vm(devicelab::VirtualMachineSpec::new(&name, arch).with_start(Start::Warm))
        .await
        .unwrap();
    let onboarding = Onboarding::prepare(&lab.config, &agent, values)
        .await
        .unwrap();
    // dpkg's frontend lock, taken as dpkg and apt take it (an fcntl lock) and held for 20 s.
    let held = Duration::from_secs(20);
    vm.succeed(&format!(
        "cat > /tmp/hold-dpkg-lock.py <<'END'
import fcntl, time
f = open('/var/lib/dpkg/lock-frontend', 'w')
fcntl.lockf(f, fcntl.LOCK_EX)
print('held', flush=True)
time.sleep({})
END
sudo -n nohup python3 /tmp/hold-dpkg-lock.py > /tmp/hold-dpkg-lock.out 2>&1 &
for i in $(seq 50); do grep -q held /tmp/hold-dpkg-lock.out 2>/dev/null && exit 0; sleep 0.2; done
cat /tmp/hold-dpkg-lock.out; exit 1",
        held.as_secs()
    ))
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let report = onboarding.apply_until(&vm, "packages").await;
    let took = started.elapsed();
    let report = report.unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "packages step with dpkg locked for {} s: {report} in {:.1} s",
        held.as_secs(),
        took.as_secs_f64()
    );
    assert_eq!(report.changed_steps(), ["packages"], "it installed");
    assert!(
        took >= held - Duration::from_secs(3),
        "it waited for the lock: {took:?}"
    );
    vm.succeed("dpkg-query -W netcat-openbsd").await.unwrap();
}
