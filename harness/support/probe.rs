//! Probes with a budget: retry an attempt every [`BACKOFF`] until it succeeds or the budget is
//! spent, and wait for a TCP port. Generic: no harness types.

use std::future::Future;
use std::net::SocketAddr;
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
