//! The agent's own update: the description of its next release (binary and config) onboarded
//! over the running one, with the plug pulled in the middle of the swap, just after one of the
//! onboarding's steps and with nothing flushed. The device must come back usable, running the
//! old version or the new one, never neither; a second onboarding of the new release must
//! then bring it to the new version without help.

use crate::agent::description::{AgentDescription, Report, TemplateValues};
use crate::agent::onboard::Onboarding;
use crate::lab::Lab;
use crate::model::arch::VmArchitecture;
use crate::nats::Verdict;
use crate::trials::scenario::{
    AfterCut, OnboardedDevice, ScenarioError, device_values_for, recover_after_cut,
};
use crate::trials::update::{converged_cell, pull_now, verdict_cell};
use std::time::{Duration, Instant};

/// One release of an agent: its description, and the version its reports carry
/// ([`Report::version`]).
#[derive(Debug, Clone, Copy)]
pub struct Release<'a> {
    /// The release, described (its binary, its config, its unit).
    pub agent: &'a AgentDescription,
    /// The version its reports carry.
    pub version: &'a str,
}

/// What one cut in the middle of an update of the agent did: the outcome of
/// [`cut_during_swap`].
#[derive(Debug, Clone)]
pub struct SwapCut {
    /// The step of the new release's onboarding after which the plug was pulled.
    pub after_step: String,
    /// The version the device ran before the update.
    pub from: String,
    /// The version of the release being installed.
    pub to: String,
    /// The device after power-on: the new boot's first report.
    pub after: AfterCut,
    /// The agent's unit was active once SSH was back.
    pub agent_active: bool,
    /// From the start of the second onboarding of the new release until the device reported
    /// the new version (host clock), or why it did not.
    pub converged: Result<Duration, String>,
}

impl SwapCut {
    /// The version the new boot's first report carries.
    pub fn version_after(&self) -> Option<&str> {
        self.after.report.version.as_deref()
    }

    /// What is wrong, if anything: a version that is neither release's, the agent not active,
    /// the second onboarding not bringing the new version.
    pub fn broke(&self) -> Option<String> {
        let mut wrong = Vec::new();
        match self.version_after() {
            Some(v) if v == self.from || v == self.to => {}
            other => wrong.push(format!(
                "came back running {}, neither {} nor {}",
                other.unwrap_or("an agent that reports no version"),
                self.from,
                self.to
            )),
        }
        if !self.agent_active {
            wrong.push("the agent's unit is not active".into());
        }
        if let Err(e) = &self.converged {
            wrong.push(format!("did not come to {}: {e}", self.to));
        }
        (!wrong.is_empty()).then(|| wrong.join("; "))
    }
}

/// One cut in the middle of an update of the agent, on an onboarded device:
/// 1. `from` is onboarded (nothing changes if it runs already) and flushed, and the device
///    must report its version;
/// 2. `to` is onboarded up to and including `after_step` (one of its steps, e.g. `binary`:
///    the new binary in place, the old config and the old process still there), and the plug
///    is pulled at once, nothing flushed;
/// 3. after power-on the device must report `from`'s version or `to`'s (the verdict of any
///    cut, by boot marker and stream position, comes first), and its unit must be active;
/// 4. `to` is onboarded again, whole, and the device must report `to`'s version.
///
/// Both releases report where the device's agent does, decoded by its description, and need
/// the same NATS server configuration. Errors before the cut are errors. After it, a device
/// with no agent reporting (neither version running) fails the recovery verdict of any cut
/// ([`ScenarioError::Recovery`]); what else the cut breaks is the outcome
/// ([`SwapCut::broke`]).
pub async fn cut_during_swap(
    lab: &Lab,
    device: &OnboardedDevice,
    from: Release<'_>,
    to: Release<'_>,
    after_step: &str,
) -> Result<SwapCut, ScenarioError> {
    let vm = &device.vm;
    if from.version == to.version {
        return Err(ScenarioError::Check(format!(
            "both releases report version {}: an update is judged by the version the device \
             reports, so give the new release another one",
            to.version
        )));
    }
    for release in [from, to] {
        if release.agent.reports.on != device.agent.reports.on {
            return Err(ScenarioError::Check(format!(
                "{} reports on the {}, the device's agent {} on the {}: an update of the agent \
                 is judged on the device's reports, so both releases must report where it does",
                release.agent.name,
                release.agent.reports.on,
                device.agent.name,
                device.agent.reports.on
            )));
        }
        if release.agent.nats_config != device.agent.nats_config {
            return Err(ScenarioError::Check(format!(
                "{} needs another NATS server configuration than the device's agent {}: an \
                 update of the agent keeps the run's server; give both the same nats_config",
                release.agent.name, device.agent.name
            )));
        }
    }
    let values = TemplateValues {
        // The server as the device's own host offers it (a fleet's devices span hosts).
        nats_url: device.nats.guest_url_on(vm.host_uri()),
        ..device_values_for(
            &device.nats,
            &[from.agent, to.agent],
            &device.device_id,
            vm.arch(),
        )
        .await?
    };
    let (old, new) = tokio::join!(
        Onboarding::prepare(&lab.config, from.agent, values.clone()),
        Onboarding::prepare(&lab.config, to.agent, values)
    );
    let (old, new) = (old?, new?);

    let before = device.reports().last_sequence().await?;
    old.apply(vm).await?;
    runs_version(device, before, from.version, vm.budgets().first_status).await?;

    let old_boot = vm.boot_id().await?;
    new.apply_until(vm, after_step).await?;
    let started = Instant::now();
    pull_now(device).await?;
    tracing::info!(
        "power cut after the step {after_step} of {}'s onboarding over {}",
        to.agent.name,
        from.agent.name
    );
    let after = recover_after_cut(device, &old_boot, started).await?;
    let agent_active = device.agent_active().await;

    let started = Instant::now();
    let converged = async {
        let before = device.reports().last_sequence().await?;
        new.apply(vm).await?;
        runs_version(device, before, to.version, vm.budgets().first_status).await?;
        Ok::<_, ScenarioError>(started.elapsed())
    }
    .await
    .map_err(|e| e.to_string());
    Ok(SwapCut {
        after_step: after_step.to_owned(),
        from: from.version.to_owned(),
        to: to.version.to_owned(),
        after,
        agent_active,
        converged,
    })
}

/// Waits for a report of `version` after stream sequence `after`.
async fn runs_version(
    device: &OnboardedDevice,
    after: u64,
    version: &str,
    budget: Duration,
) -> Result<Report, ScenarioError> {
    let (_, report) = device
        .reports()
        .wait_for(after, budget, |r| {
            if r.version.as_deref() == Some(version) {
                Verdict::Accept
            } else {
                Verdict::Skip
            }
        })
        .await
        .map_err(|e| {
            ScenarioError::Check(format!(
                "{} never reported version {version} (does the agent's decoder fill \
                 `Report::version`? Is DEVICELAB_AGENT_BIN_<ARCH> set, shipping one binary \
                 for both releases?): {e}",
                device.device_id
            ))
        })?;
    Ok(report)
}

/// The cuts as a Markdown table: the step the plug was pulled after, the version reported
/// after power-on, time to the new version after a second onboarding, and the verdict.
pub fn table(arch: VmArchitecture, cuts: &[SwapCut]) -> String {
    let mut out = format!(
        "| {arch}: cut after the step | running after power-on | second onboarding → new version | consistent and usable |\n\
         | --- | --- | --- | --- |\n"
    );
    for c in cuts {
        out.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            c.after_step,
            c.version_after().unwrap_or("none"),
            converged_cell(&c.converged),
            verdict_cell(c.broke()),
        ));
    }
    out
}
