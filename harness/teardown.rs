//! Removing a VM: what it owns in libvirt (domain, NVRAM, volumes), then its owner record and
//! run dir. `Vm::remove` awaits it and returns the errors; a dropped handle hands it to a
//! thread of its own, so a `Drop` on a runtime worker never blocks on libvirt. Those threads
//! are joined before the process exits, and a name being torn down is waited for before it
//! is provisioned again.

use crate::libvirt::Libvirt;
use crate::pool::Pool;
use crate::reaper::{self, CleanupGuard};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;

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
    /// Released once the last clone goes, after the teardown: the VM's slot on this host,
    /// a saved VM's clone lock.
    #[allow(dead_code)] // never read: holding is its whole job
    pub held: Arc<Vec<crate::runner::Held>>,
}

impl Owned {
    /// Removes the domain and volumes; the owner record goes only once that succeeded (a
    /// leaked VM keeps its trail for the reaper); the run dir too, unless `keep_run_dir`.
    pub fn remove(&self, keep_run_dir: bool) -> Result<(), TeardownError> {
        let _held = self.lifecycle.lock().unwrap_or_else(|p| p.into_inner());
        let errors = reaper::remove_vm(&self.libvirt, &self.pool, &self.name);
        if !errors.is_empty() {
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

    /// The cleanup run on SIGINT/SIGTERM: nobody will read this run's logs (DEVICELAB_KEEP is
    /// for that), so the run dir goes too, but only with the VM.
    pub fn on_interrupt(&self) -> CleanupGuard {
        let owned = self.clone();
        reaper::on_interrupt(move || {
            if let Err(e) = owned.remove(false) {
                eprintln!("devicelab: {e}");
            }
        })
    }
}

/// Runs a blocking cleanup on a thread of its own, joined before the process exits (and by
/// [`wait_for`] of the same `name`); if no thread can be started, runs it here.
pub(crate) fn in_background(name: String, cleanup: impl FnOnce() + Send + 'static) {
    let cleanup = Arc::new(Mutex::new(Some(cleanup)));
    let mine = cleanup.clone();
    let spawned = std::thread::Builder::new()
        .name("devicelab-teardown".into())
        .spawn(move || {
            if let Some(f) = mine.lock().unwrap_or_else(|p| p.into_inner()).take() {
                f();
            }
        });
    match spawned {
        Ok(handle) => {
            install_exit_join();
            pending()
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((name, handle));
        }
        Err(e) => {
            eprintln!("devicelab: no thread for the cleanup of {name} ({e}): cleaning up here");
            if let Some(f) = cleanup.lock().unwrap_or_else(|p| p.into_inner()).take() {
                f();
            }
        }
    }
}

type Pending = Mutex<Vec<(String, JoinHandle<()>)>>;

fn pending() -> &'static Pending {
    static PENDING: Pending = Mutex::new(Vec::new());
    &PENDING
}

/// Blocks until every background teardown of `name` is done (blocking: call it off the
/// runtime). A test that drops a VM and provisions the same name again gets a clean slate.
pub(crate) fn wait_for(name: &str) {
    let mine: Vec<_> = {
        let mut all = pending().lock().unwrap_or_else(|p| p.into_inner());
        let (mine, rest) = std::mem::take(&mut *all)
            .into_iter()
            .partition(|(n, _)| n == name);
        *all = rest;
        mine
    };
    for (_, handle) in mine {
        let _ = handle.join();
    }
}

/// Joins every background teardown; registered with `atexit`, so a test process that returns
/// (or calls `exit`) right after dropping a VM still removes it.
extern "C" fn join_all() {
    let all = std::mem::take(&mut *pending().lock().unwrap_or_else(|p| p.into_inner()));
    for (_, handle) in all {
        let _ = handle.join();
    }
}

fn install_exit_join() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: registers a plain function with no captured state.
        if unsafe { libc::atexit(join_all) } != 0 {
            eprintln!("devicelab: cannot register the exit-time teardown join");
        }
    });
}
