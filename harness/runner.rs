//! The runner: turns a resolved [`Plan`] into a running VM. It creates the run dir and the
//! handle first (so every later failure is cleaned up by the handle), then prepares the
//! assets (firmware, overlay, seed), renders, defines and starts the domain, and applies the
//! plan's wait strategies. A failure once the domain has started keeps what explains it.

use crate::accel::AccelDecision;
use crate::arch::{Budgets, FirmwareKind};
use crate::domain_xml::{self, DomainXmlParams, RunOwner, UefiPflash};
use crate::firmware::{self, FirmwarePair};
use crate::image::BaseImage;
use crate::keys::{ClientKey, HostKey};
use crate::libvirt::{Libvirt, LibvirtError};
use crate::pool::Pool;
use crate::reaper::{self, OwnerRecord};
use crate::seed::Seed;
use crate::slots::{self, SlotCount};
use crate::spec::{Start, VirtualMachineSpec};
use crate::teardown::{self, Owned};
use crate::vm::{Login, Vm, VmError, VmParts};
use crate::waits::Wait;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

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
    pub qemu_args: Vec<String>,
    pub firmware: Option<FirmwarePair>,
    pub waits: Vec<Wait>,
    pub libvirt: Libvirt,
    pub pool: Pool,
    pub network: String,
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
    pub slot_budget: std::time::Duration,
    /// Where saved VMs are kept (warm starts).
    pub warm_dir: PathBuf,
}

/// Something a VM holds until its teardown is done (a VM slot, a saved VM's clone lock).
pub(crate) type Held = Box<dyn std::any::Any + Send + Sync>;

/// Runs `plan`: a ready VM, or an error that says what happened (with the kept artifacts once
/// the domain had started). First a VM slot of this host (waiting for one if all are held).
pub async fn run(plan: Plan) -> Result<Vm, VmError> {
    let slot = slots::acquire(
        plan.slots_dir.clone(),
        &plan.slots,
        plan.spec.name.clone(),
        plan.slot_budget,
    )
    .await?;
    let held: Vec<Held> = slot.into_iter().map(|s| Box::new(s) as Held).collect();
    match plan.start {
        Start::Warm => crate::warm::start(plan, held).await,
        Start::Cold => boot(plan, held).await,
    }
}

/// The handle of `name`, before anything of it exists in libvirt: its run dir and owner
/// record are written, so every later failure is cleaned up by the handle.
pub(crate) async fn open_handle(
    plan: &Plan,
    name: &str,
    host_key: HostKey,
    held: Vec<Held>,
) -> Result<Vm, VmError> {
    // A background teardown of an earlier VM of this name (run dir included) finishes first.
    {
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || teardown::wait_for(&name))
            .await
            .map_err(|e| VmError::Task(e.to_string()))?;
    }
    let run_dir = create_run_dir(&plan.runs_dir, name).map_err(|source| VmError::RunDir {
        vm: name.to_owned(),
        path: plan.runs_dir.join(name),
        source,
    })?;
    let serial_log = run_dir.join("serial.log");
    let _ = std::fs::remove_file(&serial_log); // a stale log from a reused name would mislead
    // Recorded before anything exists, so a killed run leaves a trail for the reaper.
    if let Err(source) = OwnerRecord::current(&plan.owner.run_id).write(&run_dir) {
        let _ = std::fs::remove_dir_all(&run_dir); // nothing else exists yet
        return Err(VmError::RunDir {
            vm: name.to_owned(),
            path: run_dir.join(reaper::OWNER_FILE),
            source,
        });
    }
    let owned = Owned {
        libvirt: plan.libvirt.clone(),
        pool: plan.pool.clone(),
        name: name.to_owned(),
        run_dir: run_dir.clone(),
        lifecycle: Arc::new(Mutex::new(())),
        held: Arc::new(held),
    };
    Ok(Vm::new(VmParts {
        owned,
        arch: plan.spec.arch,
        login: Login {
            user: plan.spec.first_boot.admin_user.clone(),
            key: plan.client_key.private.clone(),
            key_path: plan.client_key.path.clone(),
            host_key,
        },
        budgets: plan.budgets,
        serial_log,
        keep: plan.keep,
        flush_provisioning: plan.spec.flush_provisioning,
    }))
}

/// The domain XML parameters of `plan`'s VM called `name` (the runner's, and a saved VM's key).
pub(crate) fn domain_params(
    plan: &Plan,
    name: &str,
    disk: PathBuf,
    seed: PathBuf,
    mac: String,
    serial_log: PathBuf,
    uefi: Option<UefiPflash>,
) -> DomainXmlParams {
    DomainXmlParams {
        name: name.to_owned(),
        arch: plan.spec.arch,
        accel: plan.accel.accel,
        vcpus: plan.spec.vcpus,
        memory_mib: plan.spec.memory_mib,
        emulator: plan.emulator.clone(),
        disk,
        seed,
        network: plan.network.clone(),
        mac,
        serial_log,
        uefi,
        qemu_args: plan.qemu_args.clone(),
        owner: plan.owner.clone(),
    }
}

/// A cold boot: a first boot of the image on a fresh overlay, to the plan's waits.
pub(crate) async fn boot(plan: Plan, held: Vec<Held>) -> Result<Vm, VmError> {
    let name = plan.spec.name.clone();
    let host_key = HostKey::generate(&format!("devicelab-host@{name}"))?;
    let started = Instant::now();
    let vm = open_handle(&plan, &name, host_key.clone(), held).await?;
    let owned = vm.owned.clone();
    let serial_log = vm.serial_log.clone();
    let run_dir = owned.run_dir.clone();

    // Every instance gets its own identity, MAC included: a name reused within the DHCP
    // lease time (an hour) must not find the previous instance's lease under its MAC.
    let instance_id = format!(
        "{name}-{}-{}",
        plan.owner.run_id,
        hex::encode(rand::random::<[u8; 3]>())
    );
    let seed = Seed::new(
        &plan.spec,
        &plan.client_key.public_line,
        &host_key,
        &instance_id,
    );
    let [disk_vol, seed_vol, vars_vol] = reaper::volume_names(&name);
    let assets = {
        let (pool, image, gib, fw) = (
            plan.pool.clone(),
            plan.image.clone(),
            plan.spec.disk_gib,
            plan.firmware.clone(),
        );
        // File copies and volume calls block: off the runtime.
        plan.libvirt
            .run(
                move |_| -> Result<(PathBuf, PathBuf, Option<UefiPflash>), VmError> {
                    let uefi = match fw {
                        Some(fw) => Some(UefiPflash {
                            code: firmware::padded_code(&fw, &pool.dir)?,
                            vars: firmware::vars_copy(&fw, &pool.path_of(&vars_vol))?,
                        }),
                        None => None,
                    };
                    let disk = pool.create_overlay(&disk_vol, &image, gib)?;
                    let seed_path = pool.path_of(&seed_vol);
                    seed.write_image(&seed_path)?;
                    pool.refresh()?;
                    Ok((disk, seed_path, uefi))
                },
            )
            .await?
    };
    let (disk, seed, uefi) = assets;
    let rendered = domain_xml::render(&domain_params(
        &plan,
        &name,
        disk,
        seed,
        domain_xml::mac_for(&instance_id),
        serial_log.clone(),
        uefi,
    ));
    let domain_xml = run_dir.join("domain.xml");
    std::fs::write(&domain_xml, &rendered.xml).map_err(|source| VmError::RunDir {
        vm: name.clone(),
        path: domain_xml,
        source,
    })?;
    {
        let owned = owned.clone();
        plan.libvirt
            .run(move |lv| -> Result<(), LibvirtError> {
                // Held across define and start: an interrupt's teardown waits for both.
                let _held = owned.lifecycle.lock().unwrap_or_else(|p| p.into_inner());
                let dom = lv.define(&owned.name, &rendered)?;
                lv.start(&dom, &owned.name)
            })
            .await?
    };
    tracing::info!(
        "VM {name}: {} under {} ({}), booting {}",
        plan.spec.arch,
        plan.accel.accel,
        plan.accel.reason,
        plan.image.path.display()
    );

    let ready = async {
        vm.wait_all(&plan.waits, started).await?;
        vm.mark_provisioned(plan.spec.ready_when);
        vm.flush_harness_writes("provisioning").await
    }
    .await;
    handed_over(vm, ready).await
}

/// The handle, once its domain started and `ready` says provisioning finished; otherwise the
/// error, with what explains it kept, and the VM removed.
pub(crate) async fn handed_over(vm: Vm, ready: Result<(), VmError>) -> Result<Vm, VmError> {
    match ready {
        Ok(()) => Ok(vm),
        Err(e) => {
            let error = vm.keep_artifacts_of(e).await;
            // Gone by the time the caller sees the error (a retry may reuse the name).
            if let Err(te) = vm.remove().await {
                tracing::warn!("{te}");
            }
            Err(error)
        }
    }
}

/// `runs/<vm>`: the guest's logs and known_hosts, the owner's only.
fn create_run_dir(runs: &Path, name: &str) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(runs)?;
    std::fs::set_permissions(runs, std::fs::Permissions::from_mode(0o711))?;
    let dir = runs.join(name);
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(dir)
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
