//! Exclusive locks on files (`flock`), the one way devicelab says "this is mine" across
//! threads and processes: a VM's name, a VM slot, a saved VM's clone, a download. A lock
//! belongs to the open file, so two tests in one process exclude each other as two processes
//! do, and the kernel releases a killed process's locks.
//!
//! Lock files are the owner's only (0600, in directories the caller makes 0700): a file other
//! users could open could be locked by them, stalling every run.

use std::fs::{File, TryLockError};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A held lock: released when dropped (its file removed first, if it was taken with
/// [`Removal::OnRelease`]).
#[derive(Debug)]
pub struct FileLock {
    file: File,
    path: PathBuf,
    remove: Removal,
}

/// What becomes of a lock file once its lock is released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// It stays (a fixed set of files: slots, clones).
    Keep,
    /// It goes (one file per name: names come and go).
    OnRelease,
}

impl FileLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // Removed while still held: whoever opens the path afterwards gets a new file, and
        // whoever had the old one open sees it is gone (`try_lock` checks) and tries again.
        if self.remove == Removal::OnRelease {
            let _ = std::fs::remove_file(&self.path);
        }
        let _ = self.file.unlock();
    }
}

/// Makes `dir` (and its parents) and gives it mode 0700.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    dir_with_mode(dir, 0o700)
}

/// Makes `dir` (and its parents) and gives it mode 0711: others may reach a file in it whose
/// name they know (QEMU, running as its own user, opens a disk there) but not list it.
pub fn traversable_dir(dir: &Path) -> std::io::Result<()> {
    dir_with_mode(dir, 0o711)
}

fn dir_with_mode(dir: &Path, mode: u32) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
}

/// Locks `path` unless someone holds it (`None` then), writing `holder` into it (who holds
/// it, for a waiting process's message). Blocking.
pub fn try_lock(path: &Path, holder: &str, remove: Removal) -> std::io::Result<Option<FileLock>> {
    // A file removed by its last holder between our open and our lock is not the lock any
    // more: try the new one (a bounded number of times: each round means someone else won).
    for _ in 0..16 {
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Ok(None),
            Err(TryLockError::Error(e)) => return Err(e),
        }
        let same = match std::fs::metadata(path) {
            Ok(now) => {
                let mine = file.metadata()?;
                (now.dev(), now.ino()) == (mine.dev(), mine.ino())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        if !same {
            continue;
        }
        // A file made by hand, or by a tool with another umask, may be open to others.
        if file.metadata()?.mode() & 0o077 != 0 {
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
        file.set_len(0)?;
        writeln!(file, "{holder} (pid {})", std::process::id())?;
        return Ok(Some(FileLock {
            file,
            path: path.to_owned(),
            remove,
        }));
    }
    Ok(None)
}

/// Who holds the lock at `path`, as its file says (empty if nobody ever did).
pub fn holder_of(path: &Path) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Whether someone holds the lock at `path` now, read from the kernel's lock table
/// (`/proc/locks`) so the question never takes the lock itself: a probe that locked for an
/// instant would make a real request at that instant find it taken. Where the table cannot be
/// read, that probe is the fallback. Blocking.
pub fn is_held(path: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    match std::fs::read_to_string("/proc/locks") {
        Ok(table) => flock_listed(&table, meta.dev(), meta.ino()),
        Err(_) => {
            File::open(path).is_ok_and(|f| matches!(f.try_lock(), Err(TryLockError::WouldBlock)))
        }
    }
}

/// Whether `/proc/locks` lists a `flock` on the file `dev`/`ino` (lines such as
/// `1: FLOCK  ADVISORY  WRITE 4242 00:2a:131074 0 EOF`; blocked waiters, `->`, are not holders).
fn flock_listed(table: &str, dev: u64, ino: u64) -> bool {
    let id = format!(
        "{:02x}:{:02x}:{ino}",
        rustix::fs::major(dev),
        rustix::fs::minor(dev)
    );
    table.lines().any(|l| {
        let mut words = l.split_whitespace().skip(1);
        words.next() == Some("FLOCK") && words.any(|w| w == id)
    })
}

/// Why a lock could not be had within its budget.
#[derive(Debug)]
pub enum WaitError {
    /// The lock file could not be opened or locked.
    Io(std::io::Error),
    /// Someone held it for the whole budget; `holder` is what its file says.
    Timeout { holder: String, waited: Duration },
}

/// Locks `path`, waiting up to `budget` for its holder to let go. Blocking (call it off the
/// runtime).
pub fn lock_within(path: &Path, holder: &str, budget: Duration) -> Result<FileLock, WaitError> {
    let started = Instant::now();
    loop {
        if let Some(lock) = try_lock(path, holder, Removal::Keep).map_err(WaitError::Io)? {
            return Ok(lock);
        }
        if started.elapsed() >= budget {
            return Err(WaitError::Timeout {
                holder: holder_of(path),
                waited: started.elapsed(),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(what: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "devicelab-lock-{what}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        private_dir(&d).unwrap();
        d
    }

    #[test]
    fn two_opens_in_one_process_exclude_each_other() {
        let d = dir("threads");
        let path = d.join("a.lock");
        let first = try_lock(&path, "first", Removal::Keep)
            .unwrap()
            .expect("free");
        let second = std::thread::scope(|s| {
            s.spawn(|| try_lock(&path, "second", Removal::Keep).unwrap())
                .join()
                .unwrap()
        });
        assert!(second.is_none(), "a second thread got a held lock");
        assert!(is_held(&path));
        // Asking does not take it: a lock probe would hold it for the instant of the question.
        let (dev, ino) = {
            let m = std::fs::metadata(&path).unwrap();
            (m.dev(), m.ino())
        };
        let table = std::fs::read_to_string("/proc/locks").unwrap();
        assert!(flock_listed(&table, dev, ino), "{table}");
        // Another inode's lock, whose number this one's begins with, is not this one's (read
        // from a line of its own: the live table holds other tests' locks too).
        let (major, minor) = (rustix::fs::major(dev), rustix::fs::minor(dev));
        assert!(!flock_listed(
            &format!("1: FLOCK  ADVISORY  WRITE 1 {major:02x}:{minor:02x}:{ino}7 0 EOF"),
            dev,
            ino
        ));
        assert!(!flock_listed(
            &format!(
                "1: -> FLOCK  ADVISORY  WRITE 1 {:02x}:{:02x}:{ino} 0 EOF",
                rustix::fs::major(dev),
                rustix::fs::minor(dev)
            ),
            dev,
            ino
        ));
        assert!(holder_of(&path).starts_with("first (pid "));
        drop(first);
        assert!(!is_held(&path));
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_removed_lock_file_is_not_a_lock_any_more() {
        let d = dir("removed");
        let path = d.join("name.lock");
        let first = try_lock(&path, "first", Removal::OnRelease)
            .unwrap()
            .unwrap();
        // Someone opened the file while it was held, and locks it once it is released and
        // removed: they hold an orphan, so a third party must still get the path.
        let stale = File::open(&path).unwrap();
        drop(first);
        assert!(!path.exists(), "released with removal");
        stale.try_lock().unwrap();
        let third = try_lock(&path, "third", Removal::OnRelease).unwrap();
        assert!(third.is_some(), "the path's new file is free");
        drop(third);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn lock_files_are_the_owners_only() {
        let d = dir("mode");
        let path = d.join("m.lock");
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let lock = try_lock(&path, "me", Removal::Keep).unwrap().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
        drop(lock);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_wait_ends_at_its_budget_naming_the_holder() {
        let d = dir("wait");
        let path = d.join("w.lock");
        let held = try_lock(&path, "the holder", Removal::Keep)
            .unwrap()
            .unwrap();
        let started = Instant::now();
        match lock_within(&path, "waiter", Duration::from_millis(300)) {
            Err(WaitError::Timeout { holder, .. }) => assert!(holder.contains("the holder")),
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(held);
        assert!(lock_within(&path, "waiter", Duration::from_millis(300)).is_ok());
        std::fs::remove_dir_all(d).unwrap();
    }
}
