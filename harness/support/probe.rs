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
/// the last reason it gave for not being ready. An attempt still running when the budget ends
/// is dropped: the budget bounds the whole wait, a hung attempt included.
pub async fn poll<T, F, Fut>(budget: Duration, mut attempt: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + budget;
    let mut before: Option<String> = None;
    loop {
        let started = Instant::now();
        let reason = match tokio::time::timeout_at(deadline.into(), attempt()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(reason)) => reason,
            Err(_) => {
                let before = before
                    .map(|r| format!(" (the one before: {r})"))
                    .unwrap_or_default();
                return Err(format!(
                    "an attempt was still running when the {budget:?} budget ended{before}"
                ));
            }
        };
        if Instant::now() >= deadline {
            return Err(reason);
        }
        before = Some(reason);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hung_attempt_ends_with_the_budget_and_the_last_reason() {
        let tries = std::sync::atomic::AtomicU32::new(0);
        let started = Instant::now();
        let err = poll(Duration::from_millis(1500), || async {
            if tries.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                Err::<(), _>("not yet".to_owned())
            } else {
                std::future::pending().await
            }
        })
        .await
        .unwrap_err();
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(1500) && took < Duration::from_secs(3),
            "{took:?}"
        );
        assert!(
            err.contains("still running when the 1.5s budget ended") && err.contains("not yet"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_failing_attempt_gives_its_reason_at_the_budget() {
        let err = poll(Duration::from_millis(300), || async {
            Err::<(), _>("refused".to_owned())
        })
        .await
        .unwrap_err();
        assert_eq!(err, "refused");
    }
}
