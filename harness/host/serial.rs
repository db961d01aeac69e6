//! A VM's serial console, streamed from libvirt (`virDomainOpenConsole`) into its log file in
//! the run dir, so the console guard, the waits and the artifacts read it there whether QEMU
//! runs on this machine or on a libvirt host elsewhere.
//!
//! The domain is started (or restored) paused, the stream opened, then the domain resumed (see
//! `Libvirt::start`): the log holds the console from its first byte. A thread copies the stream
//! until the domain stops (the stream ends); the next start opens a new one, appending to the
//! same log.

use std::io::Write;
use std::path::Path;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::stream::Stream;

/// The name of the threads that copy a console into its log.
pub const TAP_THREAD: &str = "dl-console";

/// What could not be done to tap a console, and why.
#[derive(Debug)]
pub struct TapError {
    /// What was being done ("open the serial console of", …).
    pub action: &'static str,
    /// Why it failed.
    pub message: String,
}

/// Starts copying `dom`'s serial console into `log` (appended), until the domain stops.
pub fn tap(conn: &Connect, dom: &Domain, name: &str, log: &Path) -> Result<(), TapError> {
    let failed = |action| {
        move |e: &dyn std::fmt::Display| TapError {
            action,
            message: e.to_string(),
        }
    };
    let stream = Stream::new(conn, 0).map_err(|e| failed("open a console stream for")(&e))?;
    // Forced: a console left open by an earlier start of the same domain gives way.
    dom.open_console(None, &stream, virt::sys::VIR_DOMAIN_CONSOLE_FORCE)
        .map_err(|e| failed("open the serial console of")(&e))?;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| failed("open the console log of")(&format!("{}: {e}", log.display())))?;
    let vm = name.to_owned();
    std::thread::Builder::new()
        .name(TAP_THREAD.into())
        .spawn(move || {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match stream.recv(&mut buf) {
                    Ok(n) if n > 0 => {
                        let n = usize::try_from(n).unwrap_or(0);
                        if file.write_all(&buf[..n]).is_err() {
                            break; // the run dir is gone: nobody reads this log any more
                        }
                    }
                    Ok(_) => break, // the domain stopped
                    Err(e) => {
                        tracing::debug!("VM {vm}: the console stream ended: {e}");
                        break;
                    }
                }
            }
            let _ = stream.abort();
        })
        .map_err(|e| failed("start the console thread of")(&e))?;
    Ok(())
}
