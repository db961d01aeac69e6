//! Warm starts: a VM of a request is booted cold to "cloud-init done" once, flushed and saved
//! (libvirt's save: memory and device state; its disk, NVRAM and seed kept beside it), and every
//! later request of the same kind restores a clone on a fresh overlay of that disk.
//!
//! The key of a saved VM is everything it depends on ([`KeyInputs`]): the image file, the
//! architecture and accelerator, the request's size and first-boot settings, the domain XML and
//! the cloud-init seed as devicelab renders them, the firmware, the QEMU binary and its version.
//! Any change gives another key, so a stale saved VM is never restored.
//!
//! Where: a saved VM belongs to the host it was built on. On this machine its memory, disk,
//! seed and NVRAM are files in its directory; on another libvirt host they are volumes of that
//! host's pool (see `Store`), and the directory here keeps its record and console.
//!
//! Identity: libvirt restores a saved VM only under its own name, UUID and MAC (it refuses
//! others), and the guest keeps its address and host key. So clones of one saved VM never run
//! side by side: each saved VM has a lock held by its clone until the clone's teardown, and a
//! request that finds it held uses (or builds) the next one, `<key>-0`, `<key>-1`, ... The
//! domain is named after the saved VM, not the request; the guest's hostname is the key's.

use super::cold;
use super::error::{MAX_CLONES, VmError, WarmError};
use super::faults::UPTIME_COMMAND;
use super::handle::Vm;
use super::plan::Plan;
use super::start::{self, Boot};
use super::teardown::Held;
use crate::host::libvirt::Libvirt;
use crate::host::pool::{Access, Pool};
use crate::host::reaper;
use crate::host::serial::{self, SETTLE_BUDGET};
use crate::image::DiskFormat;
use crate::model::spec::{Readiness, Start};
use crate::ssh::Route;
use crate::ssh::keys::HostKey;
use crate::support::lock::{self, Removal};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Bumped when what a saved VM directory holds changes.
const LAYOUT: u32 = 6;
const META: &str = "saved.json";

/// A file as the key sees it: where, how long, when last changed (hashing a 2 GiB image on
/// every test would cost seconds; replacing it changes its size or time).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub path: PathBuf,
    pub len: u64,
    pub modified_ns: u128,
}

impl FileId {
    fn of(path: &Path) -> Result<Self, WarmError> {
        let meta = std::fs::metadata(path).map_err(|source| WarmError::Io {
            what: "read a file its key depends on",
            dir: path.to_owned(),
            source,
        })?;
        Ok(Self {
            path: path.to_owned(),
            len: meta.len(),
            modified_ns: meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos()),
        })
    }
}

/// Everything a saved VM depends on; its SHA-256 is the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInputs {
    pub layout: u32,
    pub arch: String,
    pub accel: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub admin_user: String,
    pub authorized_keys: Vec<String>,
    pub runcmd: Vec<String>,
    pub writeback_delay_ms: Option<u128>,
    pub client_key: String,
    pub image: FileId,
    pub firmware: Option<(FileId, FileId)>,
    pub emulator: FileId,
    pub qemu_version: String,
    /// The libvirt network and its address on it: a clone resumes with the address it was
    /// saved with, which must still be on the network.
    pub network: String,
    /// SHA-256 of the domain XML as rendered for this request (names and per-instance values
    /// replaced by placeholders): a devicelab that renders differently gets another key.
    pub domain_xml: String,
    /// SHA-256 of the cloud-init seed, likewise.
    pub seed: String,
}

impl KeyInputs {
    pub fn key(&self) -> String {
        let json = serde_json::to_vec(self).expect("the key inputs always serialize");
        hex::encode(Sha256::digest(json))
    }
}

/// What a saved VM's directory records beside its files.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Saved {
    key: String,
    inputs: KeyInputs,
    /// The guest's address and MAC when saved: the clone resumes with both.
    ip: Ipv4Addr,
    mac: String,
    /// The guest's SSH host key (OpenSSH private form): every clone presents it.
    host_key: String,
    cold_boot_secs: f64,
    saved_at_unix: u64,
    /// The guest's uptime (seconds) when its vCPUs stopped for the save: every clone resumes
    /// at it, so at a clone's uptime `u` the host's time is its resume's plus `u` less this.
    guest_uptime_at_pause: f64,
}

/// Where a saved VM's memory, disk, seed and NVRAM live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    /// Files in its directory (this machine's libvirt: the disk is moved out of the pool).
    Files,
    /// Volumes of the host's pool, named by [`saved_volume_names`] (another host: nothing of
    /// its file system is reachable from here but through libvirt).
    Volumes,
}

impl Store {
    fn of(plan: &Plan) -> Self {
        match plan.route {
            Route::Direct => Self::Files,
            Route::Through(_) => Self::Volumes,
        }
    }

    /// The pool its volumes are in ([`Store::Volumes`]), for [`forget`].
    fn pool(self, plan: &Plan) -> Option<Pool> {
        (self == Self::Volumes).then(|| plan.pool.clone())
    }
}

/// The file in a warm dir that names its owner on another host's pool.
const OWNER: &str = "owner";

/// The names of another host's saved VMs whose records are in `warm_dir` on this machine
/// start with this: a random id kept in the warm dir, made by the first build there (`make`;
/// whichever process comes first), so two data dirs sharing a host never take each other's,
/// whatever their machine ids or paths (a warm dir is one machine's at a time). Without `make`,
/// a warm dir with no id has no volumes anyone can name: an error. Blocking.
fn saved_prefix(warm_dir: &Path, make: bool) -> Result<String, WarmError> {
    use std::io::{Read, Write};
    let path = warm_dir.join(OWNER);
    let io = |source| WarmError::Io {
        what: "keep the owner of its volumes",
        dir: path.clone(),
        source,
    };
    // Twelve hex digits, or not an id (written whole before it is linked into place).
    let read = || -> std::io::Result<String> {
        let owner = std::fs::read_to_string(&path)?.trim().to_owned();
        match owner.len() == 12 && owner.chars().all(|c| c.is_ascii_hexdigit()) {
            true => Ok(owner),
            false => Err(std::io::Error::other(format!("not an owner id: {owner:?}"))),
        }
    };
    match read() {
        Ok(owner) => return Ok(format!("devicelab-saved-{owner}-")),
        Err(e) if !make || e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
        Err(_) => {}
    }
    let mut random = [0u8; 6];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut random))
        .map_err(io)?;
    lock::traversable_dir(warm_dir).map_err(io)?;
    // Written and synced under a name of this process's, then linked: never seen half-written;
    // a process that loses the race to link reads the winner's.
    let tmp = warm_dir.join(format!(".{OWNER}.{}", std::process::id()));
    let made = std::fs::File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(hex::encode(random).as_bytes())?;
            f.sync_all()
        })
        .and_then(|()| match std::fs::hard_link(&tmp, &path) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
            _ => std::fs::File::open(warm_dir).and_then(|d| d.sync_all()),
        });
    let _ = std::fs::remove_file(&tmp);
    made.map_err(io)?;
    Ok(format!("devicelab-saved-{}-", read().map_err(io)?))
}

/// The suffixes of a saved VM's volumes, in [`saved_volume_names`]' order.
const SAVED_SUFFIXES: [&str; 4] = [".qcow2", "-seed.img", "-VARS.fd", ".save"];

/// The pool volumes of the saved VM `name` on another host, its record in `warm_dir`: its disk
/// (a whole copy, the backing chain flattened), seed, NVRAM and memory. Kept across runs, as
/// base images are; `devicelab clean --warm` removes them. An error if `warm_dir` has no
/// owner id yet (a build makes one). Blocking.
pub fn saved_volume_names(warm_dir: &Path, name: &str) -> Result<[String; 4], WarmError> {
    names_in(warm_dir, name, false)
}

/// [`saved_volume_names`], the owner id made first if there is none (a build).
fn names_in(warm_dir: &Path, name: &str, make: bool) -> Result<[String; 4], WarmError> {
    let stem = format!(
        "{}{}",
        saved_prefix(warm_dir, make)?,
        name.strip_prefix("devicelab-").unwrap_or(name)
    );
    Ok(SAVED_SUFFIXES.map(|suffix| format!("{stem}{suffix}")))
}

/// Deletes the saved VM `name` whose record is `record` (in the warm dir): its volumes on
/// `pool`'s host when it is another host's, then the record, which stays while any volume
/// does (so `devicelab clean --warm` finds them again). Whether it is gone. Blocking.
fn forget(record: &Path, name: &str, pool: Option<&Pool>) -> bool {
    let mut stays = false;
    if let Some(pool) = pool {
        let warm_dir = record.parent().unwrap_or(record);
        match saved_volume_names(warm_dir, name) {
            Ok(volumes) => {
                for volume in volumes {
                    if let Err(e) = pool.delete_volume(&volume) {
                        tracing::warn!("saved VM {name}: cannot delete its volume {volume}: {e}");
                        stays = true;
                    }
                }
            }
            Err(e) => {
                tracing::warn!("saved VM {name}: its volumes are not known: {e}");
                stays = true;
            }
        }
    }
    if !stays {
        let _ = std::fs::remove_dir_all(record);
    }
    !record.exists()
}

/// Whether a request can start warm: its handle must come back at "cloud-init done" with its
/// provisioning flushed (a saved VM is exactly that); otherwise it boots cold, and says why.
/// Why `plan` cannot start warm, if it cannot.
pub(crate) fn cold_reason(plan: &Plan) -> Option<&'static str> {
    if plan.spec.ready_when != Readiness::CloudInitDone {
        Some("it is wanted before cloud-init is done")
    } else if !plan.spec.flush_provisioning {
        Some("its provisioning flush is off (a saved VM is flushed)")
    } else {
        None
    }
}

/// A warm start of `plan`: restore a clone of its saved VM, building that first if needed.
/// (Its caller checked [`cold_reason`] first.)
pub(crate) async fn start(plan: &Plan, held: Vec<Held>) -> Result<Vm, VmError> {
    let inputs = {
        let plan = plan.clone();
        tokio::task::spawn_blocking(move || key_inputs(&plan))
            .await
            .map_err(|e| VmError::Task(e.to_string()))??
    };
    let key = inputs.key();
    let stem = format!(
        "devicelab-warm-{}-{}-",
        plan.spec.arch.debian_name(),
        &key[..10]
    );
    let (lock, index) = lock_free_clone(plan, &stem, &key).await?;
    let name = format!("{stem}{index}");
    let dir = plan.warm_dir.join(&name);
    let store = Store::of(plan);
    let found = {
        let (dir, key, pool, name) = (dir.clone(), key.clone(), plan.pool.clone(), name.clone());
        let (warm_dir, uefi) = (plan.warm_dir.clone(), plan.firmware.is_some());
        tokio::task::spawn_blocking(move || -> Result<Option<Saved>, VmError> {
            let Some(saved) = load(&dir, &key) else {
                return Ok(None);
            };
            if store == Store::Files {
                return Ok(Some(saved));
            }
            // Another host's volumes can go without this machine knowing (removed there).
            let [disk, seed, vars, memory] =
                match saved_volume_names(&warm_dir, &name) {
                    Ok(names) => names,
                    Err(e) => {
                        tracing::warn!("saved VM {name}: its volumes are not known ({e}): building it again");
                        return Ok(None);
                    }
                };
            let needed = [Some(disk), Some(seed), uefi.then_some(vars), Some(memory)];
            for volume in needed.into_iter().flatten() {
                if pool.volume_path(&volume)?.is_none() {
                    tracing::warn!(
                        "saved VM {name}: its volume {volume} is gone from the host: building it again"
                    );
                    return Ok(None);
                }
            }
            Ok(Some(saved))
        })
        .await
        .map_err(|e| VmError::Task(e.to_string()))??
    };
    let saved = match found {
        Some(saved)
            if address_still_ours(&plan.libvirt, &plan.network, saved.ip, &saved.mac).await? =>
        {
            saved
        }
        _ => Box::pin(build(plan, &name, &stem, &dir, inputs, &key)).await?,
    };
    // The clone holds the lock until its teardown is done; this one keeps the saved VM locked
    // until a broken one is deleted.
    let lock = Arc::new(lock);
    let lock_guard = lock.clone();
    let mut held = held;
    held.push(Box::new(lock));
    tracing::info!(
        "VM {}: warm start from {} (saved {} s ago; its cold boot took {:.0} s)",
        plan.spec.name,
        dir.display(),
        unix_now().saturating_sub(saved.saved_at_unix),
        saved.cold_boot_secs
    );
    let host_key = HostKey::from_openssh(&saved.host_key)?;
    let broken = Arc::new(AtomicBool::new(false));
    let restore = WarmRestore {
        name: name.clone(),
        store,
        dir: dir.clone(),
        saved,
        host_key,
        broken: broken.clone(),
        resumed_at: Mutex::default(),
    };
    match start::start(plan, restore, held).await {
        // A kept clone (DEVICELAB_KEEP) still runs on the saved VM's disk: it stays, and so
        // does the saved VM, for a human to look at.
        Err(cause) if broken.load(Ordering::SeqCst) && !plan.keep => {
            // Still under its clone lock (the failed clone's teardown is done): nobody else
            // restores it meanwhile. Its evidence moves aside, out of the way of the cold boot
            // that reuses the request's run dir.
            let (d, run_dir) = (dir.clone(), plan.runs_dir.join(&plan.spec.name));
            let evidence = run_dir.with_extension("warm-failed");
            let moved = evidence.clone();
            let pool = store.pool(plan);
            let _ = tokio::task::spawn_blocking(move || {
                forget(&d, &name, pool.as_ref());
                let _ = std::fs::remove_dir_all(&moved);
                std::fs::rename(&run_dir, &moved)
            })
            .await;
            drop(lock_guard);
            Err(WarmError::Broken {
                dir,
                budget: plan.budgets.restore,
                cause: cause.to_string(),
                evidence,
            }
            .into())
        }
        other => other,
    }
}

/// The first saved VM of `stem` whose clone lock nobody holds and whose domain is not defined:
/// a kept clone (DEVICELAB_KEEP), or one whose teardown failed, outlives the lock its process
/// held, and its domain still runs under the saved VM's name. Such a saved VM is passed over,
/// never restored into (that would destroy the kept VM).
async fn lock_free_clone(
    plan: &Plan,
    stem: &str,
    key: &str,
) -> Result<(lock::FileLock, usize), VmError> {
    let mut from = 0;
    loop {
        let (dir, stem2, holder) = (
            plan.warm_dir.clone(),
            stem.to_owned(),
            plan.spec.name.clone(),
        );
        let Some((lock, index)) = tokio::task::spawn_blocking(move || {
            // Not listable; QEMU reaches a saved VM's disk through it.
            lock::traversable_dir(&dir).map_err(|source| WarmError::Io {
                what: "create",
                dir: dir.clone(),
                source,
            })?;
            crate::host::slots::lock_first_free(&dir, &stem2, from, MAX_CLONES, &holder)
                .map_err(WarmError::from)
        })
        .await
        .map_err(|e| VmError::Task(e.to_string()))??
        else {
            return Err(WarmError::AllInUse {
                key: key.to_owned(),
            }
            .into());
        };
        let name = format!("{stem}{index}");
        let n = name.clone();
        if !plan.libvirt.run(move |lv| lv.has_domain(&n)).await? {
            return Ok((lock, index));
        }
        tracing::warn!(
            "VM {}: saved VM {name} has a clone that outlived its run (kept, or its teardown \
             failed): using another; `devicelab clean` removes it",
            plan.spec.name
        );
        from = index + 1;
    }
}

/// Whether the saved VM's address is free for its clone: the DHCP server may have leased it to
/// another machine once the saved VM's own lease expired (a clone resumes with the address it
/// was saved with, without asking). If it has, the saved VM is built again (a new address).
pub async fn address_still_ours(
    libvirt: &Libvirt,
    network: &str,
    ip: Ipv4Addr,
    mac: &str,
) -> Result<bool, VmError> {
    let network = network.to_owned();
    let holders = libvirt
        .run(move |lv| lv.lease_holders(&network, ip))
        .await?;
    let others: Vec<&String> = holders.iter().filter(|m| *m != mac).collect();
    if !others.is_empty() {
        tracing::warn!(
            "saved VM's address {ip} is leased to {others:?} now, not to its MAC {mac}: building it again"
        );
    }
    Ok(others.is_empty())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The saved VM in `dir`, if it is complete and of `key`.
fn load(dir: &Path, key: &str) -> Option<Saved> {
    let saved: Saved = serde_json::from_slice(&std::fs::read(dir.join(META)).ok()?).ok()?;
    if saved.key != key {
        tracing::info!(
            "saved VM {} is stale (its key differs): building it again",
            dir.display()
        );
        return None;
    }
    Some(saved)
}

/// The key's inputs for `plan` (file metadata, `qemu --version`: blocking).
pub(crate) fn key_inputs(plan: &Plan) -> Result<KeyInputs, VmError> {
    let spec = &plan.spec;
    let placeholder = "devicelab-warm";
    let pool = &plan.pool.dir;
    let params = plan.domain_params(
        placeholder,
        pool.join("placeholder.qcow2"),
        pool.join("placeholder-seed.img"),
        "52:54:00:00:00:00".into(),
        plan.firmware
            .as_ref()
            .map(|fw| crate::host::domain_xml::UefiPflash {
                code: fw.code.clone(),
                vars: pool.join("placeholder-VARS.fd"),
            }),
    );
    let params = crate::host::domain_xml::DomainXmlParams {
        owner: crate::host::domain_xml::RunOwner {
            run_id: "saved".into(),
            pid: 0,
        },
        ..params
    };
    let host_key = HostKey::placeholder();
    let mut template = spec.clone();
    template.first_boot.hostname = placeholder.into();
    let seed = super::seed::Seed::new(
        &template,
        &plan.client_key.public_line,
        &host_key,
        placeholder,
    );
    let seed_text = format!("{}\n{}", seed.user_data, seed.meta_data);
    let sha = |s: &str| hex::encode(Sha256::digest(s.as_bytes()));
    let firmware = match &plan.firmware {
        Some(fw) => Some((FileId::of(&fw.code)?, FileId::of(&fw.vars)?)),
        None => None,
    };
    let (emulator, qemu_version) = match &plan.qemu_version {
        // Another host's QEMU: its file is not here; its path and the machine type (with its
        // version) its libvirt resolves stand for it.
        Some(version) => (
            FileId {
                path: plan.emulator.clone(),
                len: 0,
                modified_ns: 0,
            },
            version.clone(),
        ),
        None => (FileId::of(&plan.emulator)?, qemu_version(&plan.emulator)?),
    };
    Ok(KeyInputs {
        layout: LAYOUT,
        arch: spec.arch.name().into(),
        accel: plan.accel.accel.to_string(),
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        disk_gib: spec.disk_gib,
        admin_user: spec.first_boot.admin_user.clone(),
        authorized_keys: spec.first_boot.authorized_keys.clone(),
        runcmd: spec.first_boot.runcmd.clone(),
        writeback_delay_ms: spec.writeback_delay.map(|d| d.as_millis()),
        client_key: plan.client_key.public_line.clone(),
        image: FileId::of(&plan.image.path)?,
        firmware,
        emulator,
        qemu_version,
        network: format!(
            "{} {}",
            plan.network,
            plan.libvirt.network_gateway(&plan.network)?
        ),
        domain_xml: sha(&crate::host::domain_xml::render(&params).xml),
        seed: sha(&seed_text),
    })
}

/// How long `qemu --version` may take (it answers at once; a hung one must not hang the run).
const QEMU_VERSION_BUDGET: std::time::Duration = std::time::Duration::from_secs(30);

fn qemu_version(emulator: &Path) -> Result<String, WarmError> {
    let err = |message: String| WarmError::QemuVersion {
        emulator: emulator.to_owned(),
        message,
    };
    let out = crate::support::process::output_within(
        std::process::Command::new(emulator).arg("--version"),
        QEMU_VERSION_BUDGET,
    )
    .map_err(|e| err(e.to_string()))?
    .ok_or_else(|| err(format!("no answer within {QEMU_VERSION_BUDGET:?}: killed")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .next()
        .filter(|l| out.status.success() && !l.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| WarmError::QemuVersion {
            emulator: emulator.to_owned(),
            message: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr)),
        })
}

/// Boots `name` cold to "cloud-init done" (flushed), saves it, and keeps its memory, disk,
/// seed and NVRAM (in `dir` on this machine, as volumes of another host's pool) and its record
/// in `dir` (written beside it and renamed into place: a half-built saved VM never looks
/// complete).
async fn build(
    plan: &Plan,
    name: &str,
    stem: &str,
    dir: &Path,
    inputs: KeyInputs,
    key: &str,
) -> Result<Saved, VmError> {
    tracing::info!(
        "VM {}: no saved VM {name} yet: booting it cold once, then saving it",
        plan.spec.name
    );
    let mut template = plan.clone();
    template.spec.name = name.to_owned();
    template.spec.first_boot.hostname = stem.trim_end_matches('-').to_owned();
    template.spec.extra_waits.clear();
    template.spec.start = Some(Start::Cold);
    template.waits = template.spec.waits();
    template.keep = false;
    let started = Instant::now();
    let vm = cold::boot(&template, Vec::new()).await?;
    let cold_boot_secs = started.elapsed().as_secs_f64();
    let ip = vm
        .ip()
        .ok_or_else(|| VmError::NoAddress { vm: name.into() })?;
    let domain_xml = vm.run_dir().join("domain.xml");
    let mac = tokio::task::spawn_blocking(move || mac_of(&domain_xml))
        .await
        .map_err(|e| VmError::Task(e.to_string()))?
        .unwrap_or_default();
    // The guest's uptime against the host's clock, read just before the pause: the two run
    // side by side until then.
    let (uptime_ahead, _) = vm.seconds_offset(UPTIME_COMMAND).await?;
    let saved_at_unix = unix_now();
    vm.session.lock().await.take();
    let building = dir.with_extension("building");
    let io = |what: &'static str, path: &Path| {
        let dir = path.to_owned();
        move |source| WarmError::Io { what, dir, source }
    };
    {
        let building = building.clone();
        tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_dir_all(&building);
            lock::traversable_dir(&building).map_err(io("create", &building))
        })
        .await
        .map_err(|e| VmError::Task(e.to_string()))??;
    }
    let store = Store::of(plan);
    let save_started = Instant::now();
    let state_saved = {
        let (n, building, pool) = (name.to_owned(), building.clone(), plan.pool.clone());
        let warm_dir = plan.warm_dir.clone();
        plan.libvirt
            .run(move |lv| -> Result<_, VmError> {
                // Another host's: its volumes' names (the warm dir's owner id made first if
                // there is none), the memory written by libvirt on its host into one made for it.
                let (to, names) = match store {
                    Store::Files => (building.join("memory.save"), None),
                    Store::Volumes => {
                        let names = names_in(&warm_dir, &n, true)?;
                        (pool.create_empty(&names[3])?, Some(names))
                    }
                };
                Ok((lv.pause_and_save(&lv.domain(&n)?, &n, &to)?, names))
            })
            .await
    };
    let kept = match state_saved {
        Err(e) => Err(e),
        Ok((paused, saved_names)) => {
            let saved = Saved {
                key: key.to_owned(),
                inputs,
                ip,
                mac,
                host_key: vm.login.host_key.private_openssh.clone(),
                cold_boot_secs,
                saved_at_unix,
                guest_uptime_at_pause: unix_secs(paused) + uptime_ahead,
            };
            let (pool, dir, building, name, meta_saved, serial_log) = (
                plan.pool.clone(),
                dir.to_owned(),
                building.clone(),
                name.to_owned(),
                saved.clone(),
                vm.serial_log().to_owned(),
            );
            tokio::task::spawn_blocking(move || -> Result<(), VmError> {
                let [disk, seed, vars] = reaper::volume_names(&name);
                match saved_names {
                    // The disk moves (the pool forgets it); seed and NVRAM are copied (the
                    // template's teardown deletes its own).
                    None => {
                        let disk_to = building.join("disk.qcow2");
                        std::fs::rename(pool.path_of(&disk), &disk_to)
                            .map_err(io("keep the disk", &disk_to))?;
                        pool.refresh()?;
                        std::fs::copy(pool.path_of(&seed), building.join("seed.img"))
                            .map_err(io("keep the seed", &building))?;
                        if pool.path_of(&vars).exists() {
                            std::fs::copy(pool.path_of(&vars), building.join("VARS.fd"))
                                .map_err(io("keep the NVRAM", &building))?;
                        }
                    }
                    // Copied on the host, beside the memory libvirt wrote there.
                    Some([disk_to, seed_to, vars_to, _]) => {
                        pool.refresh()?;
                        pool.copy_volume(&disk, &disk_to, DiskFormat::Qcow2)?;
                        pool.copy_volume(&seed, &seed_to, DiskFormat::Raw)?;
                        if pool.volume_path(&vars)?.is_some() {
                            pool.copy_volume(&vars, &vars_to, DiskFormat::Raw)?;
                        }
                    }
                }
                // The boot a clone resumes in: its console so far belongs to every clone (all of
                // it, the domain having stopped with the save).
                serial::settle(&serial_log, SETTLE_BUDGET);
                std::fs::copy(&serial_log, building.join("serial.log"))
                    .map_err(io("keep the console log", &building))?;
                let meta = building.join(META);
                let json = serde_json::to_vec_pretty(&meta_saved).expect("Saved always serializes");
                write_synced(&meta, &json).map_err(io("write", &meta))?;
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::rename(&building, &dir).map_err(io("move into place", &dir))?;
                if let Some(parent) = dir.parent() {
                    let _ = std::fs::File::open(parent).and_then(|d| d.sync_all());
                }
                Ok(())
            })
            .await
            .map_err(|e| VmError::Task(e.to_string()))?
            .map(|()| saved)
        }
    };
    // The template's domain (saved, shut off) goes whatever happened; a half-built saved VM
    // goes with it.
    let removed = vm.remove().await;
    if kept.is_err() {
        let (pool, name) = (store.pool(plan), name.to_owned());
        let _ = tokio::task::spawn_blocking(move || forget(&building, &name, pool.as_ref())).await;
    }
    let saved = kept?;
    removed?;
    tracing::info!(
        "saved VM {}: cold boot {cold_boot_secs:.1} s, save {:.1} s",
        dir.display(),
        save_started.elapsed().as_secs_f64()
    );
    Ok(saved)
}

/// The MAC in a rendered domain XML file.
fn mac_of(domain_xml: &Path) -> Option<String> {
    let xml = std::fs::read_to_string(domain_xml).ok()?;
    let doc = roxmltree::Document::parse(&xml).ok()?;
    doc.descendants()
        .find(|n| n.has_tag_name("mac"))?
        .attribute("address")
        .map(str::to_ascii_lowercase)
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // It holds the guest's SSH host private key: the owner's only.
    let mut f = std::fs::File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    // The memory file and disk too: a crash must not leave a complete-looking saved VM
    // whose files are not on disk.
    if let Some(dir) = path.parent() {
        for entry in std::fs::read_dir(dir)?.flatten() {
            std::fs::File::open(entry.path())?.sync_all()?;
        }
    }
    Ok(())
}

/// A clone of the saved VM in `dir`, restored on a fresh overlay of its disk under the saved
/// VM's own name, MAC and host key.
pub(crate) struct WarmRestore {
    name: String,
    store: Store,
    dir: PathBuf,
    saved: Saved,
    host_key: HostKey,
    /// Set when the clone did not come back within the restore budget (its SSH, or the clock
    /// step after it): then its saved VM is deleted.
    broken: Arc<AtomicBool>,
    /// When libvirt resumed the clone (its guest's clock ran again from the save's).
    resumed_at: Mutex<Option<SystemTime>>,
}

impl Boot for WarmRestore {
    const TIMED_FROM_REQUEST: bool = false;

    fn name(&self) -> &str {
        &self.name
    }

    fn host_key(&self) -> &HostKey {
        &self.host_key
    }

    /// Each part's time goes into the timings (`warm restore: volumes`, `…: libvirt
    /// restore`), so "restore → SSH" can be read part by part.
    async fn make_domain(&self, plan: &Plan, vm: &Vm) -> Result<(), VmError> {
        let part = Instant::now();
        let (pool, dir, name, gib, serial_log, store) = (
            plan.pool.clone(),
            self.dir.clone(),
            self.name.clone(),
            plan.spec.disk_gib,
            vm.serial_log().to_owned(),
            self.store,
        );
        let warm_dir = plan.warm_dir.clone();
        let from = plan
            .libvirt
            .run(move |_| -> Result<PathBuf, VmError> {
                let [disk, seed, vars] = reaper::volume_names(&name);
                let from = match store {
                    Store::Files => {
                        pool.create_overlay_on(
                            &disk,
                            &dir.join("disk.qcow2"),
                            DiskFormat::Qcow2,
                            gib,
                        )?;
                        pool.upload(&seed, &dir.join("seed.img"), 0, Access::Private)?;
                        if dir.join("VARS.fd").exists() {
                            pool.upload(&vars, &dir.join("VARS.fd"), 0, Access::Private)?;
                        }
                        dir.join("memory.save")
                    }
                    // Made on the host from the saved VM's volumes there.
                    Store::Volumes => {
                        let [saved_disk, saved_seed, saved_vars, memory] =
                            saved_volume_names(&warm_dir, &name)?;
                        // Checked when the start began; gone since, it is not restored again.
                        let gone = |volume: &str| {
                            forget(&dir, &name, Some(&pool));
                            WarmError::Restore {
                                vm: name.clone(),
                                dir: dir.clone(),
                                message: format!("its volume {volume} is gone from the host"),
                            }
                        };
                        let backing = match pool.volume_path(&saved_disk)? {
                            Some(path) => path,
                            None => return Err(gone(&saved_disk).into()),
                        };
                        pool.create_overlay_on(&disk, &backing, DiskFormat::Qcow2, gib)?;
                        pool.copy_volume(&saved_seed, &seed, DiskFormat::Raw)?;
                        if pool.volume_path(&saved_vars)?.is_some() {
                            pool.copy_volume(&saved_vars, &vars, DiskFormat::Raw)?;
                        }
                        match pool.volume_path(&memory)? {
                            Some(path) => path,
                            None => return Err(gone(&memory).into()),
                        }
                    }
                };
                // The clone's console starts with the boot it resumes in.
                std::fs::copy(dir.join("serial.log"), &serial_log).map_err(|source| {
                    WarmError::Io {
                        what: "copy out",
                        dir: dir.join("serial.log"),
                        source,
                    }
                })?;
                Ok(from)
            })
            .await?;
        vm.timings.record("warm restore: volumes", part.elapsed());
        let part = Instant::now();
        let (owned, owner) = (vm.owned.clone(), plan.owner.clone());
        let (dir, domain_xml) = (self.dir.clone(), vm.run_dir().join("domain.xml"));
        let forget_pool = self.store.pool(plan);
        let serial_log = vm.serial_log().to_owned();
        let resumed = plan
            .libvirt
            .run(move |lv| {
                let _held = owned.lifecycle.lock().unwrap_or_else(|p| p.into_inner());
                let (dom, xml) = lv.restore(&from, &owned.name, &owner).map_err(|e| {
                    // Whatever is wrong with it, it is not restored again.
                    forget(&dir, &owned.name, forget_pool.as_ref());
                    WarmError::Restore {
                        vm: owned.name.clone(),
                        dir: dir.clone(),
                        message: e.to_string(),
                    }
                })?;
                std::fs::write(&domain_xml, &xml).map_err(|source| VmError::RunDir {
                    vm: owned.name.clone(),
                    path: domain_xml,
                    source,
                })?;
                // Not the saved VM's fault if this fails: it stays for the next clone.
                Ok::<_, VmError>(lv.resume_with_console(&dom, &owned.name, &serial_log)?)
            })
            .await?;
        *self.resumed_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(resumed);
        vm.timings
            .record("warm restore: libvirt restore", part.elapsed());
        vm.set_ip(self.saved.ip)
    }

    /// SSH, then the guest's clock stepped to the host's, then the request's own waits.
    async fn wait_ready(&self, plan: &Plan, vm: &Vm, started: Instant) -> Result<(), VmError> {
        let restored = async {
            vm.wait_restored(started).await?;
            // The guest resumes at the time it was paused for the save: verdicts that compare
            // its clock with the host's would be fooled. The host's time at the resume and the
            // guest's uptime at the pause are both known, so one command sets it from its own
            // uptime: no round trip to read its clock first.
            let part = Instant::now();
            let resumed = (*self.resumed_at.lock().unwrap_or_else(|p| p.into_inner()))
                .ok_or_else(|| VmError::Task("a clone's waits began before its resume".into()))?;
            vm.set_clock_from_uptime(unix_secs(resumed) - self.saved.guest_uptime_at_pause)
                .await?;
            vm.timings
                .record("warm restore: clock step", part.elapsed());
            Ok::<_, VmError>(())
        }
        .await;
        restored.inspect_err(|_| self.broken.store(true, Ordering::SeqCst))?;
        vm.timings.record("warm restore → SSH", started.elapsed());
        tracing::info!(
            "VM {}: restored in {:.1} s; the guest's clock set to the host's (saved {} s ago)",
            self.name,
            started.elapsed().as_secs_f64(),
            unix_now().saturating_sub(self.saved.saved_at_unix)
        );
        vm.wait_all(&plan.spec.extra_waits, started).await?;
        vm.mark_provisioned(Readiness::CloudInitDone);
        vm.flushed("provisioning (saved with the VM)");
        Ok(())
    }
}

/// A saved VM in the cache, as `devicelab ls` shows it.
#[derive(Debug, Clone)]
pub struct SavedVm {
    pub name: String,
    pub bytes: u64,
    pub saved_at_unix: u64,
    /// A clone of it runs now (its lock is held).
    pub in_use: bool,
    /// Its memory and disks are volumes of another host's pool (`bytes` is its record's).
    pub on_host: bool,
}

/// The saved VMs in `dir` (blocking).
pub fn saved_vms(dir: &Path) -> Vec<SavedVm> {
    let mut out: Vec<SavedVm> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join(META).is_file())
        .map(|e| {
            let path = e.path();
            let saved: Option<Saved> = std::fs::read(path.join(META))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let bytes = std::fs::read_dir(&path)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|f| f.metadata().ok())
                .map(|m| m.len())
                .sum();
            let name = e.file_name().to_string_lossy().into_owned();
            SavedVm {
                in_use: lock::is_held(&dir.join(format!("{name}.lock"))),
                on_host: !path.join("memory.save").exists(),
                saved_at_unix: saved.map_or(0, |s| s.saved_at_unix),
                bytes,
                name,
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Removes every saved VM in `dir` no clone is using (`devicelab clean --warm`), with its
/// volumes on `pool`'s host when `dir` holds another host's records; returns their names (a
/// half-built one's with `.building`). Run after the host's dead and kept VMs are reaped: a
/// kept clone outlives its lock, and its disk is backed by its saved VM's. Blocking.
pub fn remove_unused(dir: &Path, pool: Option<&Pool>) -> Result<Vec<String>, VmError> {
    let mut removed = Vec::new();
    for saved in saved_vms(dir) {
        // Held while removing, so no clone starts from a half-removed saved VM.
        let path = dir.join(format!("{}.lock", saved.name));
        let Ok(Some(_lock)) = lock::try_lock(&path, "devicelab clean --warm", Removal::OnRelease)
        else {
            continue;
        };
        if forget(&dir.join(&saved.name), &saved.name, pool) {
            removed.push(saved.name.clone());
        }
        let _ = std::fs::remove_dir_all(dir.join(format!("{}.building", saved.name)));
    }
    // Half-built saved VMs whose build is over (its clone lock is free).
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".building") else {
            continue;
        };
        let path = dir.join(format!("{stem}.lock"));
        if let Ok(Some(_lock)) = lock::try_lock(&path, "devicelab clean --warm", Removal::Keep)
            && forget(&entry.path(), stem, pool)
        {
            removed.push(name);
        }
    }
    // Another host's volumes of this dir's saved VMs that no record names (a record removed
    // by hand, or a build killed before it wrote one), each saved VM under its lock, its
    // record looked for again under it (a build may have finished meanwhile).
    let Some(pool) = pool else {
        return Ok(removed);
    };
    if !dir.join(OWNER).is_file() {
        return Ok(removed); // this dir never had a volume
    }
    let prefix = saved_prefix(dir, false)?;
    let mut orphans: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for volume in pool.volumes()? {
        let Some(rest) = volume.strip_prefix(&prefix) else {
            continue;
        };
        if let Some(stem) = SAVED_SUFFIXES.iter().find_map(|s| rest.strip_suffix(s)) {
            orphans
                .entry(format!("devicelab-{stem}"))
                .or_default()
                .push(volume);
        }
    }
    for (name, volumes) in orphans {
        let path = dir.join(format!("{name}.lock"));
        let Ok(Some(_lock)) = lock::try_lock(&path, "devicelab clean --warm", Removal::OnRelease)
        else {
            continue;
        };
        if dir.join(&name).join(META).is_file() {
            continue;
        }
        let mut all = true;
        for volume in &volumes {
            if let Err(e) = pool.delete_volume(volume) {
                tracing::warn!("saved VM {name}: cannot delete its volume {volume}: {e}");
                all = false;
            }
        }
        if all {
            removed.push(name);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> KeyInputs {
        let file = |p: &str| FileId {
            path: p.into(),
            len: 1,
            modified_ns: 1,
        };
        KeyInputs {
            layout: LAYOUT,
            arch: "x86_64".into(),
            accel: "tcg".into(),
            vcpus: 2,
            memory_mib: 2048,
            disk_gib: 8,
            admin_user: "devicelab".into(),
            authorized_keys: vec![],
            runcmd: vec![],
            writeback_delay_ms: None,
            client_key: "ssh-ed25519 AAAA".into(),
            image: file("/img"),
            firmware: None,
            emulator: file("/qemu"),
            qemu_version: "QEMU emulator version 7.2.0".into(),
            network: "default 192.168.122.1".into(),
            domain_xml: "x".into(),
            seed: "s".into(),
        }
    }

    /// What `devicelab ls` lists and `devicelab clean --warm` removes: saved VMs no clone
    /// uses, and half-built ones whose build is over; never one whose clone runs. The saved
    /// VM's record (it holds the guest's SSH host private key) is the owner's only.
    #[test]
    fn ls_lists_saved_vms_and_clean_warm_keeps_the_ones_in_use() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!(
            "devicelab-warm-test-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let saved = Saved {
            key: "k".into(),
            inputs: inputs(),
            ip: Ipv4Addr::new(192, 0, 2, 9),
            mac: "52:54:00:00:00:01".into(),
            host_key: "PRIVATE".into(),
            cold_boot_secs: 1.0,
            saved_at_unix: 1,
            guest_uptime_at_pause: 1.0,
        };
        for name in ["w-0", "w-1"] {
            std::fs::create_dir_all(dir.join(name)).unwrap();
            write_synced(
                &dir.join(name).join(META),
                &serde_json::to_vec(&saved).unwrap(),
            )
            .unwrap();
        }
        std::fs::create_dir_all(dir.join("w-2.building")).unwrap();
        let mode = std::fs::metadata(dir.join("w-0").join(META))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the record holds a private key");
        let in_use = lock::try_lock(&dir.join("w-1.lock"), "a clone", Removal::Keep)
            .unwrap()
            .unwrap();
        let listed = saved_vms(&dir);
        let shown: Vec<(&str, bool)> = listed.iter().map(|s| (s.name.as_str(), s.in_use)).collect();
        assert_eq!(shown, [("w-0", false), ("w-1", true)]);
        let mut removed = remove_unused(&dir, None).unwrap();
        removed.sort();
        assert_eq!(removed, ["w-0", "w-2.building"]);
        assert!(dir.join("w-1").join(META).exists(), "the one in use stays");
        drop(in_use);
        assert_eq!(remove_unused(&dir, None).unwrap(), ["w-1"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_input_changes_the_key() {
        // A new input must be added below: this stops compiling until it is.
        let KeyInputs {
            layout: _,
            arch: _,
            accel: _,
            vcpus: _,
            memory_mib: _,
            disk_gib: _,
            admin_user: _,
            authorized_keys: _,
            runcmd: _,
            writeback_delay_ms: _,
            client_key: _,
            image: _,
            firmware: _,
            emulator: _,
            qemu_version: _,
            network: _,
            domain_xml: _,
            seed: _,
        } = inputs();
        let base = inputs().key();
        type Change = Box<dyn Fn(&mut KeyInputs)>;
        let changes: Vec<(&str, Change)> = vec![
            ("layout", Box::new(|k| k.layout += 1)),
            ("arch", Box::new(|k| k.arch = "aarch64".into())),
            ("accel", Box::new(|k| k.accel = "kvm".into())),
            ("vcpus", Box::new(|k| k.vcpus = 1)),
            ("memory", Box::new(|k| k.memory_mib = 1024)),
            ("disk", Box::new(|k| k.disk_gib = 9)),
            ("user", Box::new(|k| k.admin_user = "pi".into())),
            ("keys", Box::new(|k| k.authorized_keys.push("k".into()))),
            ("runcmd", Box::new(|k| k.runcmd.push("true".into()))),
            ("writeback", Box::new(|k| k.writeback_delay_ms = Some(1))),
            ("client key", Box::new(|k| k.client_key.push('B'))),
            ("image", Box::new(|k| k.image.modified_ns = 2)),
            ("image size", Box::new(|k| k.image.len = 2)),
            (
                "firmware",
                Box::new(|k| k.firmware = Some((k.image.clone(), k.image.clone()))),
            ),
            ("emulator", Box::new(|k| k.emulator.path = "/q2".into())),
            ("qemu version", Box::new(|k| k.qemu_version.push('1'))),
            (
                "network",
                Box::new(|k| k.network = "default 10.0.3.1".into()),
            ),
            ("domain xml", Box::new(|k| k.domain_xml.push('y'))),
            ("seed", Box::new(|k| k.seed.push('t'))),
        ];
        for (what, change) in changes {
            let mut k = inputs();
            change(&mut k);
            assert_ne!(k.key(), base, "{what} does not change the key");
        }
        assert_eq!(inputs().key(), base, "the key is stable");
    }
}
