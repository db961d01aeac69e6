//! A cold boot: a first boot of the image on a fresh overlay (firmware, seed and volumes made
//! here), to the plan's waits.

use super::error::VmError;
use super::handle::Vm;
use super::plan::Plan;
use super::seed::{Seed, SeedError};
use super::start::{self, Boot};
use super::teardown::Held;
use crate::host::domain_xml::{self, UefiPflash};
use crate::host::pool::Access;
use crate::host::reaper;
use crate::ssh::keys::HostKey;
use std::path::PathBuf;
use std::time::Instant;

/// A first boot of `plan`'s image under the request's own name, with a host key made for it.
pub(crate) struct ColdBoot {
    name: String,
    host_key: HostKey,
}

impl ColdBoot {
    /// A cold boot of `plan`'s request (its host key generated here).
    pub(crate) fn new(plan: &Plan) -> Result<Self, VmError> {
        let name = plan.spec.name.clone();
        let host_key = HostKey::generate(&format!("devicelab-host@{name}"))?;
        Ok(Self { name, host_key })
    }
}

/// A cold boot of `plan`, to the plan's waits. When it fails, an image from the download
/// cache is hashed again (once per process): one whose bytes changed on disk is named in the
/// error, and the next run downloads a good copy.
pub(crate) async fn boot(plan: &Plan, held: Vec<Held>) -> Result<Vm, VmError> {
    let err = match start::start(plan, ColdBoot::new(plan)?, held).await {
        Ok(vm) => return Ok(vm),
        Err(err) => err,
    };
    if !plan.image.cached {
        return Err(err);
    }
    match crate::image::download::recheck(&plan.image.path).await {
        Ok(None) => Err(err),
        Ok(Some(rotted)) => Err(VmError::ImageRotted {
            image: plan.image.path.clone(),
            rotted,
            source: Box::new(err),
        }),
        Err(e) => {
            tracing::warn!("cannot hash {} again: {e}", plan.image.path.display());
            Err(err)
        }
    }
}

impl Boot for ColdBoot {
    const TIMED_FROM_REQUEST: bool = true;

    fn name(&self) -> &str {
        &self.name
    }

    fn host_key(&self) -> &HostKey {
        &self.host_key
    }

    async fn make_domain(&self, plan: &Plan, vm: &Vm) -> Result<(), VmError> {
        let name = &self.name;
        let owned = vm.owned.clone();
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
            &self.host_key,
            &instance_id,
        );
        let [disk_vol, seed_vol, vars_vol] = reaper::volume_names(name);
        let (pool, image, gib, fw) = (
            plan.pool.clone(),
            plan.image.clone(),
            plan.spec.disk_gib,
            plan.firmware.clone(),
        );
        // Uploads and volume calls block: off the runtime.
        let (disk, seed, uefi) = plan
            .libvirt
            .run(
                move |_| -> Result<(PathBuf, PathBuf, Option<UefiPflash>), VmError> {
                    let uefi = match fw {
                        Some(fw) => Some(UefiPflash {
                            code: pool.firmware_code(&fw)?,
                            vars: pool.upload(&vars_vol, &fw.vars, 0, Access::Private)?,
                        }),
                        None => None,
                    };
                    let disk = pool.create_overlay(&disk_vol, &image, gib)?;
                    // Written here (the seed holds the VM's host key: a private temp dir),
                    // then sent to the pool's host.
                    let written = tempfile::tempdir().map_err(|source| SeedError::Write {
                        dir: std::env::temp_dir(),
                        source,
                    })?;
                    let seed_file = written.path().join(&seed_vol);
                    seed.write_image(&seed_file)?;
                    let seed = pool.upload(&seed_vol, &seed_file, 0, Access::Private)?;
                    Ok((disk, seed, uefi))
                },
            )
            .await?;
        let rendered = domain_xml::render(&plan.domain_params(
            name,
            disk,
            seed,
            domain_xml::mac_for(&instance_id),
            uefi,
        ));
        let serial_log = vm.serial_log.clone();
        plan.libvirt
            .run(move |lv| -> Result<(), VmError> {
                let domain_xml = owned.run_dir.join("domain.xml");
                std::fs::write(&domain_xml, &rendered.xml).map_err(|source| VmError::RunDir {
                    vm: owned.name.clone(),
                    path: domain_xml,
                    source,
                })?;
                // Held across define and start: an interrupt's teardown waits for both.
                let _held = owned.lifecycle.lock().unwrap_or_else(|p| p.into_inner());
                let dom = lv.define(&owned.name, &rendered)?;
                Ok(lv.start(&dom, &owned.name, &serial_log)?)
            })
            .await?;
        tracing::info!(
            "VM {name}: {} under {} ({}), booting {}",
            plan.spec.arch,
            plan.accel.accel,
            plan.accel.reason,
            plan.image.path.display()
        );
        Ok(())
    }

    async fn wait_ready(&self, plan: &Plan, vm: &Vm, started: Instant) -> Result<(), VmError> {
        vm.wait_all(&plan.waits, started).await?;
        vm.mark_provisioned(plan.spec.ready_when);
        vm.flush_harness_writes("provisioning").await
    }
}
