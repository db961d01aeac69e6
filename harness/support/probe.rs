//! Probes with a budget: retry an attempt every [`BACKOFF`] until it succeeds or the budget is
//! spent. Generic: no harness types.

use std::future::Future;
use std::time::{Duration, Instant};

/// How often a probe retries.
pub const BACKOFF: Duration = Duration::from_secs(1);
/// One TCP or SSH connection attempt may take this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The least time the first attempt of a wait is given, even when the wait's own time is
/// already spent (waits timed from one start share it): one real try, not none.
pub const FIRST_ATTEMPT: Duration = Duration::from_secs(30);

/// Calls `attempt` every `BACKOFF` until it returns `Ok`, or `budget` has passed; then returns
/// the last reason it gave for not being ready. An attempt still running at the end of the
/// budget (or of [`FIRST_ATTEMPT`], for the first) is dropped: a hung attempt does not
/// stretch the wait.
pub async fn poll<T, F, Fut>(budget: Duration, attempt: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    poll_every(budget, BACKOFF, attempt).await
}

/// [`poll`], starting an attempt every `every` (or as soon as the last one ended, if it took
/// longer).
pub async fn poll_every<T, F, Fut>(
    budget: Duration,
    every: Duration,
    mut attempt: F,
) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let first = Instant::now();
    let deadline = first + budget;
    let mut before: Option<String> = None;
    loop {
        let started = Instant::now();
        let ends = if before.is_none() {
            deadline.max(first + FIRST_ATTEMPT)
        } else {
            deadline
        };
        let reason = match tokio::time::timeout_at(ends.into(), attempt()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(reason)) => reason,
            Err(_) => {
                let before = before
                    .map(|r| format!(" (the one before: {r})"))
                    .unwrap_or_default();
                return Err(format!(
                    "an attempt was still running when the wait's time ran out{before}"
                ));
            }
        };
        // No attempt starts that could not end before the deadline by its own backoff.
        let next = started + every;
        if next >= deadline {
            return Err(reason);
        }
        before = Some(reason);
        tokio::time::sleep_until(next.into()).await;
    }
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
            err.contains("still running when the wait's time ran out") && err.contains("not yet"),
            "{err}"
        );
    }

    /// A wait with no time left still makes one real attempt (here: one that takes 200 ms).
    #[tokio::test]
    async fn a_wait_with_no_time_left_makes_one_real_attempt() {
        let got = poll(Duration::ZERO, || async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            Ok::<_, String>("answered")
        })
        .await;
        assert_eq!(got.as_deref(), Ok("answered"));
    }

    /// The last attempt is not started just to be cut off at the deadline: a wait whose
    /// attempts answer at once ends with their own reason, not a "still running".
    #[tokio::test]
    async fn a_wait_of_failing_attempts_ends_with_their_reason() {
        let err = poll(Duration::from_millis(2500), || async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Err::<(), _>("refused".to_owned())
        })
        .await
        .unwrap_err();
        assert_eq!(err, "refused");
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
