//! The harness as the control plane of a device ([`ControlPlane`]): it puts the desired state
//! where the agent's description says ([`ControlPlane::desire`]), sends commands
//! ([`ControlPlane::command`]), and judges what the device reports back:
//! [`ControlPlane::converged`] and [`ControlPlane::never_reported`]. An [`OnboardedDevice`](crate::OnboardedDevice)
//! has the same verbs.

use crate::agent::description::{AgentDescription, ControlOn, Encoder, Report, TemplateValues};
use crate::agent::onboard::OnboardError;
use crate::nats::{NatsError, NatsServer, ReportLog, Verdict, js_err};
use crate::trials::error::ScenarioError;
use async_nats::jetstream;
use devicelab_agent::now_ms;
use std::sync::Mutex;
use std::time::Duration;

/// A desired state the harness put: its generation, the stream position just before it, and
/// when (host clock, ms since the epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desire {
    /// The generation put.
    pub generation: u64,
    /// The reports' stream sequence before the put: the verdicts read reports after it.
    pub after_seq: u64,
    /// When it was put, by the host's clock, in milliseconds since the epoch.
    pub at_ms: u64,
}

/// What [`ControlPlane::converged`] saw: the report that said the generation is applied,
/// and how long that took.
#[derive(Debug, Clone)]
pub struct Converged {
    /// The report that said so.
    pub report: Report,
    /// From the put (or from the last power-on, if later) until the server stored that
    /// report: both by the host's clock, never the device's.
    pub took: Duration,
}

/// The control plane of one device: where its desired state goes, its reports, what was
/// desired, and where its current boot's reports begin. An [`OnboardedDevice`](crate::OnboardedDevice) has one (its
/// verbs are this one's); [`ControlPlane::for_device`] makes one for any device that reaches
/// the run's NATS server.
pub struct ControlPlane {
    device_id: String,
    agent: AgentDescription,
    client: async_nats::Client,
    reports: ReportLog,
    control: Option<ControlOn>,
    desired: Mutex<Vec<Desire>>,
    /// Held through a put: a generation is checked against the last and put as one step.
    putting: tokio::sync::Mutex<()>,
    /// After a power cut: the gate (stream sequence) and when power came back (host ms).
    boot: Mutex<Option<(u64, u64)>>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("device_id", &self.device_id)
            .field("agent", &self.agent.name)
            .field("control", &self.control)
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// The control plane of the device `values` describe, running `agent`, on `nats`: makes
    /// sure its reports and its desired state are stored (the run's stream captures their
    /// subjects; a KV bucket is created) before it boots.
    pub async fn for_device(
        nats: &NatsServer,
        agent: &AgentDescription,
        values: &TemplateValues,
    ) -> Result<Self, ScenarioError> {
        let reports_on = agent.reports_on(values).map_err(OnboardError::from)?;
        nats.capture(&reports_on).await?;
        let control = agent.control_on(values).map_err(OnboardError::from)?;
        if let Some(control) = &control {
            nats.capture(&control.desired).await?;
        }
        Ok(Self {
            device_id: values.device_id.clone(),
            agent: agent.clone(),
            client: nats.client().clone(),
            reports: nats
                .report_log(&reports_on, agent.reports.decode.clone())
                .for_device(&values.device_id),
            control,
            desired: Mutex::default(),
            putting: tokio::sync::Mutex::default(),
            boot: Mutex::default(),
        })
    }

    /// Where the device's desired state goes and where it takes commands (`None`: its agent
    /// only reports).
    pub fn control(&self) -> Option<&ControlOn> {
        self.control.as_ref()
    }

    /// The device's reports, decoded by its agent's description.
    pub fn reports(&self) -> &ReportLog {
        &self.reports
    }

    /// A power cut's gate and the time of power-on: reports of the current boot are after it.
    pub(crate) fn new_boot(&self, gate_seq: u64, on_ms: u64) {
        *lock(&self.boot) = Some((gate_seq, on_ms));
    }

    /// Puts generation `generation` of the desired state, `document`, where the agent reads it
    /// (encoded by the description's [`Control`](crate::description::Control) part); returns
    /// once NATS stored it. Generations are the platform's numbers: each one larger than the
    /// last.
    pub async fn desire(&self, generation: u64, document: &str) -> Result<Desire, ScenarioError> {
        let (control, encode) = self.control_part()?;
        let _putting = self.putting.lock().await;
        let last = lock(&self.desired).iter().map(|d| d.generation).max();
        if let Some(last) = last.filter(|l| generation <= *l) {
            return Err(ScenarioError::Check(format!(
                "generation {generation} is not newer than generation {last}, desired before: \
                 give each desired state a larger generation"
            )));
        }
        let after_seq = self.reports.last_sequence().await?;
        let at_ms = now_ms();
        let doing = format!("putting the desired state to the {}", control.desired);
        jetstream::new(self.client.clone())
            .publish(
                control.desired.subject(),
                encode(generation, document).into(),
            )
            .await
            .map_err(|e| js_err(&doing)(e.to_string()))?
            .await
            .map_err(|e| js_err(&doing)(e.to_string()))?;
        let desire = Desire {
            generation,
            after_seq,
            at_ms,
        };
        lock(&self.desired).push(desire);
        tracing::info!(
            "desired generation {generation} of {} on the {}",
            self.device_id,
            control.desired
        );
        Ok(desire)
    }

    /// Sends `request` on the agent's command subject and returns its reply, or an error when
    /// none comes within `budget` (or nothing listens there).
    pub async fn command(
        &self,
        request: &[u8],
        budget: Duration,
    ) -> Result<Vec<u8>, ScenarioError> {
        let (control, _) = self.control_part()?;
        let Some(subject) = &control.commands else {
            return Err(ScenarioError::Check(format!(
                "the agent {} takes no commands: give its description's Control part a command \
                 subject (Control::with_commands)",
                self.agent.name
            )));
        };
        let failed = |reason: String| ScenarioError::Command {
            subject: subject.clone(),
            reason,
        };
        let ask = async_nats::Request::new()
            .payload(request.to_vec().into())
            .timeout(Some(budget));
        let reply = self
            .client
            .send_request(subject.clone(), ask)
            .await
            .map_err(|e| {
                failed(match e.kind() {
                    async_nats::RequestErrorKind::NoResponders => {
                        "nothing listens there (is the agent running and connected?)".into()
                    }
                    async_nats::RequestErrorKind::TimedOut => format!("no reply within {budget:?}"),
                    _ => e.to_string(),
                })
            })?;
        Ok(reply.payload.to_vec())
    }

    /// Waits until the device reports that it runs generation `generation` (desired on this
    /// control plane), judged on its own reports after the put and, when this device's plug
    /// was pulled by the harness since ([`OnboardedDevice::arm_cut`](crate::OnboardedDevice::arm_cut), the power-cycle trial),
    /// after that cut's gate: the new boot's. A report of a generation larger than any desired
    /// fails at once, as does `budget` running out (the last reports are quoted).
    pub async fn converged(
        &self,
        generation: u64,
        budget: Duration,
    ) -> Result<Converged, ScenarioError> {
        self.control_part()?;
        let desired = lock(&self.desired).clone();
        let Some(desire) = desired.iter().find(|d| d.generation == generation) else {
            return Err(ScenarioError::Check(format!(
                "generation {generation} was never desired on {}: call desire({generation}, …) first",
                self.device_id
            )));
        };
        let highest = desired
            .iter()
            .map(|d| d.generation)
            .max()
            .unwrap_or(generation);
        let (after, since_ms) = match *lock(&self.boot) {
            Some((gate, on_ms)) => (gate.max(desire.after_seq), on_ms.max(desire.at_ms)),
            None => (desire.after_seq, desire.at_ms),
        };
        let found = self
            .reports
            .wait_for_stored(after, budget, |r| match r.applied {
                Some(a) if a > highest => Verdict::Reject(format!(
                    "{} reports generation {a} applied, but the highest desired is {highest}",
                    self.device_id
                )),
                Some(a) if a >= generation => Verdict::Accept,
                _ => Verdict::Skip,
            })
            .await
            .map_err(|e| match e {
                NatsError::StatusTimeout { .. } => ScenarioError::Check(format!(
                    "{} did not report generation {generation} applied within {budget:?}: {e}",
                    self.device_id
                )),
                e => e.into(),
            })?;
        Ok(Converged {
            took: Duration::from_millis(found.stored_ms.saturating_sub(since_ms)),
            report: found.report,
        })
    }

    /// Watches the device's reports for `window`, from the call on (reports stored before it,
    /// such as a new boot's first after a cut, are judged by [`Fired`](crate::trials::Fired)'s
    /// report): one that `must_not` matches fails the verdict at once, quoted with `what` it
    /// would mean ("a torn state"). A window without a single report of the device fails
    /// too: a silent device proves nothing.
    pub async fn never_reported(
        &self,
        what: &str,
        window: Duration,
        must_not: impl Fn(&Report) -> bool,
    ) -> Result<(), ScenarioError> {
        let from = self.reports.last_sequence().await?;
        let mut seen = 0usize;
        let verdict = self
            .reports
            .wait_for(from, window, |r| {
                seen += 1;
                if must_not(r) {
                    Verdict::Reject(format!("{} reported {what}", self.device_id))
                } else {
                    Verdict::Skip
                }
            })
            .await;
        match verdict {
            Err(NatsError::StatusTimeout { .. }) if seen > 0 => Ok(()),
            Err(NatsError::StatusTimeout { .. }) => Err(ScenarioError::Check(format!(
                "{} sent no report in {window:?}: a silent device cannot show it never reported \
                 {what} (is its agent running?)",
                self.device_id
            ))),
            Err(e) => Err(e.into()),
            Ok(_) => unreachable!("the check never accepts"),
        }
    }

    fn control_part(&self) -> Result<(&ControlOn, &Encoder), ScenarioError> {
        match (&self.control, &self.agent.control) {
            (Some(on), Some(control)) => Ok((on, &control.encode)),
            _ => Err(ScenarioError::Check(format!(
                "the agent {} has no Control part: say in its description where its desired \
                 state goes (AgentDescription::control)",
                self.agent.name
            ))),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock()
        .expect("the control plane's locks are never poisoned")
}
