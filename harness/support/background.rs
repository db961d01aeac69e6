//! Blocking cleanups on threads of their own: started without blocking the caller (a `Drop` on
//! a runtime worker), waited for by name before that name is used again, and joined before the
//! process exits.

use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;

/// Runs a blocking cleanup on a thread of its own, joined before the process exits (and by
/// [`wait_for`] of the same `name`); if no thread can be started, runs it here.
pub fn in_background(name: String, cleanup: impl FnOnce() + Send + 'static) {
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
pub fn wait_for(name: &str) {
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

/// Set once the process gives up on its teardowns (a second Ctrl-C): from then on the exit
/// does not wait for them.
static ABANDONED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes the exit stop waiting for background teardowns (what is left is reaped by the next
/// run, from the owner records).
pub fn abandon() {
    ABANDONED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Joins every background teardown (blocking), unless [`abandon`] was called.
pub fn join_pending() {
    join_all();
}

/// Joins every background teardown; registered with `atexit`, so a test process that returns
/// (or calls `exit`) right after dropping a VM still removes it.
extern "C" fn join_all() {
    loop {
        if ABANDONED.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let next = pending().lock().unwrap_or_else(|p| p.into_inner()).pop();
        let Some((_, handle)) = next else {
            return;
        };
        // Joined in small steps, so that abandoning stops the wait.
        while !handle.is_finished() {
            if ABANDONED.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
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
