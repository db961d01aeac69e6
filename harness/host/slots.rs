//! How many VMs run at once on this host, across every test process (nextest runs one process
//! per test, so an in-process semaphore cannot do it): N lock files, one held (flock) by each
//! running VM until its teardown is done. N is derived from the host's cores and memory, or
//! set with DEVICELAB_VM_SLOTS. The kernel releases a killed process's slots.

use crate::model::arch::Accelerator;
use crate::support::lock::{self, FileLock, Removal};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Host memory a VM costs beyond its RAM: QEMU itself, and under TCG the capped translation
/// cache (`domain_xml::TCG_TB_CACHE_MIB`).
const QEMU_OVERHEAD_MIB: u64 = 256;
/// Host memory left to everything else (the test processes, libvirtd, the NATS servers).
const HOST_RESERVE_MIB: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("cannot use the VM slot lock {path}: {source} (is DEVICELAB_DATA_DIR writable?)")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "no VM slot came free within {budget:?}: all {count} are held by {holders} \
         (raise the host's slots if it can carry more VMs: DEVICELAB_VM_SLOTS, or its `#slots=N` \
         in DEVICELAB_HOSTS; or DEVICELAB_BUDGET_SCALE)"
    )]
    Timeout {
        count: usize,
        budget: Duration,
        holders: String,
    },
}

/// How many VMs of one size this host carries, and why (logged, so a slow queue is explained).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotCount {
    pub count: usize,
    pub reason: String,
}

impl SlotCount {
    /// Under TCG every vCPU keeps a host core busy; under KVM a mostly idle guest costs far
    /// less (one core per VM). Memory: the guest's RAM, QEMU's overhead, the translation cache.
    pub fn derive(
        cores: usize,
        mem_total_mib: u64,
        accel: Accelerator,
        vcpus: u32,
        memory_mib: u64,
    ) -> Self {
        let (cpu_cost, tb_cache) = match accel {
            Accelerator::Tcg => (
                vcpus.max(1) as usize,
                crate::host::domain_xml::TCG_TB_CACHE_MIB,
            ),
            Accelerator::Kvm => (1, 0),
        };
        let by_cpu = (cores / cpu_cost).max(1);
        let per_vm = memory_mib + tb_cache + QEMU_OVERHEAD_MIB;
        let by_mem = (mem_total_mib.saturating_sub(HOST_RESERVE_MIB) / per_vm).max(1) as usize;
        Self {
            count: by_cpu.min(by_mem),
            reason: format!(
                "{cores} cores / {cpu_cost} per VM under {accel} = {by_cpu}; \
                 {mem_total_mib} MiB - {HOST_RESERVE_MIB} reserved / {per_vm} MiB per VM = {by_mem}"
            ),
        }
    }

    /// A host's count for VMs of this size, unless `configured` says: derived from `size`
    /// (cores, memory in MiB: a remote host's, as its libvirt reports it), else from this
    /// machine's.
    pub fn for_size(
        configured: Option<usize>,
        size: Option<(usize, u64)>,
        accel: Accelerator,
        vcpus: u32,
        memory_mib: u64,
    ) -> Self {
        match (configured, size) {
            (None, Some((cores, mem_mib))) => {
                Self::derive(cores, mem_mib, accel, vcpus, memory_mib)
            }
            (configured, _) => Self::for_host(configured, accel, vcpus, memory_mib),
        }
    }

    /// This host's count for VMs of this size, unless `configured` (DEVICELAB_VM_SLOTS) says.
    pub fn for_host(
        configured: Option<usize>,
        accel: Accelerator,
        vcpus: u32,
        memory_mib: u64,
    ) -> Self {
        if let Some(count) = configured {
            return Self {
                count,
                reason: "set (DEVICELAB_VM_SLOTS, or the host's `#slots=N` in DEVICELAB_HOSTS)"
                    .into(),
            };
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::derive(cores, mem_total_mib(), accel, vcpus, memory_mib)
    }
}

/// MemTotal (not MemAvailable: every process must derive the same count, whatever runs).
fn mem_total_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(4096 + HOST_RESERVE_MIB, |kib| kib / 1024)
}

/// A held slot: released when dropped (or when the process dies).
#[derive(Debug)]
pub struct SlotLease {
    _lock: FileLock,
    pub index: usize,
    /// Whose slots it counts among (see [`acquire`]).
    group: String,
}

/// Takes one of `count` slots in `dir` for `holder` (a VM name) of `group` (one test: the
/// lab it asked), waiting up to `budget` for one to come free. A group that already holds a
/// slot and finds none free goes over the count instead of waiting (a test that runs two VMs
/// at once must not wait for itself): logged. Another test, in this process or another,
/// waits.
pub async fn acquire(
    dir: PathBuf,
    count: &SlotCount,
    holder: String,
    group: String,
    budget: Duration,
) -> Result<Option<SlotLease>, SlotError> {
    let started = Instant::now();
    // One test's slots on one host: its VMs on another host wait for that host's slots.
    let group = format!("{group} in {}", dir.display());
    let d = dir.clone();
    tokio::task::spawn_blocking(move || lock::private_dir(&d))
        .await
        .map_err(std::io::Error::other)
        .and_then(|made| made)
        .map_err(|source| SlotError::Lock {
            path: dir.clone(),
            source,
        })?;
    let mut announced = false;
    loop {
        let (d, n, h, g) = (dir.clone(), count.count, holder.clone(), group.clone());
        let got = tokio::task::spawn_blocking(move || try_any(&d, n, &h, &g))
            .await
            .map_err(|e| SlotError::Lock {
                path: dir.clone(),
                source: std::io::Error::other(e),
            })??;
        if let Some(lease) = got {
            if announced {
                tracing::info!(
                    "VM {holder}: got VM slot {} after {:.0} s",
                    lease.index,
                    started.elapsed().as_secs_f64()
                );
            }
            return Ok(Some(lease));
        }
        let mine = held_by_group(&group);
        if mine > 0 {
            tracing::warn!(
                "VM {holder}: all {} VM slots are taken and its test holds {mine} of them: \
                 running it over the count (one test, several VMs at once)",
                count.count,
            );
            return Ok(None);
        }
        if !announced || started.elapsed() >= budget {
            let (d, n) = (dir.clone(), count.count);
            let held_by = tokio::task::spawn_blocking(move || holders(&d, n))
                .await
                .unwrap_or_default();
            if started.elapsed() >= budget {
                return Err(SlotError::Timeout {
                    count: count.count,
                    budget,
                    holders: held_by,
                });
            }
            tracing::info!(
                "VM {holder}: waiting for a VM slot: all {} are held by {held_by} ({})",
                count.count,
                count.reason
            );
            announced = true;
        }
        tokio::time::sleep(crate::support::probe::BACKOFF).await;
    }
}

/// Slots held in this process, per group.
fn held() -> &'static Mutex<HashMap<String, usize>> {
    static HELD: OnceLock<Mutex<HashMap<String, usize>>> = OnceLock::new();
    HELD.get_or_init(Default::default)
}

fn held_by_group(group: &str) -> usize {
    held()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(group)
        .copied()
        .unwrap_or(0)
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        let mut held = held().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.group) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.group);
            }
        }
    }
}

fn slot_path(dir: &Path, stem: &str, index: usize) -> PathBuf {
    dir.join(format!("{stem}{index}.lock"))
}

/// The first free host slot in `dir` (which exists), or `None` when all are held. Blocking.
fn try_any(
    dir: &Path,
    count: usize,
    holder: &str,
    group: &str,
) -> Result<Option<SlotLease>, SlotError> {
    Ok(
        lock_first_free(dir, "", 0, count, holder)?.map(|(lock, index)| {
            *held()
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(group.to_owned())
                .or_default() += 1;
            SlotLease {
                _lock: lock,
                index,
                group: group.to_owned(),
            }
        }),
    )
}

/// Locks the first of `<stem><from>.lock` … `<stem><count-1>.lock` in `dir` (which exists)
/// that nobody holds, writing `holder` into it; `None` when all are held. Blocking.
pub(crate) fn lock_first_free(
    dir: &Path,
    stem: &str,
    from: usize,
    count: usize,
    holder: &str,
) -> Result<Option<(FileLock, usize)>, SlotError> {
    for index in from..count {
        let path = slot_path(dir, stem, index);
        match lock::try_lock(&path, holder, Removal::Keep) {
            Ok(Some(lock)) => return Ok(Some((lock, index))),
            Ok(None) => continue,
            Err(source) => return Err(SlotError::Lock { path, source }),
        }
    }
    Ok(None)
}

/// What the slots' files say about their holders.
fn holders(dir: &Path, count: usize) -> String {
    (0..count)
        .map(|i| lock::holder_of(&slot_path(dir, "", i)))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcg_guests_cost_a_core_per_vcpu_and_kvm_guests_one_core() {
        // A 2-core, 24 GiB host running 2-vCPU 2 GiB guests under TCG.
        let ci = SlotCount::derive(2, 24 * 1024, Accelerator::Tcg, 2, 2048);
        assert_eq!(ci.count, 1, "{}", ci.reason);
        let kvm = SlotCount::derive(16, 64 * 1024, Accelerator::Kvm, 2, 2048);
        assert_eq!(kvm.count, 16, "{}", kvm.reason);
        // Memory bounds it too: (16 GiB - 4 GiB) / (2 GiB + 256 MiB) = 5.
        let small = SlotCount::derive(32, 16 * 1024, Accelerator::Kvm, 2, 2048);
        assert_eq!(small.count, 5, "{}", small.reason);
        // Never zero, whatever the host.
        assert_eq!(
            SlotCount::derive(1, 1024, Accelerator::Tcg, 4, 8192).count,
            1
        );
    }

    #[test]
    fn each_slot_is_held_by_one_holder_until_released() {
        let dir = std::env::temp_dir().join(format!("devicelab-slots-{}", std::process::id()));
        lock::private_dir(&dir).unwrap();
        let a = try_any(&dir, 2, "vm-a", "t")
            .unwrap()
            .expect("slot 0 is free");
        let b = try_any(&dir, 2, "vm-b", "t")
            .unwrap()
            .expect("slot 1 is free");
        assert_eq!((a.index, b.index), (0, 1));
        assert!(
            try_any(&dir, 2, "vm-c", "t").unwrap().is_none(),
            "both are held"
        );
        assert!(holders(&dir, 2).contains("vm-a") && holders(&dir, 2).contains("vm-b"));
        drop(a);
        let c = try_any(&dir, 2, "vm-c", "t")
            .unwrap()
            .expect("slot 0 came free");
        assert_eq!(c.index, 0);
        drop((b, c));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn slots_dir(what: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "devicelab-slots-{what}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ))
    }

    fn one() -> SlotCount {
        SlotCount {
            count: 1,
            reason: "one".into(),
        }
    }

    #[tokio::test]
    async fn a_test_holding_a_slot_goes_over_the_count_and_another_test_waits() {
        let dir = slots_dir("over");
        let budget = Duration::from_secs(60);
        let first = acquire(dir.clone(), &one(), "a1".into(), "test-a".into(), budget)
            .await
            .unwrap()
            .expect("the slot is free");
        // The same test's second VM does not wait for its first.
        let over = acquire(dir.clone(), &one(), "a2".into(), "test-a".into(), budget)
            .await
            .unwrap();
        assert!(over.is_none(), "test-a's second VM runs over the count");
        // Another test in this same process waits until test-a's slot comes free.
        let waiting = tokio::spawn({
            let dir = dir.clone();
            async move { acquire(dir, &one(), "b1".into(), "test-b".into(), budget).await }
        });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            !waiting.is_finished(),
            "test-b went over a count it holds nothing of"
        );
        drop(first);
        let got = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("test-b gets the slot once it is free")
            .unwrap()
            .unwrap();
        assert_eq!(got.expect("a slot, not over the count").index, 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_wait_for_a_slot_ends_at_its_budget_naming_the_holders() {
        let dir = slots_dir("budget");
        let _held = acquire(
            dir.clone(),
            &one(),
            "devicelab-vm-holder".into(),
            "budget-a".into(),
            Duration::from_secs(5),
        )
        .await
        .unwrap()
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "slots/ is the owner's only");
        let started = Instant::now();
        let err = acquire(
            dir.clone(),
            &one(),
            "b1".into(),
            "budget-b".into(),
            Duration::from_millis(700),
        )
        .await
        .expect_err("the only slot is held throughout");
        assert!(started.elapsed() < Duration::from_secs(10));
        let text = err.to_string();
        assert!(
            text.contains("devicelab-vm-holder (pid ") && text.contains("DEVICELAB_VM_SLOTS"),
            "{text}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_variable_overrides_the_derivation() {
        let c = SlotCount::for_host(Some(7), Accelerator::Tcg, 2, 2048);
        assert_eq!(c.count, 7);
    }
}
