//! Delivery across an outage: the `partition` trial (the device cut off for longer than both
//! keep-alives, then healed) and the verdict it shares with the fault tests: every report the
//! agent made arrives, once each, in order, and reporting resumes.
//!
//! What the verdict reads: an agent with a report counter (`Report::seq`, the reference agent)
//! must deliver every number after the last one before the outage, each once, in order: its
//! backlog. An agent without one (fire and forget, like the heartbeat) cannot say what it made
//! and did not send: its reports must arrive in order (device timestamps rising), none twice,
//! and reporting must resume; what it did not send during the outage is counted as its loss.
//! All reports must come from one boot.

use crate::agent::description::{AgentDescription, Report};
use crate::lab::Lab;
use crate::model::arch::VmArchitecture;
use crate::model::spec::Start;
use crate::nats::{ReportLog, Stored, Verdict};
use crate::trials::scenario::{self, OnboardedDevice, ScenarioError};
use crate::vm::PhaseTimings;
use devicelab_agent::now_ms;
use std::time::{Duration, Instant};

/// How long the `partition` trial cuts the device off: longer than both keep-alives, the
/// agent's (async-nats pings every 60 s) and the server's (set for the trial to
/// [`SERVER_KEEPALIVE`]).
pub const PARTITION_OUTAGE: Duration = Duration::from_secs(90);
/// The NATS server's keep-alive in the `partition` trial: a ping every 20 s, the connection
/// dropped after 2 unanswered (40–60 s).
pub const SERVER_KEEPALIVE: &str = "ping_interval: \"20s\"\nping_max: 2\n";

/// What an outage left behind, as delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Reports after the last one before the outage, up to the first made after it.
    pub reports: usize,
    /// Reports the agent made during the outage and delivered after it.
    pub backlog: usize,
    /// Counter gaps are failures; this counts what an agent without a counter did not send
    /// during the outage (estimated from its interval), `None` for a counting agent.
    pub lost: Option<usize>,
}

/// Judges `after` (this device's reports stored after `last_before`, in stream order) for an
/// outage from `outage.0` to `outage.1` (host ms; the device's clock is the host's here) of
/// an agent reporting every `interval`.
pub fn judge_delivery(
    last_before: &Report,
    after: &[Report],
    outage: (u64, u64),
    interval: Duration,
) -> Result<Delivery, String> {
    let mut prev = last_before;
    for (i, r) in after.iter().enumerate() {
        if r.boot_marker != last_before.boot_marker {
            return Err(format!(
                "report {i} after the outage is from boot {:?}, not {:?}: the device rebooted",
                r.boot_marker, last_before.boot_marker
            ));
        }
        match (prev.seq, r.seq) {
            (Some(p), Some(n)) if n == p + 1 => {}
            (Some(p), Some(n)) if n <= p => {
                return Err(format!(
                    "report #{n} arrived after #{p}: repeated or out of order"
                ));
            }
            (Some(p), Some(n)) => {
                return Err(format!(
                    "reports #{}..#{} never arrived (#{n} came after #{p})",
                    p + 1,
                    n - 1
                ));
            }
            (None, None) if r.timestamp_ms > prev.timestamp_ms => {}
            (None, None) => {
                return Err(format!(
                    "a report stamped {} arrived after one stamped {}: repeated or out of order",
                    r.timestamp_ms, prev.timestamp_ms
                ));
            }
            (p, n) => {
                return Err(format!(
                    "the agent's report counter came and went ({p:?} then {n:?})"
                ));
            }
        }
        prev = r;
    }
    let backlog = after
        .iter()
        .filter(|r| (outage.0..=outage.1).contains(&r.timestamp_ms))
        .count();
    let lost = last_before.seq.is_none().then(|| {
        let made = (outage.1.saturating_sub(outage.0)) as u128 / interval.as_millis().max(1);
        (made as usize).saturating_sub(backlog)
    });
    Ok(Delivery {
        reports: after.len(),
        backlog,
        lost,
    })
}

/// The agent's interval, as its reports show it: the median gap between consecutive ones
/// (a backlog drained at once has gaps near zero, the regular ones dominate otherwise).
fn reporting_interval(reports: &[Report]) -> Duration {
    let mut gaps: Vec<u64> = reports
        .windows(2)
        .map(|w| w[1].timestamp_ms.saturating_sub(w[0].timestamp_ms))
        .collect();
    gaps.sort_unstable();
    Duration::from_millis(gaps.get(gaps.len() / 2).copied().unwrap_or(1_000).max(1))
}

/// How long a fault lasts, and whether the device must be silent meanwhile (a cut cable, a
/// partition, a frozen device) or go on reporting (a full disk).
#[derive(Debug, Clone, Copy)]
pub struct Outage {
    /// How long the fault lasts before it is undone.
    pub duration: Duration,
    /// `true`: nothing from the device may arrive after the first 5 s (what was in flight)
    /// until the fault is undone, or the verdict fails; `false`: its reports keep arriving.
    pub silences: bool,
}

impl Outage {
    /// The device is cut off for `duration`: nothing of its may arrive meanwhile.
    pub fn silent(duration: Duration) -> Self {
        Self {
            duration,
            silences: true,
        }
    }
    /// The device stays reachable for `duration` (its reports keep arriving).
    pub fn reachable(duration: Duration) -> Self {
        Self {
            duration,
            silences: false,
        }
    }
}

/// What was sent just before a fault may still be stored this long after it.
const IN_FLIGHT: Duration = Duration::from_secs(5);

/// Waits for a report stored after stream sequence `after`; returns it with its sequence.
async fn next_report(
    log: &ReportLog,
    after: u64,
    budget: Duration,
) -> Result<(u64, Report), ScenarioError> {
    Ok(log.wait_for(after, budget, |_| Verdict::Accept).await?)
}

/// Cuts `device` off for `outage` with `cut`, undoes it with `heal`, and judges the delivery:
/// the backlog arrives once, in order, and reporting resumes. Returns the verdict and how
/// long the first report after healing took.
pub async fn ride_out<C, H>(
    device: &OnboardedDevice,
    outage: Outage,
    cut: C,
    heal: H,
) -> Result<(Delivery, Duration), ScenarioError>
where
    C: AsyncFnOnce() -> Result<(), crate::vm::VmError>,
    H: AsyncFnOnce() -> Result<(), crate::vm::VmError>,
{
    let log = device.reports();
    let budget = device.vm.budgets().power_cycle_recovery;
    // A fresh report first: the last one before the outage, and where the judging starts.
    let (gate, last_before) = next_report(&log, log.last_sequence().await?, budget).await?;
    let cut_ms = now_ms();
    // Whatever happens once the fault may have begun (even a cut that failed half-way), it is
    // undone before this returns: a test never leaves its device partitioned.
    let during = async {
        cut().await?;
        // What was in flight when the fault began may still land; after that, a fault that
        // silences the device must really silence it (else the test proves nothing).
        let grace = IN_FLIGHT.min(outage.duration);
        tokio::time::sleep(grace).await;
        let quiet_from = log.last_sequence().await?;
        tokio::time::sleep(outage.duration - grace).await;
        let at_heal = log.last_sequence().await?;
        if outage.silences && at_heal > quiet_from {
            return Err(ScenarioError::Check(format!(
                "{} message(s) arrived during the outage, after the first {:.0} s: the fault did not cut the device off",
                at_heal - quiet_from,
                grace.as_secs_f64()
            )));
        }
        Ok(at_heal)
    }
    .await;
    let healed = heal().await;
    let at_heal = match (during, healed) {
        (Ok(at_heal), Ok(())) => at_heal,
        (Err(e), Ok(())) => return Err(e),
        (Ok(_), Err(h)) => return Err(h.into()),
        (Err(e), Err(h)) => {
            return Err(ScenarioError::Check(format!(
                "{e}; and undoing the fault failed too: {h}"
            )));
        }
    };
    let heal_ms = now_ms();
    let healed = Instant::now();
    next_report(&log, at_heal, budget).await?;
    let first_after = healed.elapsed();
    // Reporting resumed: three reports made after the healing (the device's clock is the
    // host's, to within the clock step's second).
    let mut fresh = 0;
    let after: Vec<Stored<Report>> = log
        .collect(gate, budget, |r| {
            fresh += usize::from(r.timestamp_ms > heal_ms + 1_000);
            fresh >= 3
        })
        .await?;
    let reports: Vec<Report> = after.into_iter().map(|s| s.report).collect();
    let interval = reporting_interval(&reports);
    let delivery = judge_delivery(&last_before, &reports, (cut_ms, heal_ms), interval)
        .map_err(ScenarioError::Check)?;
    Ok((delivery, first_after))
}

/// The `partition` trial: an onboarded device (warm: the trial proves delivery, not the first
/// boot) is cut off by [`crate::vm::Vm::partition`] for [`PARTITION_OUTAGE`], then healed.
pub async fn partition_with(
    lab: &Lab,
    arch: VmArchitecture,
    agent: &AgentDescription,
) -> Result<PhaseTimings, ScenarioError> {
    let mut agent = agent.clone();
    agent.nats_config.push_str(SERVER_KEEPALIVE);
    let device =
        scenario::onboarded_device_started(lab, arch, "part", &agent, Some(Start::Warm)).await?;
    let vm = &device.vm;
    match ride_out(
        &device,
        Outage::silent(PARTITION_OUTAGE),
        async || vm.partition().await,
        async || vm.heal().await,
    )
    .await
    {
        Ok((delivery, first_after)) => {
            device.timings.record("partition outage", PARTITION_OUTAGE);
            device
                .timings
                .record("first report after healing", first_after);
            let summary = format!(
                "partition: outage {:.0} s; first report {:.1} s after healing; backlog {} \
                 report(s) delivered once each, in order ({} after the outage in all){}",
                PARTITION_OUTAGE.as_secs_f64(),
                first_after.as_secs_f64(),
                delivery.backlog,
                delivery.reports,
                delivery.lost.map_or(String::new(), |l| format!(
                    "; ~{l} not sent during the outage (the agent keeps no backlog)"
                ))
            );
            tracing::info!("{summary}");
            eprintln!("{summary}");
            Ok(device.timings.clone())
        }
        Err(e) => Err(scenario::with_artifacts(vm, &device.reports(), &device.agent, e).await),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(seq: Option<u64>, ts: u64) -> Report {
        Report {
            device_id: "d".into(),
            timestamp_ms: ts,
            boot_marker: Some("b".into()),
            seq,
            ..Report::default()
        }
    }

    #[test]
    fn a_counting_agent_must_deliver_every_number_once_in_order() {
        let before = report(Some(10), 1_000);
        let all: Vec<Report> = (11..=20).map(|n| report(Some(n), n * 100)).collect();
        let d = judge_delivery(&before, &all, (1_100, 1_500), Duration::from_millis(100)).unwrap();
        assert_eq!((d.reports, d.backlog, d.lost), (10, 5, None));

        let mut gap = all.clone();
        gap.remove(3);
        let e = judge_delivery(&before, &gap, (0, 0), Duration::from_secs(1)).unwrap_err();
        assert!(e.contains("#14..#14 never arrived"), "{e}");

        let mut twice = all.clone();
        twice.insert(4, report(Some(14), 1_400));
        let e = judge_delivery(&before, &twice, (0, 0), Duration::from_secs(1)).unwrap_err();
        assert!(e.contains("repeated or out of order"), "{e}");
    }

    #[test]
    fn an_agent_without_a_counter_must_report_in_order_and_counts_its_loss() {
        let before = report(None, 1_000);
        let after = vec![
            report(None, 1_100),
            report(None, 5_000),
            report(None, 5_100),
        ];
        // A 4 s outage at 1 report/s: ~4 made, 2 of them stamped inside it arrived: 2 lost.
        let d = judge_delivery(&before, &after, (1_000, 5_000), Duration::from_secs(1)).unwrap();
        assert_eq!(d.lost, Some(2));
        let backwards = vec![report(None, 1_100), report(None, 1_050)];
        assert!(judge_delivery(&before, &backwards, (0, 0), Duration::from_secs(1)).is_err());
    }

    #[test]
    fn a_report_from_another_boot_fails_the_verdict() {
        let before = report(Some(1), 1);
        let mut other = report(Some(2), 2);
        other.boot_marker = Some("other".into());
        let e = judge_delivery(&before, &[other], (0, 0), Duration::from_secs(1)).unwrap_err();
        assert!(e.contains("rebooted"), "{e}");
    }
}
