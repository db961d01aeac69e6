//! The agent's own update with a power cut in the middle of the swap, on real VMs: the
//! reference agent's next release (another binary, which reports another version, and another
//! config) onboarded over the running agent, the plug pulled just after one step of that
//! onboarding, nothing flushed. The device must come back running one version or the other,
//! never neither, and a second onboarding must bring it to the new one. Boots VMs:
//! `--features e2e` (architecture: ARCH, else the host's).

use devicelab::agent::reference;
use devicelab::fixtures::*;
use devicelab::trials::agent_update::{self, Release, SwapCut};
use devicelab::trials::scenario::onboarded_device_started;
use devicelab_agent::{NEXT_VERSION, VERSION};
use std::sync::Arc;

/// On one device running the reference agent: for each of `steps`, the agent's update cut
/// just after that step (the device is brought back to the old release before each cut).
/// The table is printed and written to `target/agent-update-<arch>.md`.
async fn cuts(lab: &Lab, arch: VmArchitecture, steps: &[&str]) -> Vec<SwapCut> {
    let (old, new) = (reference::agent(), reference::agent_next());
    let (from, to) = (
        Release {
            agent: &old,
            version: VERSION,
        },
        Release {
            agent: &new,
            version: NEXT_VERSION,
        },
    );
    let device = onboarded_device_started(lab, arch, "ota", &old, None)
        .await
        .unwrap();
    let mut cuts = Vec::new();
    for step in steps {
        let cut = agent_update::cut_during_swap(lab, &device, from, to, step)
            .await
            .unwrap();
        println!("{}", agent_update::table(arch, std::slice::from_ref(&cut)));
        cuts.push(cut);
    }
    let table = agent_update::table(arch, &cuts);
    println!("{table}");
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join(format!("agent-update-{arch}.md"));
    std::fs::write(&out, &table).unwrap();
    for c in &cuts {
        assert_eq!(c.broke(), None, "\n{table}");
    }
    cuts
}

/// The short form CI runs: the plug pulled once the new binary is in place, while the old
/// config is still there and the old agent still runs.
#[rstest]
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[cfg_attr(not(feature = "e2e"), ignore = "boots a VM: run with --features e2e")]
async fn a_cut_after_the_new_binary_is_in_place_leaves_one_version_running(
    #[future] lab: Arc<Lab>,
    arch: VmArchitecture,
) {
    cuts(&*lab.await, arch, &["binary"]).await;
}

/// The tables in BENCHMARKS.md: a cut after each step of the swap that changes something
/// (the binary, the config, the restart), on one device: `ARCH=<arch> cargo test --features
/// e2e --test agent_update cut_after_each_step_of_the_agents_update -- --ignored --nocapture`.
#[rstest]
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[ignore = "three cuts on one VM; run it with -- --ignored"]
async fn cut_after_each_step_of_the_agents_update(#[future] lab: Arc<Lab>, arch: VmArchitecture) {
    cuts(&*lab.await, arch, &["binary", "config", "service"]).await;
}
