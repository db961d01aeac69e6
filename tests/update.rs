//! Power cut in the middle of an update, on real VMs: the reference agent applies generation 2
//! while the harness pulls the plug on the agent's own "applying 2" report (plus an offset that
//! lands inside the apply). The careful agent (temp file, fsync, rename, fsync of the
//! directory) must come back whole; the same agent writing in place must be caught torn: the
//! pair proves the verdict can pass and can fail. Boots VMs: `--features e2e` (architecture:
//! ARCH, else the host's).

use devicelab::agent::onboard::Onboarding;
use devicelab::agent::reference;
use devicelab::fixtures::*;
use devicelab::trials::scenario::{OnboardedDevice, device_values, onboarded_device_started};
use devicelab::trials::update::{self, ApplyCut, CutWhen, StateFile};
use devicelab_agent::ApplyMode;
use std::sync::Arc;
use std::time::Duration;

/// The reference agent's state, as it found it after power-on.
const STATE: StateFile = StateFile {
    path: reference::STATE_FOUND_PATH,
    read: reference::read_state,
};

/// Offsets after the "applying 2" report: the apply takes `reference::APPLY_MS` (4 s), its
/// writes spread evenly over it.
fn offsets(points: u64) -> Vec<Duration> {
    (0..points)
        .map(|i| Duration::from_millis(reference::APPLY_MS * i / points))
        .collect()
}

/// The sweep of `mode`'s agent over `offsets`, its table printed and written under `target/`.
async fn sweep(
    lab: &Lab,
    arch: VmArchitecture,
    mode: ApplyMode,
    offsets: &[Duration],
) -> Vec<ApplyCut> {
    let agent = reference::agent_applying(mode);
    let cuts = update::sweep(lab, arch, &agent, offsets, Some(STATE))
        .await
        .unwrap();
    let table = update::table(arch, &agent.name, &cuts);
    println!("{table}");
    let show = |d: Option<Duration>, unit: f64, name: &str| {
        d.map_or("none".into(), |d| {
            format!("{:.1} {name}", d.as_secs_f64() * unit)
        })
    };
    println!(
        "{arch}, {}: median trigger → cut {}; median power-on → applied 2 {}",
        agent.name,
        show(update::median_delay(&cuts), 1e3, "ms"),
        show(update::median_converged(&cuts), 1.0, "s")
    );
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join(format!("update-sweep-full-{}-{arch}.md", agent.name));
    std::fs::write(&out, &table).unwrap();
    cuts
}

/// Every cut of the careful agent comes back whole and usable, and converges.
fn assert_whole(cuts: &[ApplyCut], arch: VmArchitecture) {
    let table = update::table(arch, "devicelab-agent", cuts);
    for c in cuts {
        assert_eq!(c.broke(), None, "the careful agent broke\n{table}");
        let whole = [c.from, c.to].map(|g| format!("generation {g}"));
        assert!(
            c.on_disk.as_ref().is_some_and(|d| whole.contains(d)),
            "on disk after the cut: {:?}\n{table}",
            c.on_disk
        );
    }
}

/// At least one cut of the in-place agent is caught torn: on disk, and by the verdict.
fn assert_caught_torn(cuts: &[ApplyCut], arch: VmArchitecture) {
    let table = update::table(arch, "devicelab-agent-in-place", cuts);
    let torn: Vec<_> = cuts
        .iter()
        .filter(|c| c.on_disk.as_deref().is_some_and(|d| d.starts_with("torn")))
        .collect();
    assert!(
        !torn.is_empty(),
        "no cut tore the in-place agent's state\n{table}"
    );
    for c in torn {
        let wrong = c.broke().unwrap_or_default();
        assert!(
            c.applied_after().is_none() && wrong.contains("torn, or nothing"),
            "a torn state must fail the verdict: {wrong:?}\n{table}"
        );
        // Torn, yet it repairs itself: the desired state is still there.
        assert!(c.converged.is_ok(), "{table}");
    }
}

/// How many cuts of one agent's apply the short form makes at most, looking for one that lands
/// inside it.
const TRIES: u64 = 3;

/// Cuts `device`'s apply halfway through, of generation `from + 1`, then of the next ones, until
/// the plug is pulled inside the apply by the host's clock ([`update::Fired::within`]), in
/// [`TRIES`] cuts at most: a busy host can pull it late, after the apply ended, and such a cut
/// proves nothing about a cut inside. A late cut must still pass `late` (what any cut must
/// leave) and converge, and is flushed before the next cut. Returns the cut inside, or every
/// late one.
async fn a_cut_inside(
    device: &OnboardedDevice,
    agent: &str,
    from: u64,
    late: impl Fn(&ApplyCut),
) -> Result<ApplyCut, Vec<ApplyCut>> {
    let apply = Duration::from_millis(reference::APPLY_MS);
    let mut missed = Vec::new();
    for from in from..from + TRIES {
        let when = update::applying(from + 1).after(apply / 2);
        let cut = update::cut_during_apply(device, from, from + 1, when, Some(STATE))
            .await
            .unwrap();
        let table = update::table(device.vm.arch(), agent, std::slice::from_ref(&cut));
        println!("{table}");
        if cut.fired.within(apply) {
            return Ok(cut);
        }
        println!(
            "inconclusive: the plug was pulled {:.0} ms after the trigger, past the {apply:?} apply; \
             cutting the next one",
            (cut.fired.offset + cut.fired.delay).as_secs_f64() * 1e3
        );
        late(&cut);
        assert!(
            cut.agent_active && cut.converged.is_ok(),
            "a late cut left the agent broken\n{table}"
        );
        device.vm.flush().await.unwrap();
        missed.push(cut);
    }
    Err(missed)
}

/// The cut inside the apply, or a failure that shows every late one.
fn inside(outcome: Result<ApplyCut, Vec<ApplyCut>>, agent: &str, arch: VmArchitecture) -> ApplyCut {
    outcome.unwrap_or_else(|late| {
        panic!(
            "none of {TRIES} cuts landed inside the {} ms apply: the host pulled the plug too \
             late each time\n{}",
            reference::APPLY_MS,
            update::table(arch, agent, &late)
        )
    })
}

/// The short form CI runs, on one device: a cut halfway through the careful agent's apply of
/// generation 2; then the same agent switched to writing in place (its config rewritten, its
/// unit restarted) and the same cut halfway through its apply of the next generation. A cut the
/// host pulled after the apply's end is inconclusive: the next apply is cut instead ([`TRIES`]
/// cuts at most in all).
#[rstest]
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[cfg_attr(not(feature = "e2e"), ignore = "boots a VM: run with --features e2e")]
async fn a_cut_inside_the_apply_leaves_the_careful_agent_whole_and_the_in_place_one_torn(
    #[future] lab: Arc<Lab>,
    arch: VmArchitecture,
) {
    let lab = lab.await;
    let device = onboarded_device_started(&lab, arch, "pair", &reference::agent(), None)
        .await
        .unwrap();
    update::converge_durably(&device, 1).await.unwrap();
    let careful = inside(
        a_cut_inside(&device, "devicelab-agent", 1, |c| {
            assert_whole(std::slice::from_ref(c), arch)
        })
        .await,
        "devicelab-agent",
        arch,
    );
    assert_whole(std::slice::from_ref(&careful), arch);

    // Onboarded over the careful agent: its config changes, its unit restarts, all flushed.
    let in_place = reference::agent_applying(ApplyMode::InPlace);
    let values = device_values(&device.nats, &in_place, &device.device_id, arch)
        .await
        .unwrap();
    Onboarding::prepare(&lab.config, &in_place, values)
        .await
        .unwrap()
        .apply(&device.vm)
        .await
        .unwrap();
    let torn = inside(
        a_cut_inside(&device, &in_place.name, careful.to, |_| ()).await,
        &in_place.name,
        arch,
    );
    assert_caught_torn(std::slice::from_ref(&torn), arch);
}

/// The tables in docs/power-cuts.md: 8 cut points across the apply for each of the pair, each
/// on a fresh device: `ARCH=<arch> cargo test --features e2e --test update cut_during_apply_sweep
/// -- --ignored --nocapture` (16 VMs). Also written to `target/update-sweep-full-<agent>-<arch>.md`.
#[rstest]
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[ignore = "the cut-during-apply sweep: 16 VMs; run it with -- --ignored"]
async fn cut_during_apply_sweep(#[future] lab: Arc<Lab>, arch: VmArchitecture) {
    let lab = lab.await;
    let points = offsets(8);
    let careful = sweep(&lab, arch, ApplyMode::Careful, &points).await;
    let in_place = sweep(&lab, arch, ApplyMode::InPlace, &points).await;
    assert_whole(&careful, arch);
    assert_caught_torn(&in_place, arch);
}

/// The other triggers, on one device: converged to generation 1, the plug pulled 1 s after
/// generation 2 is desired (the careful agent comes back whole, whichever moment of its
/// apply that was); then pulled when the device's console prints a line with a text.
#[rstest]
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[cfg_attr(not(feature = "e2e"), ignore = "boots a VM: run with --features e2e")]
async fn a_cut_fires_after_the_desire_and_on_a_console_text(
    #[future] lab: Arc<Lab>,
    arch: VmArchitecture,
) {
    let lab = lab.await;
    let device = onboarded_device_started(&lab, arch, "trig", &reference::agent(), None)
        .await
        .unwrap();
    let when = CutWhen::desired().after(Duration::from_secs(1));
    let cut = update::converge_then_cut(&device, when, Some(STATE))
        .await
        .unwrap();
    println!(
        "{}",
        update::table(arch, "devicelab-agent", std::slice::from_ref(&cut))
    );
    assert!(
        cut.fired.trigger.contains(reference::DESIRED_BUCKET),
        "{}",
        cut.fired.trigger
    );
    assert_whole(std::slice::from_ref(&cut), arch);

    const MARK: &str = "devicelab-cut-here";
    let armed = device.arm_cut(CutWhen::console(MARK)).await.unwrap();
    // A kernel message of level 2 (critical): printed on the serial console.
    device
        .vm
        .succeed(&format!(
            "echo '<2>{MARK}' | sudo -n tee /dev/kmsg >/dev/null"
        ))
        .await
        .unwrap();
    let fired = armed
        .fire(device.vm.budgets().power_cycle_recovery)
        .await
        .unwrap();
    println!(
        "{arch}: console text → cut {:.0} ms ({})",
        fired.delay.as_secs_f64() * 1e3,
        fired.trigger
    );
    assert!(fired.trigger.contains(MARK), "{}", fired.trigger);
}
