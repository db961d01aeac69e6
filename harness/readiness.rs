//! Readiness probes, in the order a fresh VM passes them: DHCP lease → TCP 22 → SSH login →
//! cloud-init done. Each polls tightly with a short backoff; none sleeps a fixed time.

use crate::ssh::{SshError, SshSession, SshTarget};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How often a probe retries.
pub const BACKOFF: Duration = Duration::from_secs(1);
/// One TCP or SSH connection attempt may take this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Calls `attempt` every `BACKOFF` until it returns `Ok`, or `budget` has passed; then returns
/// the last reason it gave for not being ready.
pub async fn poll<T, F, Fut>(budget: Duration, mut attempt: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + budget;
    loop {
        let started = Instant::now();
        let last = match attempt().await {
            Ok(v) => return Ok(v),
            Err(reason) => reason,
        };
        if Instant::now() >= deadline {
            return Err(last);
        }
        let next = (started + BACKOFF).min(deadline);
        tokio::time::sleep_until(next.into()).await;
    }
}

/// Waits until something accepts TCP connections at `addr`.
pub async fn tcp_port(addr: SocketAddr, budget: Duration) -> Result<(), String> {
    poll(budget, || async move {
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("connect {addr}: {e}")),
            Err(_) => Err(format!(
                "connect {addr}: no answer within {CONNECT_TIMEOUT:?}"
            )),
        }
    })
    .await
}

/// Waits until an SSH login succeeds. A wrong host key is fatal at once: retrying cannot fix it.
pub async fn ssh_login(target: &SshTarget, budget: Duration) -> Result<SshSession, SshError> {
    let deadline = Instant::now() + budget;
    loop {
        match SshSession::connect(target, CONNECT_TIMEOUT).await {
            Ok(session) => return Ok(session),
            Err(e @ SshError::HostKeyMismatch { .. }) => return Err(e),
            Err(e) if Instant::now() + BACKOFF >= deadline => return Err(e),
            Err(e) => {
                tracing::debug!("ssh not ready yet: {e}");
                tokio::time::sleep(BACKOFF).await;
            }
        }
    }
}

/// Resolves when the guest has sat at its login prompt (after byte `offset` of the serial log)
/// for `grace` while port `addr` refuses connections: the boot is over and nothing will start
/// listening, so waiting longer only burns the budget. Raced against SSH waits.
pub async fn nothing_listening(
    addr: SocketAddr,
    serial_log: PathBuf,
    offset: u64,
    grace: Duration,
) -> String {
    let mut idle_since: Option<Instant> = None;
    loop {
        let log = serial_log.clone();
        let at_prompt =
            tokio::task::spawn_blocking(move || crate::console::login_prompt_after(&log, offset))
                .await
                .unwrap_or(false);
        let refused = at_prompt
            && matches!(
                tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await,
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused
            );
        if refused {
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= grace {
                return format!(
                    "the guest has been at its login prompt for {:.0} s and {addr} still refuses connections",
                    since.elapsed().as_secs_f64()
                );
            }
        } else {
            idle_since = None;
        }
        tokio::time::sleep(BACKOFF).await;
    }
}
