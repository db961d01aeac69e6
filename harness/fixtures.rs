//! rstest fixtures for users' own tests. Compose them in `#[rstest] #[tokio::test]`:
//!
//! ```ignore
//! use devicelab::fixtures::*;
//! #[rstest]
//! #[tokio::test(flavor = "multi_thread")]
//! async fn agent_survives_power_cycle(#[future] onboarded: OnboardedDevice) {
//!     let device = onboarded.await;
//!     device.vm.power_cycle().await.unwrap();
//! }
//! ```

// What a test using the fixtures names, so one `use devicelab::fixtures::*` is enough.
pub use crate::agent::description::AgentDescription;
pub use crate::image::firmware::FirmwarePair;
pub use crate::image::source::BaseImage;
pub use crate::lab::Lab;
pub use crate::model::arch::VmArchitecture;
use crate::model::spec::VirtualMachineSpec;
pub use crate::nats::NatsServer;
pub use crate::trials::fleet::{Fleet, Group, Select};
pub use crate::trials::scenario::OnboardedDevice;
pub use crate::vm::Vm;
pub use rstest::{fixture, rstest};
use std::sync::Arc;

/// The lab, from the environment (DEVICELAB_* variables).
#[fixture]
pub async fn lab() -> Arc<Lab> {
    crate::init_logging();
    Lab::from_env()
        .await
        .unwrap_or_else(|e| panic!("devicelab: {e}"))
}

/// The architecture under test: `ARCH`, else the host's.
#[fixture]
pub fn arch() -> VmArchitecture {
    crate::config::HarnessConfig::from_env()
        .unwrap_or_else(|e| panic!("devicelab: {e}"))
        .arch_filter
        .or_else(VmArchitecture::host)
        .expect("devicelab: unknown host architecture; set ARCH")
}

/// The cloud image VMs of `arch` boot (downloaded and verified once, or the local override).
#[fixture]
pub async fn image(#[future] lab: Arc<Lab>, arch: VmArchitecture) -> BaseImage {
    lab.await
        .base_image(arch)
        .await
        .unwrap_or_else(|e| panic!("devicelab: {e}"))
}

/// The aarch64 UEFI firmware, CODE padded to 64 MiB, as the lab's aarch64 VMs boot it.
#[fixture]
pub async fn firmware(#[future] lab: Arc<Lab>) -> FirmwarePair {
    lab.await
        .firmware()
        .await
        .unwrap_or_else(|e| panic!("devicelab: {e}"))
}

/// A NATS server the lab's VMs can reach.
#[fixture]
pub async fn nats(#[future] lab: Arc<Lab>) -> NatsServer {
    lab.await
        .nats()
        .await
        .unwrap_or_else(|e| panic!("devicelab: {e}"))
}

/// A ready VM of `arch` (SSH up, cloud-init done), removed when dropped.
#[fixture]
pub async fn vm(#[future] lab: Arc<Lab>, arch: VmArchitecture) -> Vm {
    let lab = lab.await;
    let name = lab.vm_name("vm", arch);
    lab.vm(VirtualMachineSpec::new(name, arch))
        .await
        .unwrap_or_else(|e| panic!("devicelab: {e}"))
}

/// The agent under test: the reference agent unless a test passes its own (rstest's
/// `#[with(..)]`, or a fixture of your own named `agent` in scope).
#[fixture]
pub fn agent() -> AgentDescription {
    crate::agent::reference::agent()
}

/// A VM with `agent` onboarded and its first report received.
#[fixture]
pub async fn onboarded(
    #[future] lab: Arc<Lab>,
    arch: VmArchitecture,
    agent: AgentDescription,
) -> OnboardedDevice {
    let lab = lab.await;
    crate::trials::scenario::onboarded_device_with(&lab, arch, "dev", &agent)
        .await
        .unwrap_or_else(|e| panic!("devicelab: {e}"))
}

/// A fleet of `agent`: two real devices of `arch` and ten simulated ones (the reference
/// agent's simulator), on one NATS server, each its own identity; removed when dropped. For
/// another shape, build one: [`Fleet::of`](crate::trials::Fleet::of).
#[fixture]
pub async fn fleet(
    #[future] lab: Arc<Lab>,
    arch: VmArchitecture,
    agent: AgentDescription,
) -> Fleet {
    let lab = lab.await;
    Fleet::of(&agent)
        .real(2, arch, "real")
        .simulated(10, "sim")
        .start(&lab)
        .await
        .unwrap_or_else(|e| panic!("devicelab: {e}"))
}
