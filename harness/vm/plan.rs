//! The plan: everything a request resolves to before anything is created (built by
//! `Lab::plan`, carried out by [`super::run`]).

use crate::host::accel::AccelDecision;
use crate::host::domain_xml::{DomainXmlParams, RunOwner, UefiPflash};
use crate::host::libvirt::Libvirt;
use crate::host::pool::Pool;
use crate::host::slots::SlotCount;
use crate::image::BaseImage;
use crate::image::firmware::{self, FirmwarePair};
use crate::model::arch::{Budgets, FirmwareKind};
use crate::model::spec::{Start, VirtualMachineSpec};
use crate::model::wait::Wait;
use crate::ssh::Route;
use crate::ssh::keys::ClientKey;
use std::path::PathBuf;

/// Everything a request resolves to before anything is created: the lab's facts about the
/// architecture (accelerator, budgets, emulator, QEMU arguments, firmware, image) and where
/// things go. Built by `Lab::plan`.
#[derive(Clone)]
pub struct Plan {
    pub spec: VirtualMachineSpec,
    pub accel: AccelDecision,
    pub budgets: Budgets,
    pub image: BaseImage,
    pub emulator: PathBuf,
    /// Another host's QEMU version: the machine type its libvirt resolves the architecture's
    /// to, e.g. `pc-q35-7.2` (`None` on this machine).
    pub qemu_version: Option<String>,
    pub qemu_args: Vec<String>,
    pub firmware: Option<FirmwarePair>,
    pub waits: Vec<Wait>,
    pub libvirt: Libvirt,
    pub pool: Pool,
    pub network: String,
    /// How the guests' ports are reached: directly, or through the libvirt host's SSH login.
    pub route: Route,
    pub client_key: ClientKey,
    pub owner: RunOwner,
    pub runs_dir: PathBuf,
    pub keep: bool,
    /// Cold or warm (the spec's choice, else the configuration's).
    pub start: Start,
    /// The host's VM slots for a VM of this size, where their locks live, and how long to
    /// wait for one.
    pub slots: SlotCount,
    pub slots_dir: PathBuf,
    /// Whose slots this request counts as its own (its test's lab): a test already holding
    /// one goes over the count rather than wait for itself.
    pub slot_group: String,
    pub slot_budget: std::time::Duration,
    /// Where saved VMs are kept (warm starts).
    pub warm_dir: PathBuf,
}

impl Plan {
    /// The domain XML parameters of `plan`'s VM called `name` (a cold boot's, and a saved VM's key).
    pub(crate) fn domain_params(
        &self,
        name: &str,
        disk: PathBuf,
        seed: PathBuf,
        mac: String,
        uefi: Option<UefiPflash>,
    ) -> DomainXmlParams {
        DomainXmlParams {
            name: name.to_owned(),
            arch: self.spec.arch,
            accel: self.accel.accel,
            vcpus: self.spec.vcpus,
            memory_mib: self.spec.memory_mib,
            emulator: self.emulator.clone(),
            disk,
            seed,
            network: self.network.clone(),
            mac,
            uefi,
            qemu_args: self.qemu_args.clone(),
            owner: self.owner.clone(),
        }
    }
}

/// The firmware a plan for `kind` needs (found once per plan; copies happen at run time).
pub fn firmware_for(
    kind: FirmwareKind,
    configured: Option<&FirmwarePair>,
) -> Result<Option<FirmwarePair>, firmware::FirmwareError> {
    match kind {
        FirmwareKind::Bios => Ok(None),
        FirmwareKind::UefiPflash => firmware::discover(configured).map(Some),
    }
}
