//! Removing a VM: what it owns in libvirt (domain, NVRAM, volumes), then its owner record and
//! run dir. `Vm::remove` awaits it and returns the errors; a dropped handle hands it to a
//! thread of its own ([`crate::support::background`]), so a `Drop` on a runtime worker never
//! blocks on libvirt.

use crate::host::libvirt::Libvirt;
use crate::host::pool::Pool;
use crate::host::reaper::{self, CleanupGuard};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Something a VM holds until its teardown is done (a VM slot, a saved VM's clone lock).
pub(crate) type Held = Box<dyn std::any::Any + Send + Sync>;

#[derive(Debug, thiserror::Error)]
#[error(
    "VM {vm}: cleanup failed: {}\n  its owner record stays in {run_dir}, so the next run's reaper retries",
    errors.join("; ")
)]
pub struct TeardownError {
    pub vm: String,
    pub run_dir: PathBuf,
    pub errors: Vec<String>,
}

/// Everything a VM owns, and the lock that keeps a teardown from racing a define or start of
/// the same VM (an interrupt arriving mid-define must not remove the domain and then see it
/// defined behind its back).
#[derive(Clone)]
pub(crate) struct Owned {
    pub libvirt: Libvirt,
    pub pool: Pool,
    pub name: String,
    pub run_dir: PathBuf,
    pub lifecycle: Arc<Mutex<()>>,
    /// Released once the last clone goes, after the teardown: the claim on the VM's name, its
    /// slot on this host, a saved VM's clone lock.
    #[allow(dead_code)] // never read: holding is its whole job
    pub held: Arc<Vec<Held>>,
}

impl Owned {
    /// Removes the domain and volumes; the owner record goes only once that succeeded (a
    /// leaked VM keeps its trail for the reaper); the run dir too, unless `keep_run_dir`.
    pub fn remove(&self, keep_run_dir: bool) -> Result<(), TeardownError> {
        let _held = self.lifecycle.lock().unwrap_or_else(|p| p.into_inner());
        let errors = reaper::remove_vm(&self.libvirt, &self.pool, &self.name);
        if !errors.is_empty() {
            self.hold_until_exit();
            return Err(TeardownError {
                vm: self.name.clone(),
                run_dir: self.run_dir.clone(),
                errors,
            });
        }
        if keep_run_dir {
            let _ = std::fs::remove_file(self.run_dir.join(reaper::OWNER_FILE));
        } else {
            let _ = std::fs::remove_dir_all(&self.run_dir);
        }
        Ok(())
    }

    /// The name the VM's request claimed (its run dir's): what a later request of that name
    /// waits on while this teardown runs in the background.
    pub fn claimed_name(&self) -> String {
        self.run_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.name.clone())
    }

    /// A VM that outlives its handle (kept, or its teardown failed) keeps what it holds, its
    /// name, its VM slot and its saved VM's clone lock, until this process exits: nothing else
    /// in this process takes them while its domain may still run. (Once the process is gone,
    /// its owner record and its domain say the same to the next run.)
    pub fn hold_until_exit(&self) {
        std::mem::forget(self.held.clone());
    }

    /// The cleanup run on SIGINT/SIGTERM: nobody will read this run's logs (DEVICELAB_KEEP is
    /// for that), so the run dir goes too, but only with the VM.
    pub fn on_interrupt(&self) -> CleanupGuard {
        let owned = self.clone();
        reaper::on_interrupt(move || match owned.remove(false) {
            // The process exits right after, without dropping the claim: its file goes here.
            Ok(()) => {
                if let Some(runs) = owned.run_dir.parent() {
                    let claim = runs
                        .join(reaper::CLAIMS)
                        .join(format!("{}.lock", owned.claimed_name()));
                    let _ = std::fs::remove_file(claim);
                }
            }
            Err(e) => eprintln!("devicelab: {e}"),
        })
    }
}
