//! Power cut at the moment that matters: a cut armed on a trigger ([`CutWhen`]: a report the
//! device sends) fires as soon as the harness sees it, then the device is
//! powered on and judged. The `update` trial and the cut-during-apply sweep: desire a new
//! generation, cut while the device applies it, and the device must come back usable,
//! reporting the old generation or the new (never a torn state, never nothing), and converge
//! to the new one without help.

use crate::agent::description::Report;
use crate::lab::Lab;
use crate::model::arch::VmArchitecture;
use crate::trials::scenario::{
    AfterCut, OnboardedDevice, ScenarioError, onboarded_device_started, recover_after_cut,
    with_artifacts,
};
use crate::vm::PhaseTimings;
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What fires an armed cut.
#[derive(Clone)]
pub enum Trigger {
    /// The device sends a report this matches (e.g. `applying == Some(7)`): seen on the wire,
    /// as NATS delivers it, not once stored.
    Reported(Arc<dyn Fn(&Report) -> bool + Send + Sync>),
    /// The device's serial console prints a line with this text, after the cut was armed
    /// (read every [`CONSOLE_POLL`]).
    Console(String),
    /// A desired state for the device is put (seen on the wire, as the agent's server sees
    /// it): with an offset, a cut a fixed time into whatever the agent does with it.
    Desired,
}

/// How often a [`Trigger::Console`] reads the console (from where it stopped): a line is seen
/// up to this long (and the time of one read) after it is printed; [`Fired::delay`] counts
/// from when it is seen.
pub const CONSOLE_POLL: Duration = Duration::from_millis(20);

impl std::fmt::Debug for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Reported(_) => f.write_str("a matching report"),
            Self::Console(text) => write!(f, "the console printing {text:?}"),
            Self::Desired => f.write_str("a desired state put"),
        }
    }
}

/// When an armed cut fires: a trigger, then an offset after it.
#[derive(Debug, Clone)]
pub struct CutWhen {
    /// What fires it.
    pub trigger: Trigger,
    /// How long after the trigger the plug is pulled.
    pub offset: Duration,
    /// The trigger in a few words, for tables and logs (`applying 2`, `desired`).
    pub name: String,
}

impl CutWhen {
    /// The plug is pulled when the device reports something `matches`.
    pub fn reported(matches: impl Fn(&Report) -> bool + Send + Sync + 'static) -> Self {
        Self {
            trigger: Trigger::Reported(Arc::new(matches)),
            offset: Duration::ZERO,
            name: "a matching report".into(),
        }
    }

    /// The plug is pulled when the device's console prints a line with `text`.
    pub fn console(text: impl Into<String>) -> Self {
        let text = text.into();
        Self {
            name: format!("console {text:?}"),
            trigger: Trigger::Console(text),
            offset: Duration::ZERO,
        }
    }

    /// The plug is pulled when a desired state is put for the device (then, with
    /// [`Self::after`], at an offset into its apply).
    pub fn desired() -> Self {
        Self {
            trigger: Trigger::Desired,
            offset: Duration::ZERO,
            name: "desired".into(),
        }
    }

    /// The same trigger, the plug pulled `offset` after it.
    pub fn after(self, offset: Duration) -> Self {
        Self { offset, ..self }
    }

    /// The same trigger, named `name` in tables and logs.
    pub fn named(self, name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..self
        }
    }
}

/// A cut armed on a device: [`ArmedCut::fire`] waits for its trigger.
pub struct ArmedCut<'a> {
    device: &'a OnboardedDevice,
    when: CutWhen,
    old_boot: String,
    /// What the trigger watches.
    watch: Watch,
}

/// A trigger's watch, with what it needs to see the trigger.
enum Watch {
    /// The device's reports on the wire, and the predicate that fires.
    Reports(
        async_nats::Subscriber,
        Arc<dyn Fn(&Report) -> bool + Send + Sync>,
    ),
    /// Where its desired state goes, on the wire.
    Desired(async_nats::Subscriber),
    /// Its console, from this offset on, for this text.
    Console(u64, String),
}

/// What a fired cut did: what triggered it, how close the cut followed, and the device after
/// power-on.
#[derive(Debug, Clone)]
pub struct Fired {
    /// The trigger's name ([`CutWhen::name`]).
    pub on: String,
    /// The trigger, as it was seen (the report, the put, the console line).
    pub trigger: String,
    /// The offset asked for.
    pub offset: Duration,
    /// From the trigger seen (plus the offset) until the guest was stopped (its vCPUs paused,
    /// then the domain destroyed): how closely the cut followed on this host.
    pub delay: Duration,
    /// The device after power-on: the new boot's first report.
    pub after: AfterCut,
}

impl Fired {
    /// Whether the plug was pulled, by the host's clock, less than `window` after the trigger
    /// was seen (the offset included): inside what the trigger announces, when that starts as
    /// the trigger is seen and lasts at least `window` (the reference agent starts its apply
    /// once its `applying` report is acknowledged, and the apply takes at least
    /// `reference::APPLY_MS`). A later cut may have found it over, so it proves nothing about a
    /// cut inside: what a busy host that pulls the plug late gets.
    pub fn within(&self, window: Duration) -> bool {
        self.offset + self.delay < window
    }
}

impl OnboardedDevice {
    /// Arms a power cut on `when`: arm it before what triggers it (a report in answer to a
    /// [`desire`](Self::desire) cannot be missed then).
    pub async fn arm_cut(&self, when: CutWhen) -> Result<ArmedCut<'_>, ScenarioError> {
        let old_boot = self.vm.boot_id().await?;
        let subscribe = |subject: String| async move {
            self.nats
                .client()
                .subscribe(subject.clone())
                .await
                .map_err(|e| crate::nats::NatsError::JetStream {
                    doing: format!("subscribing to {subject}"),
                    message: e.to_string(),
                })
        };
        let watch = match &when.trigger {
            Trigger::Reported(matches) => {
                Watch::Reports(subscribe(self.reports_on.subject()).await?, matches.clone())
            }
            Trigger::Desired => match self.control_plane.control() {
                Some(control) => Watch::Desired(subscribe(control.desired.subject()).await?),
                None => {
                    return Err(ScenarioError::Check(format!(
                        "a cut armed on a desired state needs an agent with a Control part; {} \
                         has none (AgentDescription::control)",
                        self.agent.name
                    )));
                }
            },
            Trigger::Console(text) => {
                Watch::Console(crate::vm::console::len(self.vm.serial_log()), text.clone())
            }
        };
        Ok(ArmedCut {
            device: self,
            when,
            old_boot,
            watch,
        })
    }
}

impl ArmedCut<'_> {
    /// Waits (at most `budget`) for the trigger, pulls the plug `offset` after it, powers the
    /// device on and waits for its new boot's first report and SSH (two verdicts, as after any
    /// cut).
    pub async fn fire(mut self, budget: Duration) -> Result<Fired, ScenarioError> {
        let device = self.device;
        let (trigger, seen) = tokio::time::timeout(budget, self.trigger())
            .await
            .map_err(|_| {
                let hint = match &self.when.trigger {
                    Trigger::Reported(_) => {
                        "does the agent's decoder fill what the trigger reads, such as \
                         `Report::applying`?"
                    }
                    Trigger::Console(_) => "is the text printed on the serial console?",
                    Trigger::Desired => "was a desired state put after the cut was armed?",
                };
                ScenarioError::Check(format!(
                    "the cut armed on {:?} of {} never fired: not seen within {budget:?} ({hint})",
                    self.when.trigger, device.device_id
                ))
            })??;
        tokio::time::sleep_until((seen + self.when.offset).into()).await;
        let started = Instant::now();
        let stopped = pull_now(device).await?;
        let delay = stopped
            .saturating_duration_since(seen)
            .saturating_sub(self.when.offset);
        tracing::info!(
            "power cut on {trigger} (+{:?} asked): {:.0} ms from trigger to cut",
            self.when.offset,
            delay.as_secs_f64() * 1e3
        );
        let after = recover_after_cut(device, &self.old_boot, started).await?;
        Ok(Fired {
            on: self.when.name.clone(),
            trigger,
            offset: self.when.offset,
            delay,
            after,
        })
    }

    /// The trigger, as seen, and when.
    async fn trigger(&mut self) -> Result<(String, Instant), ScenarioError> {
        let device = self.device;
        match &mut self.watch {
            Watch::Reports(wire, matches) => {
                let decode = &device.agent.reports.decode;
                while let Some(msg) = wire.next().await {
                    if let Ok(report) = crate::nats::status::decode_message(&**decode, &msg)
                        && report.device_id == device.device_id
                        && matches(&report)
                    {
                        return Ok((format!("{report:?}"), Instant::now()));
                    }
                }
            }
            Watch::Desired(wire) => {
                if let Some(msg) = wire.next().await {
                    return Ok((
                        format!("a desired state put on {}", msg.subject),
                        Instant::now(),
                    ));
                }
            }
            Watch::Console(offset, text) => {
                let log = device.vm.serial_log().to_owned();
                let (mut read, mut watch) = (*offset, crate::vm::console::LineWatch::default());
                loop {
                    let (log, from) = (log.clone(), read);
                    let bytes = tokio::task::spawn_blocking(move || {
                        crate::vm::console::bytes_after(&log, from)
                    })
                    .await
                    .map_err(|e| ScenarioError::Check(format!("reading the console: {e}")))?;
                    read += bytes.len() as u64;
                    if let Some(line) = watch.feed(&bytes, text.as_str()) {
                        return Ok((format!("the console line {line:?}"), Instant::now()));
                    }
                    tokio::time::sleep(CONSOLE_POLL).await;
                }
            }
        }
        Err(ScenarioError::Check(format!(
            "the subscription for {:?} ended before the trigger",
            self.when.trigger
        )))
    }
}

/// Pulls the plug on `device` now; returns when the guest stopped. The guest stops when its
/// vCPUs are paused (milliseconds); libvirt's destroy then takes QEMU down, which takes
/// seconds under TCG. What the guest had not written to its disk by the pause is lost either
/// way.
pub(crate) async fn pull_now(device: &OnboardedDevice) -> Result<Instant, ScenarioError> {
    device.vm.freeze().await?;
    let stopped = Instant::now();
    device.vm.power_off().await?;
    Ok(stopped)
}

/// What one cut inside an apply did: the outcome of [`cut_during_apply`].
#[derive(Debug, Clone)]
pub struct ApplyCut {
    /// The generation the device ran before (flushed to disk before the cut).
    pub from: u64,
    /// The generation it was applying.
    pub to: u64,
    /// The cut, as fired: offset, delay from trigger to cut, the new boot's first report.
    pub fired: Fired,
    /// What the agent's state file held after power-on, as the agent's own reader reads it,
    /// or `missing`, or `unreadable (why)` (`None`: no reader for this agent).
    pub on_disk: Option<String>,
    /// The agent's unit was active once SSH was back.
    pub agent_active: bool,
    /// Power-on until the device reported `to` applied (host clock), or why it did not.
    pub converged: Result<Duration, String>,
}

impl ApplyCut {
    /// The generation the new boot's first report says is applied.
    pub fn applied_after(&self) -> Option<u64> {
        self.fired.after.report.applied
    }

    /// What is wrong, if anything: a state that is neither generation (torn, or nothing), the
    /// agent not active, no convergence.
    pub fn broke(&self) -> Option<String> {
        let mut wrong = Vec::new();
        match self.applied_after() {
            Some(g) if g == self.from || g == self.to => {}
            Some(g) => wrong.push(format!(
                "came back reporting generation {g}, neither {} nor {}",
                self.from, self.to
            )),
            None => wrong.push(format!(
                "came back reporting no applied generation (torn, or nothing), neither {} nor {}",
                self.from, self.to
            )),
        }
        if !self.agent_active {
            wrong.push("the agent's unit is not active".into());
        }
        if let Err(e) = &self.converged {
            wrong.push(format!("did not converge to {}: {e}", self.to));
        }
        (!wrong.is_empty()).then(|| wrong.join("; "))
    }
}

/// How an agent's state file is read after power-on, for the sweep's "on disk" column: its
/// path on the device, and the agent's own reader of its bytes.
#[derive(Clone, Copy)]
pub struct StateFile {
    /// The file's path on the device.
    pub path: &'static str,
    /// Reads its bytes (the file exists) into a word for the table.
    pub read: fn(&[u8]) -> String,
}

/// One cut inside an apply, on an onboarded device running generation `from`: arm `when`,
/// desire `to`, let the cut fire, power on, and judge. Errors before the cut are errors; what
/// the cut breaks is the outcome ([`ApplyCut::broke`]).
pub async fn cut_during_apply(
    device: &OnboardedDevice,
    from: u64,
    to: u64,
    when: CutWhen,
    state: Option<StateFile>,
) -> Result<ApplyCut, ScenarioError> {
    let vm = &device.vm;
    let budgets = vm.budgets();
    let armed = device.arm_cut(when).await?;
    device.desire(to, &format!("generation {to}")).await?;
    let fired = armed.fire(budgets.power_cycle_recovery).await?;
    let on_disk = match state {
        Some(state) => {
            let path = crate::ssh::session::shell_quote(state.path);
            let out = vm
                .exec(&format!(
                    "if sudo -n test -e {path}; then sudo -n od -An -v -tx1 {path} | tr -d ' \\n'; \
                     else echo missing; fi"
                ))
                .await?;
            let text = out.stdout.trim();
            Some(if !out.success() {
                format!("unreadable ({})", out.stderr.trim())
            } else if text == "missing" {
                "missing".to_owned()
            } else {
                match hex::decode(text) {
                    Ok(bytes) => (state.read)(&bytes),
                    Err(e) => format!("unreadable ({e})"),
                }
            })
        }
        None => None,
    };
    let agent_active = device.agent_active().await;
    let converged = device
        .converged(to, budgets.power_cycle_recovery)
        .await
        .map(|c| c.took)
        .map_err(|e| e.to_string());
    Ok(ApplyCut {
        from,
        to,
        fired,
        on_disk,
        agent_active,
        converged,
    })
}

/// The trigger the `update` trial cuts on: the device's own report that it is applying `to`.
pub fn applying(to: u64) -> CutWhen {
    CutWhen::reported(move |r| r.applying == Some(to)).named(format!("applying {to}"))
}

/// The `update` trial for any agent with a control part: onboard, converge to generation 1
/// (flushed), then desire 2 and pull the plug on the device's own "applying 2" report. It
/// must come back usable, reporting 1 or 2 (never torn, never nothing), and converge to 2.
/// The documents are the text `generation N`: an agent whose desired state must be a valid
/// configuration makes one in its encoder, which is given the generation.
pub async fn update_with(
    lab: &Lab,
    arch: VmArchitecture,
    agent: &crate::agent::description::AgentDescription,
) -> Result<PhaseTimings, ScenarioError> {
    let device = onboarded_device_started(lab, arch, "update", agent, None).await?;
    let outcome = async {
        let cut = converge_then_cut(&device, applying(2), None).await?;
        match cut.broke() {
            None => Ok(cut),
            Some(wrong) => Err(ScenarioError::Check(format!(
                "power cut while applying generation 2 ({:.0} ms after {}): the device {wrong}",
                cut.fired.delay.as_secs_f64() * 1e3,
                cut.fired.trigger
            ))),
        }
    }
    .await;
    match outcome {
        Ok(cut) => {
            device.timings.record("trigger to cut", cut.fired.delay);
            if let Ok(took) = cut.converged {
                device.timings.record("converged after the cut", took);
            }
            Ok(device.timings.clone())
        }
        Err(e) => Err(with_artifacts(&device.vm, &device.reports(), &device.agent, e).await),
    }
}

/// On a fresh onboarded device: converge to generation 1 and flush it, then one cut while
/// applying 2, on `when` ([`applying`]`(2)`, with an offset or not).
pub async fn converge_then_cut(
    device: &OnboardedDevice,
    when: CutWhen,
    state: Option<StateFile>,
) -> Result<ApplyCut, ScenarioError> {
    converge_durably(device, 1).await?;
    cut_during_apply(device, 1, 2, when, state).await
}

/// Desires `generation` (the document `generation N`), waits for the device to report it
/// applied, and flushes its disk: a cut after this is about what comes next.
pub async fn converge_durably(
    device: &OnboardedDevice,
    generation: u64,
) -> Result<(), ScenarioError> {
    let started = Instant::now();
    device
        .desire(generation, &format!("generation {generation}"))
        .await?;
    device
        .converged(generation, device.vm.budgets().first_status)
        .await?;
    device.vm.flush().await?;
    device
        .timings
        .record(&format!("converged to {generation}"), started.elapsed());
    Ok(())
}

/// The cut-during-apply sweep: for each offset after the device's "applying 2" report, a
/// fresh device (warm starts make this cheap) converged to 1, then cut while applying 2.
pub async fn sweep(
    lab: &Lab,
    arch: VmArchitecture,
    agent: &crate::agent::description::AgentDescription,
    offsets: &[Duration],
    state: Option<StateFile>,
) -> Result<Vec<ApplyCut>, ScenarioError> {
    let mut outcomes = Vec::new();
    for offset in offsets {
        let device = onboarded_device_started(lab, arch, "apply-cut", agent, None).await?;
        let cut = match converge_then_cut(&device, applying(2).after(*offset), state).await {
            Ok(cut) => cut,
            Err(e) => {
                return Err(with_artifacts(&device.vm, &device.reports(), &device.agent, e).await);
            }
        };
        tracing::info!(
            "cut-during-apply sweep, {arch}, {} +{offset:?}: {}",
            agent.name,
            cut.broke().unwrap_or_else(|| "consistent".into())
        );
        outcomes.push(cut);
    }
    Ok(outcomes)
}

/// The sweep as a Markdown table: cut point, the trigger-to-cut delay, what was on disk,
/// the generation reported after power-on, time to converge, and whether the device was
/// consistent and usable.
pub fn table(arch: VmArchitecture, agent: &str, cuts: &[ApplyCut]) -> String {
    let mut out = format!(
        "| {arch}, {agent}: cut at | trigger → cut | on disk after power-on | applied after power-on | converged to the new generation after power-on | consistent and usable |\n\
         | --- | --- | --- | --- | --- | --- |\n"
    );
    for c in cuts {
        out.push_str(&format!(
            "| {} + {} ms | {:.0} ms | {} | {} | {} | {} |\n",
            c.fired.on,
            c.fired.offset.as_millis(),
            c.fired.delay.as_secs_f64() * 1e3,
            c.on_disk.as_deref().unwrap_or("?"),
            c.applied_after()
                .map_or("none (torn)".to_owned(), |g| g.to_string()),
            converged_cell(&c.converged),
            verdict_cell(c.broke()),
        ));
    }
    out
}

/// A table cell for a time to converge, or `no`.
pub(crate) fn converged_cell(converged: &Result<Duration, String>) -> String {
    match converged {
        Ok(d) => format!("{:.1} s", d.as_secs_f64()),
        Err(_) => "no".into(),
    }
}

/// A table cell for a verdict: **yes**, or **no** and what is wrong.
pub(crate) fn verdict_cell(broke: Option<String>) -> String {
    match broke {
        None => "**yes**".to_owned(),
        Some(wrong) => format!("**no**: {}", wrong.replace('|', "/")),
    }
}

/// The median trigger-to-cut delay of `cuts`.
pub fn median_delay(cuts: &[ApplyCut]) -> Option<Duration> {
    median(cuts.iter().map(|c| c.fired.delay).collect())
}

/// The median time from power-on to the new generation's "applied" report, over the cuts
/// that converged.
pub fn median_converged(cuts: &[ApplyCut]) -> Option<Duration> {
    median(
        cuts.iter()
            .filter_map(|c| c.converged.clone().ok())
            .collect(),
    )
}

fn median(mut values: Vec<Duration>) -> Option<Duration> {
    values.sort();
    values.get(values.len() / 2).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fired(offset_ms: u64, delay_ms: u64) -> Fired {
        Fired {
            on: "applying 2".into(),
            trigger: "a report".into(),
            offset: Duration::from_millis(offset_ms),
            delay: Duration::from_millis(delay_ms),
            after: AfterCut {
                report: Default::default(),
                gate_ms: 0,
            },
        }
    }

    #[test]
    fn a_cut_counts_as_inside_only_before_the_window_ends() {
        let apply = Duration::from_secs(4);
        assert!(fired(2_000, 40).within(apply));
        assert!(fired(0, 3_999).within(apply));
        // The late cut of a busy host: 2 s asked, 5 s more to pull the plug.
        assert!(!fired(2_000, 5_010).within(apply));
        assert!(!fired(2_000, 2_000).within(apply));
    }
}
