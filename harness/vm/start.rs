//! The one skeleton every start follows, cold boot and warm restore alike: open the handle
//! (its run dir and owner record first, so every later failure is cleaned up by it), make the
//! domain, wait until it is ready, then hand it over, or keep what explains the failure and
//! remove it.

use super::error::VmError;
use super::handle::{Login, Vm, VmParts};
use super::plan::Plan;
use super::teardown::{Held, Owned};
use crate::host::reaper::{self, OwnerRecord};
use crate::ssh::keys::HostKey;
use crate::support::background;
use crate::support::lock::{self, FileLock, Removal};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One way of bringing a VM's domain up: [`super::cold::ColdBoot`] or
/// [`super::warm::WarmRestore`].
pub(crate) trait Boot {
    /// Whether the clock its waits are timed by starts with the request (a cold boot: waiting
    /// for an earlier VM of its name to be torn down is part of its time), or once the handle
    /// is open (a warm restore: "restore → SSH" is the restore's own time, not the previous
    /// clone's teardown).
    const TIMED_FROM_REQUEST: bool;
    /// The domain's name.
    fn name(&self) -> &str;
    /// The host key the guest presents (its SSH trust).
    fn host_key(&self) -> &HostKey;
    /// Creates the domain and starts it; the handle's run dir exists.
    async fn make_domain(&self, plan: &Plan, vm: &Vm) -> Result<(), VmError>;
    /// Waits until the VM counts as ready (the request's waits, timed from `started`).
    async fn wait_ready(&self, plan: &Plan, vm: &Vm, started: Instant) -> Result<(), VmError>;
}

/// Brings `boot`'s VM up for `plan`: a ready handle, or the error. A failure before the
/// domain runs removes what was made and returns the error as it is (there is nothing of the
/// guest to keep); a failure once it runs keeps what explains it, then removes the VM.
pub(crate) async fn start<B: Boot>(plan: &Plan, boot: B, held: Vec<Held>) -> Result<Vm, VmError> {
    let requested = Instant::now();
    let vm = open_handle(plan, boot.name(), boot.host_key().clone(), held).await?;
    let started = if B::TIMED_FROM_REQUEST {
        requested
    } else {
        Instant::now()
    };
    if let Err(e) = Box::pin(boot.make_domain(plan, &vm)).await {
        if let Err(te) = vm.discard().await {
            tracing::warn!("{te}");
        }
        return Err(e);
    }
    let ready = Box::pin(boot.wait_ready(plan, &vm, started)).await;
    handed_over(vm, ready).await
}

/// The handle of the request's VM, whose domain is `domain`, before anything of it exists in
/// libvirt (its name claimed already: [`claim`]): its run dir and owner record are written, so
/// every later failure is cleaned up by the handle.
async fn open_handle(
    plan: &Plan,
    domain: &str,
    host_key: HostKey,
    held: Vec<Held>,
) -> Result<Vm, VmError> {
    let run_dir = {
        let (plan, domain) = (plan.clone(), domain.to_owned());
        tokio::task::spawn_blocking(move || -> Result<PathBuf, VmError> {
            let run_dir = create_run_dir(&plan.runs_dir, &plan.spec.name).map_err(|source| {
                VmError::RunDir {
                    vm: plan.spec.name.clone(),
                    path: plan.runs_dir.join(&plan.spec.name),
                    source,
                }
            })?;
            // A stale log from a reused name would mislead.
            let _ = std::fs::remove_file(run_dir.join("serial.log"));
            // Recorded before anything exists, so a killed run leaves a trail for the reaper.
            let owner = OwnerRecord::current(&plan.owner.run_id, &domain, &plan.libvirt.uri);
            if let Err(source) = owner.write(&run_dir) {
                let _ = std::fs::remove_dir_all(&run_dir); // nothing else exists yet
                return Err(VmError::RunDir {
                    vm: plan.spec.name.clone(),
                    path: run_dir.join(reaper::OWNER_FILE),
                    source,
                });
            }
            Ok(run_dir)
        })
        .await
        .map_err(|e| VmError::Task(e.to_string()))?
    };
    let run_dir = run_dir?;
    let owned = Owned {
        libvirt: plan.libvirt.clone(),
        pool: plan.pool.clone(),
        name: domain.to_owned(),
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
        route: plan.route.clone(),
        budgets: plan.budgets,
        serial_log: run_dir.join("serial.log"),
        keep: plan.keep,
        flush_provisioning: plan.spec.flush_provisioning,
    }))
}

/// The claim on the request's name, taken before anything else (its VM slot included: a name
/// in use fails at once): held until its VM is gone, so no other test, in this process or
/// another, makes a VM of that name meanwhile. What a dead run left under the name is removed
/// first; what a live run owns, or a kept VM, is never touched (an error says whose it is).
pub(crate) async fn claim(plan: &Plan) -> Result<FileLock, VmError> {
    let plan = plan.clone();
    tokio::task::spawn_blocking(move || claim_blocking(&plan))
        .await
        .map_err(|e| VmError::Task(e.to_string()))?
}

fn claim_blocking(plan: &Plan) -> Result<FileLock, VmError> {
    let name = &plan.spec.name;
    // A background teardown of an earlier VM of this name in this process finishes first.
    background::wait_for(name);
    let claims = plan.runs_dir.join(reaper::CLAIMS);
    let io = |path: PathBuf| {
        let vm = name.clone();
        move |source| VmError::RunDir { vm, path, source }
    };
    lock::private_dir(&claims).map_err(io(claims.clone()))?;
    let path = claims.join(format!("{name}.lock"));
    let holder = format!("run {}", plan.owner.run_id);
    let Some(claim) =
        lock::try_lock(&path, &holder, Removal::OnRelease).map_err(io(path.clone()))?
    else {
        return Err(VmError::NameInUse {
            vm: name.clone(),
            owner: lock::holder_of(&path),
            fix: "give each VM its own name (`Lab::vm_name` makes one no other call gives)",
        });
    };
    let run_dir = plan.runs_dir.join(name);
    if let Some(owner) = OwnerRecord::read(&run_dir) {
        if owner.kept {
            return Err(VmError::NameInUse {
                vm: name.clone(),
                owner: format!("a VM kept by {} (DEVICELAB_KEEP)", owner.describe()),
                fix: "remove it with `devicelab clean` once you are done with it, or use another name",
            });
        }
        if owner.owner_alive() {
            return Err(VmError::NameInUse {
                vm: name.clone(),
                owner: format!(
                    "a VM of {} whose teardown has not succeeded",
                    owner.describe()
                ),
                fix: "its teardown error says what failed; `devicelab clean` removes it once that run is gone",
            });
        }
        let dirs = reaper::DataDirs {
            runs: plan.runs_dir.clone(),
            warm: plan.warm_dir.clone(),
        };
        match reaper::reap_one(&plan.libvirt, &plan.pool, &dirs, &run_dir, &owner) {
            Ok(domain) => tracing::warn!(
                "VM {name}: removed VM {domain} left under this name by {} (gone)",
                owner.describe()
            ),
            Err(errors) => {
                return Err(VmError::NameInUse {
                    vm: name.clone(),
                    owner: format!(
                        "VM {}, left by {} (gone), which could not be removed: {}",
                        owner.domain_in(&run_dir),
                        owner.describe(),
                        errors.join("; ")
                    ),
                    fix: "fix what the error names, then `devicelab clean`",
                });
            }
        }
    }
    Ok(claim)
}

/// The handle, once its domain started and `ready` says provisioning finished; otherwise the
/// error, with what explains it kept, and the VM removed.
async fn handed_over(vm: Vm, ready: Result<(), VmError>) -> Result<Vm, VmError> {
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
