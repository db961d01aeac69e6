//! Logging in over SSH with a budget: retried until the guest's sshd answers, a wrong host key
//! fatal at once.

use super::session::{SshError, SshSession, SshTarget};
use crate::support::probe::{BACKOFF, CONNECT_TIMEOUT};
use std::time::{Duration, Instant};

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
