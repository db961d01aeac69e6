//! A VM's serial console, streamed from libvirt (`virDomainOpenConsole`) into its log file in
//! the run dir, so the console guard, the waits and the artifacts read it there whether QEMU
//! runs on this machine or on a libvirt host elsewhere.
//!
//! The domain is started (or restored) paused, the stream opened, then the domain resumed (see
//! `Libvirt::start`): the log holds the console from its first byte. A thread copies the stream
//! until the domain stops (the stream ends); the next start opens a new one, appending to the
//! same log.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::stream::Stream;

/// The name of the threads that copy a console into its log.
pub const TAP_THREAD: &str = "dl-console";

/// How long [`settle`] waits for a stopped VM's console to reach its log: libvirt ends the
/// stream as the domain stops, so this is only ever waited out if the VM still runs.
pub const SETTLE_BUDGET: Duration = Duration::from_secs(5);

/// What could not be done to tap a console, and why.
#[derive(Debug)]
pub struct TapError {
    /// What was being done ("open the serial console of", …).
    pub action: &'static str,
    /// Why it failed.
    pub message: String,
}

/// The copying thread of each log, until the next start of its VM or [`settle`].
fn taps() -> &'static Mutex<HashMap<PathBuf, JoinHandle<()>>> {
    static TAPS: OnceLock<Mutex<HashMap<PathBuf, JoinHandle<()>>>> = OnceLock::new();
    TAPS.get_or_init(Default::default)
}

/// Starts copying `dom`'s serial console into `log` (appended), until the domain stops, on
/// `conn` (`dom`'s connection); the copying thread holds `keep` (the connection's own handle,
/// with its close callback) until then, past the stream's end (finished or aborted).
pub fn tap(
    conn: &Connect,
    keep: impl Send + 'static,
    dom: &Domain,
    name: &str,
    log: &Path,
) -> Result<(), TapError> {
    let failed = |action| {
        move |e: &dyn std::fmt::Display| TapError {
            action,
            message: e.to_string(),
        }
    };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| failed("open the console log of")(&format!("{}: {e}", log.display())))?;
    let stream = Stream::new(conn, 0).map_err(|e| failed("open a console stream for")(&e))?;
    // Forced: a console left open by an earlier start of the same domain gives way.
    dom.open_console(None, &stream, virt::sys::VIR_DOMAIN_CONSOLE_FORCE)
        .map_err(|e| failed("open the serial console of")(&e))?;
    let vm = name.to_owned();
    let thread = std::thread::Builder::new()
        .name(TAP_THREAD.into())
        .spawn(move || {
            let _keep = keep;
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match stream.recv(&mut buf) {
                    Ok(n) if n > 0 => {
                        let n = usize::try_from(n).unwrap_or(0);
                        if file.write_all(&buf[..n]).is_err() {
                            let _ = stream.abort(); // the run dir is gone: nobody reads it
                            return;
                        }
                    }
                    Ok(_) => {
                        let _ = stream.finish(); // the domain stopped
                        return;
                    }
                    Err(e) => {
                        tracing::debug!("VM {vm}: the console stream ended: {e}");
                        let _ = stream.abort();
                        return;
                    }
                }
            }
        })
        .map_err(|e| failed("start the console thread of")(&e))?;
    taps()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(log.to_owned(), thread);
    Ok(())
}

/// Waits, up to `budget`, until everything the console of `log`'s VM printed before it stopped
/// is in the log (its copying thread has seen the stream end): what a reader of the log takes
/// for the previous boot's, or copies, is all there. Blocking.
pub fn settle(log: &Path, budget: Duration) {
    let Some(thread) = taps().lock().unwrap_or_else(|p| p.into_inner()).remove(log) else {
        return;
    };
    let started = Instant::now();
    while !thread.is_finished() && started.elapsed() < budget {
        std::thread::sleep(Duration::from_millis(20));
    }
    if thread.is_finished() {
        let _ = thread.join();
    } else {
        tracing::warn!(
            "the console of {} still streams after {budget:?}: its VM still runs?",
            log.display()
        );
    }
}
