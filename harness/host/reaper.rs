//! Cleanup on every exit path. Normal exits and panics drop the handles; SIGINT/SIGTERM run
//! the registered cleanups and exit non-zero; SIGKILL leaves an owner record behind, which the
//! next run's reaper finds (its process is gone) and cleans up after, with the pool volumes a
//! killed run was uploading.

use crate::host::libvirt::Libvirt;
use crate::host::pool::Pool;
use crate::support::lock::{self, Removal};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};

/// Who created a VM: written before anything is created, removed once it is cleaned up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    pub run_id: String,
    pub pid: u32,
    /// The process's start time (clock ticks after boot), so a reused pid is not mistaken
    /// for the owner.
    pub start_time: u64,
    /// Left on purpose (DEVICELAB_KEEP): never reaped.
    pub kept: bool,
    /// The libvirt domain the run dir's VM is (a warm clone's is its saved VM's name, not the
    /// run dir's). Empty in a record that names none: then the run dir's name.
    #[serde(default)]
    pub domain: String,
    /// The libvirt URI of the host the VM runs on: hosts share one data dir, and each reaps
    /// and lists only its own. Empty in a record that names none: then any host's.
    #[serde(default)]
    pub host: String,
}

pub const OWNER_FILE: &str = "owner.json";

/// How long one podman call may take (the image is local: nothing is pulled). A hung podman
/// must not hang the run.
pub const PODMAN_BUDGET: std::time::Duration = std::time::Duration::from_secs(120);

/// Where the claims on VM names are, under the runs dir (`<name>.lock`, held by the VM's
/// process while its VM exists).
pub const CLAIMS: &str = ".claims";

pub use crate::support::process::{is_alive, process_start_time};

/// In a kept NATS directory: the reaper leaves it alone.
pub const KEPT_MARK: &str = "kept";

/// The start of a NATS server directory's name in the temp dir: owner pid and start time, so a
/// dead owner's directory can be found and removed.
pub fn nats_dir_prefix(pid: u32) -> String {
    format!(
        "devicelab-nats-{pid}-{}-",
        process_start_time(pid).unwrap_or(0)
    )
}

/// The start of a simulated device's directory's name in the temp dir (its agent's config with
/// its password, its state), named for its owner like a NATS server's.
pub fn simulated_dir_prefix(pid: u32) -> String {
    format!(
        "devicelab-sim-{pid}-{}-",
        process_start_time(pid).unwrap_or(0)
    )
}

/// Removes the NATS directories (configuration with the password, JetStream store) and the
/// simulated devices' directories of owners that are gone, except kept ones; returns their
/// paths.
pub fn reap_nats_dirs(temp_dir: &Path) -> Vec<std::path::PathBuf> {
    reap_nats_dirs_of(temp_dir, false)
}

fn reap_nats_dirs_of(temp_dir: &Path, kept_too: bool) -> Vec<std::path::PathBuf> {
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(temp_dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name
            .strip_prefix("devicelab-nats-")
            .or_else(|| name.strip_prefix("devicelab-sim-"))
        else {
            continue;
        };
        let mut f = rest.splitn(3, '-');
        let (Some(Ok(pid)), Some(Ok(start))) = (
            f.next().map(str::parse::<u32>),
            f.next().map(str::parse::<u64>),
        ) else {
            continue;
        };
        let path = entry.path();
        if is_alive(pid, start) || (path.join(KEPT_MARK).exists() && !kept_too) {
            continue;
        }
        if std::fs::remove_dir_all(&path).is_ok() {
            tracing::warn!("reaped {} (pid {pid} is gone)", path.display());
            removed.push(path);
        }
    }
    removed
}

impl OwnerRecord {
    /// This process's record for the VM whose domain is `domain`, on the host `host` (a
    /// libvirt URI) names.
    pub fn current(run_id: &str, domain: &str, host: &str) -> Self {
        let pid = std::process::id();
        Self {
            run_id: run_id.to_owned(),
            pid,
            start_time: process_start_time(pid).unwrap_or(0),
            kept: false,
            domain: domain.to_owned(),
            host: host.to_owned(),
        }
    }

    /// Whether its VM is on the host `libvirt_uri` names (a record naming no host: on any).
    pub fn is_on(&self, libvirt_uri: &str) -> bool {
        self.host.is_empty() || self.host == libvirt_uri
    }

    /// The domain of the VM recorded in `run_dir`.
    pub fn domain_in(&self, run_dir: &Path) -> String {
        if self.domain.is_empty() {
            run_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        } else {
            self.domain.clone()
        }
    }

    /// Whether the process that wrote it still runs.
    pub fn owner_alive(&self) -> bool {
        is_alive(self.pid, self.start_time)
    }

    /// Who it says owns the VM, for a message.
    pub fn describe(&self) -> String {
        format!(
            "run {} (pid {}{})",
            self.run_id,
            self.pid,
            if self.pid == std::process::id() {
                ", this process"
            } else {
                ""
            }
        )
    }

    pub fn write(&self, run_dir: &Path) -> std::io::Result<()> {
        let tmp = run_dir.join(".owner.json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec(self).expect("owner record serializes"),
        )?;
        std::fs::rename(tmp, run_dir.join(OWNER_FILE))
    }

    pub fn read(run_dir: &Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(run_dir.join(OWNER_FILE)).ok()?).ok()
    }
}

/// The run dirs under `runs_dir` with an owner record, and the record.
pub fn run_records(runs_dir: &Path) -> Vec<(std::path::PathBuf, OwnerRecord)> {
    std::fs::read_dir(runs_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.path(), OwnerRecord::read(&e.path())?)))
        .collect()
}

/// The run dir of the VM called `name`: a request's name (its run dir's), or a domain's (a
/// warm clone's run dir has the request's name, its domain the saved VM's). Where a dead run's
/// dir and a live clone's both name the domain, the live one's.
pub fn run_dir_of(runs_dir: &Path, name: &str) -> Option<std::path::PathBuf> {
    let direct = runs_dir.join(name);
    if OwnerRecord::read(&direct).is_some() {
        return Some(direct);
    }
    let mut naming: Vec<_> = run_records(runs_dir)
        .into_iter()
        .filter(|(dir, owner)| owner.domain_in(dir) == name)
        .collect();
    naming.sort_by_key(|(_, owner)| !owner.owner_alive());
    naming.into_iter().next().map(|(dir, _)| dir)
}

/// The volumes a VM named `name` may own in the pool.
pub fn volume_names(name: &str) -> [String; 3] {
    [
        format!("{name}.qcow2"),
        format!("{name}-seed.img"),
        format!("{name}-VARS.fd"),
    ]
}

/// Removes a VM by name: its domain (NVRAM included; a partition's filter goes with it) and
/// its volumes.
/// Absent parts are fine.
pub fn remove_vm(libvirt: &Libvirt, pool: &Pool, name: &str) -> Vec<String> {
    // Only "no such domain" means there is none.
    let lookup = match libvirt.conn() {
        Ok(conn) => match conn.lookup_domain_by_name(name) {
            Ok(dom) => Ok(Some(dom)),
            Err(e) if crate::host::libvirt::is_code(&e, virt::error::ErrorNumber::NoDomain) => {
                Ok(None)
            }
            Err(e) => Err(format!("cannot look up domain {name}: {e}")),
        },
        Err(e) => Err(e.to_string()),
    };
    remove_looked_up(libvirt, pool, name, lookup)
}

/// [`remove_vm`] once the domain was looked up: `Ok(None)`, there is none; an error, it may
/// exist, so nothing is removed (its volumes, and through the error its owner record, stay
/// for a later try).
pub fn remove_looked_up(
    libvirt: &Libvirt,
    pool: &Pool,
    name: &str,
    lookup: Result<Option<virt::domain::Domain>, String>,
) -> Vec<String> {
    let mut errors = Vec::new();
    let dom = match lookup {
        Ok(dom) => dom,
        Err(e) => return vec![e],
    };
    // A partition (`Vm::partition`) is a filter on the domain's interface: it goes with it.
    if let Some(dom) = dom
        && let Err(e) = libvirt.remove_domain(&dom, name)
    {
        errors.push(e.to_string());
    }
    for v in volume_names(name) {
        if let Err(e) = pool.delete_volume(&v) {
            errors.push(e.to_string());
        }
    }
    errors
}

/// What the reaper removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reaped {
    pub vms: Vec<String>,
    pub containers: Vec<String>,
    /// Pool volumes a killed run was uploading.
    pub uploads: Vec<String>,
}

/// Cleans up after runs whose process is gone: VMs recorded under `runs_dir`, and containers
/// labelled with a devicelab pid that no longer runs. What DEVICELAB_KEEP kept stays.
pub fn reap(libvirt: &Libvirt, pool: &Pool, dirs: &DataDirs, podman: &Path) -> Reaped {
    reap_runs(libvirt, pool, dirs, podman, false)
}

/// [`reap`], and what DEVICELAB_KEEP kept (once its run is gone): `devicelab clean`.
pub fn reap_including_kept(
    libvirt: &Libvirt,
    pool: &Pool,
    dirs: &DataDirs,
    podman: &Path,
) -> Reaped {
    reap_runs(libvirt, pool, dirs, podman, true)
}

fn reap_runs(
    libvirt: &Libvirt,
    pool: &Pool,
    dirs: &DataDirs,
    podman: &Path,
    kept_too: bool,
) -> Reaped {
    let mut reaped = Reaped::default();
    let entries = std::fs::read_dir(&dirs.runs)
        .into_iter()
        .flatten()
        .flatten();
    for entry in entries {
        let dir = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(owner) = OwnerRecord::read(&dir) else {
            continue;
        };
        if (owner.kept && !kept_too) || owner.owner_alive() {
            continue;
        }
        // Another host's VM is that host's to reap, unless its domain is here (this host
        // reached by another URI).
        if !owner.is_on(&libvirt.uri)
            && !libvirt.has_domain(&owner.domain_in(&dir)).unwrap_or(false)
        {
            continue;
        }
        // The name's claim first: a run that claims it meanwhile reaps it itself, and one that
        // claims it after finds it gone, never half-removed.
        let claim = dirs.runs.join(CLAIMS).join(format!("{name}.lock"));
        let Ok(Some(_claim)) = lock::try_lock(&claim, "reaper", Removal::OnRelease) else {
            continue;
        };
        let Some(owner) = OwnerRecord::read(&dir) else {
            continue; // reaped by whoever held the claim
        };
        match reap_one(libvirt, pool, dirs, &dir, &owner) {
            Ok(domain) => {
                tracing::warn!("reaped VM {domain} left by {} (gone)", owner.describe());
                reaped.vms.push(domain);
            }
            Err(errors) => tracing::warn!("could not reap VM {name}: {}", errors.join("; ")),
        }
    }
    // Claims whose run dir is gone (their process exited without releasing them by name).
    for entry in std::fs::read_dir(dirs.runs.join(CLAIMS))
        .into_iter()
        .flatten()
        .flatten()
    {
        let file = entry.file_name().to_string_lossy().into_owned();
        if let Some(name) = file.strip_suffix(".lock")
            && !dirs.runs.join(name).exists()
        {
            let _ = lock::try_lock(&entry.path(), "reaper", Removal::OnRelease);
        }
    }
    reaped.containers = reap_containers(podman, kept_too);
    reaped.uploads = pool.reap_uploads();
    reap_nats_dirs_of(&std::env::temp_dir(), kept_too);
    reaped
}

/// Where a run's VMs are recorded (`runs/`) and where saved VMs are (`warm/`).
pub struct DataDirs {
    /// The runs dir: one dir per VM request, with its owner record.
    pub runs: std::path::PathBuf,
    /// The warm dir: the saved VMs and their clone locks.
    pub warm: std::path::PathBuf,
}

impl DataDirs {
    /// The configuration's runs and warm dirs.
    pub fn of(config: &crate::config::HarnessConfig) -> Self {
        Self {
            runs: config.runs_dir(),
            warm: config.warm_dir(),
        }
    }
}

/// Removes the VM a dead run recorded in `dir` (the caller holds its name's claim), then the
/// run dir; returns its domain. A warm clone's domain has its saved VM's name, which a live
/// clone may have taken since: then only the run dir goes (the domain is that clone's).
pub fn reap_one(
    libvirt: &Libvirt,
    pool: &Pool,
    dirs: &DataDirs,
    dir: &Path,
    owner: &OwnerRecord,
) -> Result<String, Vec<String>> {
    let domain = owner.domain_in(dir);
    let clone_of_saved = dir
        .file_name()
        .is_some_and(|n| n.to_string_lossy() != domain);
    let _clone_lock = if clone_of_saved {
        let path = dirs.warm.join(format!("{domain}.lock"));
        match lock::try_lock(&path, "reaper", Removal::Keep) {
            Ok(Some(lock)) => Some(lock),
            // A live clone has the domain now.
            Ok(None) => {
                let _ = std::fs::remove_dir_all(dir);
                return Ok(domain);
            }
            Err(e) => return Err(vec![format!("cannot lock {}: {e}", path.display())]),
        }
    } else {
        None
    };
    let errors = remove_vm(libvirt, pool, &domain);
    if !errors.is_empty() {
        return Err(errors);
    }
    // The run was killed before it could collect anything: its logs are not artifacts.
    let _ = std::fs::remove_dir_all(dir);
    Ok(domain)
}

fn reap_containers(podman: &Path, kept_too: bool) -> Vec<String> {
    let Ok(Some(out)) = crate::support::process::output_within(
        Command::new(podman)
            .args(["ps", "-a", "--filter", "label=devicelab.pid"])
            .args([
                "--format",
                "{{.Names}} {{index .Labels \"devicelab.pid\"}} {{index .Labels \"devicelab.start\"}} {{index .Labels \"devicelab.kept\"}}",
            ]),
        PODMAN_BUDGET,
    ) else {
        // No podman: nothing of ours can exist; a hung one: the next run tries again.
        return Vec::new();
    };
    let mut removed = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut f = line.split_whitespace();
        let (Some(name), Some(pid), start, kept) = (f.next(), f.next(), f.next(), f.next()) else {
            continue;
        };
        if kept == Some("1") && !kept_too {
            continue; // DEVICELAB_KEEP: left for a human until `devicelab clean`
        }
        let (Ok(pid), start) = (
            pid.parse::<u32>(),
            start.and_then(|s| s.parse::<u64>().ok()).unwrap_or(0),
        ) else {
            continue;
        };
        if is_alive(pid, start) {
            continue;
        }
        let ok = crate::support::process::output_within(
            Command::new(podman).args(["rm", "-f", "-t", "0", name]),
            PODMAN_BUDGET,
        )
        .is_ok_and(|o| o.is_some_and(|o| o.status.success()));
        if ok {
            tracing::warn!("reaped NATS container {name} (pid {pid} is gone)");
            removed.push(name.to_owned());
        }
    }
    removed
}

type Cleanup = Box<dyn FnOnce() + Send>;

fn registry() -> &'static Mutex<BTreeMap<u64, Cleanup>> {
    static LIVE: Mutex<BTreeMap<u64, Cleanup>> = Mutex::new(BTreeMap::new());
    &LIVE
}

/// A cleanup that runs if the process is interrupted (SIGINT/SIGTERM) while the guard lives.
/// Dropping the guard unregisters it (the owner then cleans up itself, or chose to keep).
pub struct CleanupGuard(u64);

pub fn on_interrupt(cleanup: impl FnOnce() + Send + 'static) -> CleanupGuard {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    install_signal_handler();
    let id = NEXT.fetch_add(1, Ordering::SeqCst);
    registry()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, Box::new(cleanup));
    CleanupGuard(id)
}

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        registry()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.0);
    }
}

/// On SIGINT or SIGTERM: run every registered cleanup, then exit 130 / 143. A second signal
/// while the cleanups run exits at once: the owner records stay, so the next run's reaper
/// finishes the job.
fn install_signal_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        use tokio::signal::unix::{SignalKind, signal};
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("devicelab: no signal handling (cannot build its runtime: {e})");
                return;
            }
        };
        // The handlers are in place before this returns: a signal right after the first
        // registered cleanup must not take the process down without running it.
        let handlers = {
            let _in_rt = rt.enter();
            (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            )
        };
        let (Ok(int), Ok(term)) = handlers else {
            eprintln!("devicelab: cannot install the SIGINT/SIGTERM handlers");
            return;
        };
        let spawned = std::thread::Builder::new()
            .name("devicelab-signals".into())
            .spawn(move || rt.block_on(handle_signals(int, term)));
        if let Err(e) = spawned {
            eprintln!("devicelab: no signal handling (cannot start its thread: {e})");
        }
    });
}

async fn handle_signals(
    mut int: tokio::signal::unix::Signal,
    mut term: tokio::signal::unix::Signal,
) {
    let code = tokio::select! {
        _ = int.recv() => 130,
        _ = term.recv() => 143,
    };
    let cleanups: Vec<Cleanup> =
        std::mem::take(&mut *registry().lock().unwrap_or_else(|p| p.into_inner()))
            .into_values()
            .collect();
    eprintln!(
        "devicelab: interrupted; cleaning up {} resource(s) (interrupt again to exit at once)",
        cleanups.len()
    );
    // The registered cleanups, then the teardowns already running in the background (the exit
    // would wait for them): a second signal stops waiting for either.
    let cleaning = tokio::task::spawn_blocking(move || {
        for cleanup in cleanups {
            cleanup();
        }
        crate::support::background::join_pending();
    });
    let again = |what: &str| {
        eprintln!(
            "devicelab: {what} again: exiting without finishing the cleanup (the next run reaps what is left)"
        );
        crate::support::background::abandon();
    };
    tokio::select! {
        _ = cleaning => {}
        _ = int.recv() => again("interrupted"),
        _ = term.recv() => again("terminated"),
    }
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A start time that could not be read (0) never makes a live run look dead.
    #[test]
    fn an_unknown_start_time_keeps_a_live_owner_alive() {
        let me = std::process::id();
        assert!(is_alive(me, 0), "this process, start time unknown");
        let start = process_start_time(me).expect("our own /proc entry");
        assert!(is_alive(me, start));
        assert!(!is_alive(me, start + 1), "a recycled pid is not the owner");
        assert!(!is_alive(u32::MAX - 1, 0), "no such process");
    }

    /// A dead owner's NATS and simulated-device dirs go; a live owner's, a kept one and kept
    /// evidence stay.
    #[test]
    fn a_dead_runs_dirs_are_reaped_and_a_live_ones_kept() {
        let temp = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let dead = u32::MAX - 1;
        let dirs = [
            (format!("{}dev-a-x", simulated_dir_prefix(me)), true),
            (format!("devicelab-sim-{dead}-5-dev-b-x"), false),
            (format!("{}x", nats_dir_prefix(me)), true),
            (format!("devicelab-nats-{dead}-5-x"), false),
            ("devicelab-sim-evidence-dev-c-1".to_owned(), true),
        ];
        for (name, _) in &dirs {
            std::fs::create_dir(temp.path().join(name)).unwrap();
        }
        let kept = format!("devicelab-nats-{dead}-6-kept");
        std::fs::create_dir(temp.path().join(&kept)).unwrap();
        std::fs::write(temp.path().join(&kept).join(KEPT_MARK), "").unwrap();
        let removed = reap_nats_dirs(temp.path());
        assert_eq!(removed.len(), 2, "{removed:?}");
        for (name, stays) in &dirs {
            assert_eq!(temp.path().join(name).exists(), *stays, "{name}");
        }
        assert!(temp.path().join(&kept).exists());
    }
}
