//! A power cut early in a device's life: cloud-init writes the SSH host keys at first
//! boot and nothing flushes them, so a cut inside the guest's writeback delay (~30 s) leaves
//! them empty and sshd cannot start. Both sides of that timing, on real VMs: without the
//! harness's flush the device loses SSH and the harness says why within seconds; with it the
//! same cut at the same moment comes back usable. The timing is made explicit: these tests set
//! the guest's writeback delay to 5 minutes (before cloud-init writes the keys), so the cut is
//! inside the window on any host, however slow; the precondition is checked, not assumed. The
//! full sweep (docs/power-cuts.md) keeps the image's 30 s and judges each row by its measured
//! timing. Boots VMs: `--features e2e` (architecture: ARCH, else the host's). On aarch64 the
//! unflushed keys survived the same cut 2 of 2 times, which is not yet explained
//! (docs/power-cuts.md): CI runs these on x86_64, where the loss reproduced 3 of 3 times.

use devicelab::fixtures::*;
use devicelab::trials::power_cut::{self, CutOutcome, CutPoint};
use std::sync::Arc;
use std::time::Duration;

/// The guest's writeback delay in these tests: far longer than any host needs to get from the
/// host keys' write to the cut.
const WINDOW: Duration = Duration::from_secs(300);

/// Cuts `arch`'s power as soon as SSH is up (cloud-init has just written the host keys), with
/// the harness's flush or without.
async fn cut_right_after_first_boot(lab: &Lab, arch: VmArchitecture, flush: bool) -> CutOutcome {
    let nats = lab.nats().await.unwrap();
    let what = if flush { "cutf" } else { "cutn" };
    let outcome = power_cut::cut_at(
        lab,
        &nats,
        arch,
        &lab.vm_name(what, arch),
        CutPoint::after_ssh_up(Duration::ZERO),
        flush,
        Some(WINDOW),
    )
    .await
    .unwrap();
    eprintln!("{}", power_cut::table(arch, std::slice::from_ref(&outcome)));
    // The timing that decides the outcome, made explicit: the cut landed while the host keys
    // were younger than the guest's writeback delay, so their data was still only in memory
    // unless something flushed it.
    assert_eq!(
        outcome.writeback_after,
        Some(WINDOW),
        "the guest took the writeback delay from the seed"
    );
    assert_eq!(
        outcome.cut_inside_writeback_window(Duration::from_secs(5)),
        Some(true),
        "precondition: the cut must come inside the writeback window (host key {:?} old at the \
         last look, then {:?} to the cut)",
        outcome.host_key_age,
        outcome.to_cut
    );
    outcome
}

#[rstest]
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[cfg_attr(not(feature = "e2e"), ignore = "boots a VM: run with --features e2e")]
async fn an_unflushed_cut_right_after_first_boot_loses_the_host_keys_and_says_why(
    #[future] lab: Arc<Lab>,
    arch: VmArchitecture,
) {
    let lab = lab.await;
    // The key's data must still be in memory only at the last look: something else in the
    // guest (not the writeback delay) may have written it out, which makes a cut inconclusive,
    // not a pass; then again, on a new VM, 3 cuts at most in all.
    let mut outcome = cut_right_after_first_boot(&lab, arch, false).await;
    for _ in 1..3 {
        if outcome.host_key_in_memory != Some(false) {
            break;
        }
        eprintln!("the host key was on disk before the cut: inconclusive, cutting a new VM");
        outcome = cut_right_after_first_boot(&lab, arch, false).await;
    }
    assert_eq!(
        outcome.host_key_in_memory,
        Some(true),
        "precondition: the host key's data still in memory only at the last look"
    );
    assert!(!outcome.usable(), "the unflushed keys survived the cut?");
    let error = outcome
        .ssh
        .as_ref()
        .expect_err("SSH cannot come back without host keys");
    assert!(
        error.contains("the guest reports: /etc/ssh/ssh_host_ed25519_key is empty (0 bytes)"),
        "the guest's own evidence: {error}"
    );
    assert!(
        error.contains(
            "likely cause: host keys empty after a power cut within ~30 s of first boot: \
             provisioning not flushed"
        ),
        "{error}"
    );
    assert!(
        error.contains("after provisioning (SSH up), with nothing flushed since the first boot"),
        "the cut is described: {error}"
    );
    // Said on evidence (sshd's failure on the console, or the idle guest), not after waiting
    // out the budget.
    assert!(
        error.contains("sshd failed to start") || error.contains("has finished booting"),
        "{error}"
    );
    let budget = arch.budgets(lab.accel(arch).accel).power_cycle_recovery;
    assert!(
        outcome.ssh_decided_after < budget,
        "decided after {:?} of a {budget:?} budget",
        outcome.ssh_decided_after
    );
    eprintln!(
        "diagnosed {:.1} s after power on",
        outcome.ssh_decided_after.as_secs_f64()
    );
}

#[rstest]
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[cfg_attr(not(feature = "e2e"), ignore = "boots a VM: run with --features e2e")]
async fn the_same_cut_after_the_harness_flush_comes_back_usable(
    #[future] lab: Arc<Lab>,
    arch: VmArchitecture,
) {
    let lab = lab.await;
    let outcome = cut_right_after_first_boot(&lab, arch, true).await;
    let cut = outcome.cut.as_ref().expect("the cut was recorded");
    assert_eq!(
        cut.last_flush.as_ref().map(|(what, _)| what.as_str()),
        Some("provisioning"),
        "the harness flushed provisioning before the cut"
    );
    assert!(outcome.usable(), "{}", outcome.broke());
}

/// A cheaper sweep (4 VMs): as soon as SSH is up, and with the agent reporting, each without
/// and with the flush: `ARCH=<arch> cargo test --features e2e --test
/// power_cut key_points_sweep -- --ignored --nocapture`.
#[rstest]
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[ignore = "a power-cut sweep: 4 VMs; run it with -- --ignored"]
async fn key_points_sweep(#[future] lab: Arc<Lab>, arch: VmArchitecture) {
    let points = [
        CutPoint::after_ssh_up(Duration::ZERO),
        CutPoint::while_reporting(Duration::ZERO),
    ];
    run_sweep(&*lab.await, arch, &points, "key-points").await;
}

/// The table in docs/power-cuts.md: `ARCH=<arch> cargo test --features e2e --test
/// power_cut full_sweep -- --ignored --nocapture` (about 10 VMs, 30-45 min under TCG). Also
/// written to `target/power-cut-sweep-full-<arch>.md`.
#[rstest]
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[ignore = "the full power-cut sweep: about 10 VMs; run it with -- --ignored"]
async fn full_sweep(#[future] lab: Arc<Lab>, arch: VmArchitecture) {
    run_sweep(&*lab.await, arch, &CutPoint::full_sweep(), "full").await;
}

async fn run_sweep(lab: &Lab, arch: VmArchitecture, points: &[CutPoint], which: &str) {
    let outcomes = power_cut::sweep(lab, arch, points, &[false, true])
        .await
        .unwrap();
    let table = power_cut::table(arch, &outcomes);
    println!("{table}");
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join(format!("power-cut-sweep-{which}-{arch}.md"));
    std::fs::write(&out, &table).unwrap();
    // Each row against its own timing: flushed, the device is usable; unflushed and cut well
    // after the writeback delay, the keys survive. Unflushed and inside the window they are at
    // the mercy of writeback: seen here, a key 17 s old at the last look survived a cut on a
    // loaded host, while keys 5-13 s old were lost; the row says which, and only a decisive
    // timing is asserted.
    for o in &outcomes {
        if o.flushed {
            assert!(
                o.usable(),
                "flushed, yet {}: {}\n{table}",
                o.point,
                o.broke()
            );
            continue;
        }
        let keys_lost = o
            .ssh
            .as_ref()
            .err()
            .is_some_and(|e| e.contains("ssh_host_ed25519_key is empty"));
        if o.cut_inside_writeback_window(Duration::from_secs(5)) == Some(false) {
            assert!(
                !keys_lost,
                "{} unflushed, cut well after the writeback delay, yet the keys were lost\n{table}",
                o.point
            );
        }
    }
}
