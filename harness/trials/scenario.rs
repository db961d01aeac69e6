//! The trials the matrix runs, written as the story a user would tell: provision a device,
//! onboard the agent, see it report; then pull the plug and see it report from the new boot.
//! When a step fails, the VM's artifacts are saved and the error names where.

use crate::agent::description::{AgentDescription, Permissions, Report, ReportsOn, TemplateValues};
use crate::agent::onboard::{OnboardError, Onboarding};
use crate::agent::reference;
use crate::lab::Lab;
use crate::model::arch::VmArchitecture;
use crate::model::spec::{Start, VirtualMachineSpec};
use crate::nats::{NatsError, NatsServer, ReportLog, Verdict};
use crate::trials::control::{ControlPlane, Converged, Desire};
pub use crate::trials::error::ScenarioError;
use crate::vm::{PhaseTimings, Vm};
use devicelab_agent::now_ms;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A device with an agent onboarded and reporting.
pub struct OnboardedDevice {
    /// The device's VM.
    pub vm: Vm,
    /// The run's NATS server the agent reports to (shared by a fleet's devices).
    pub nats: Arc<NatsServer>,
    /// The agent, described.
    pub agent: AgentDescription,
    /// The id the device's reports carry: its VM's name.
    pub device_id: String,
    /// Where this device's reports land.
    pub reports_on: ReportsOn,
    /// The agent's first report from this boot, after onboarding.
    pub first_report: Report,
    /// How long each phase took, from the VM's start to the first report.
    pub timings: PhaseTimings,
    /// The harness as this device's control plane: its desired state, commands and
    /// convergence verdicts (the same verbs are the device's own: [`Self::desire`]).
    pub control_plane: ControlPlane,
}

impl OnboardedDevice {
    /// Whether the agent's unit is active (within the unit wait's budget).
    pub(crate) async fn agent_active(&self) -> bool {
        let service = &self.agent.service;
        self.vm
            .wait_for_unit(service.unit(), service.user())
            .await
            .is_ok()
    }

    /// This device's reports, decoded by its agent's description.
    pub fn reports(&self) -> ReportLog {
        self.nats
            .report_log(&self.reports_on, self.agent.reports.decode.clone())
            .for_device(&self.device_id)
    }
}

/// [`onboarded_device_with`] the reference agent.
pub async fn onboarded_device(
    lab: &Lab,
    arch: VmArchitecture,
    what: &str,
) -> Result<OnboardedDevice, ScenarioError> {
    onboarded_device_with(lab, arch, what, &reference::agent()).await
}

/// Provision → check the architecture → onboard `agent` (twice: the second run must change
/// nothing) → its first report arrives from this boot. The description is checked before
/// anything boots.
pub async fn onboarded_device_with(
    lab: &Lab,
    arch: VmArchitecture,
    what: &str,
    agent: &AgentDescription,
) -> Result<OnboardedDevice, ScenarioError> {
    onboarded_device_started(lab, arch, what, agent, None).await
}

/// [`onboarded_device_with`], started cold or warm (`None`: as DEVICELAB_START says).
pub async fn onboarded_device_started(
    lab: &Lab,
    arch: VmArchitecture,
    what: &str,
    agent: &AgentDescription,
    start: Option<Start>,
) -> Result<OnboardedDevice, ScenarioError> {
    agent.check(&[arch]).map_err(OnboardError::from)?;
    let nats = Arc::new(lab.nats_for(agent).await?);
    let values = device_values(&nats, agent, &lab.vm_name(what, arch), arch).await?;
    onboard_device(lab, nats, values, agent, start).await
}

/// The device `values` describe (its id, architecture and NATS identity, already given by
/// `nats`: a server other devices may share), onboarded with `agent`.
pub(crate) async fn onboard_device(
    lab: &Lab,
    nats: Arc<NatsServer>,
    values: TemplateValues,
    agent: &AgentDescription,
    start: Option<Start>,
) -> Result<OnboardedDevice, ScenarioError> {
    let (name, arch) = (values.device_id.clone(), values.arch);
    let reports_on = agent.reports_on(&values).map_err(OnboardError::from)?;
    let control_plane = ControlPlane::for_device(&nats, agent, &values).await?;
    // The agent is built while the VM boots.
    let (vm, onboarding) = tokio::join!(
        lab.vm(VirtualMachineSpec {
            start,
            ..VirtualMachineSpec::new(&name, arch)
        }),
        Onboarding::prepare(&lab.config, agent, values)
    );
    let (vm, onboarding) = (vm?, onboarding?);
    let timings = vm.timings.clone();
    let log = nats
        .report_log(&reports_on, agent.reports.decode.clone())
        .for_device(&name);
    match onboard_and_first_report(&vm, &log, &onboarding).await {
        Ok(first_report) => Ok(OnboardedDevice {
            vm,
            nats,
            agent: agent.clone(),
            device_id: name,
            reports_on,
            first_report,
            timings,
            control_plane,
        }),
        Err(e) => Err(with_artifacts(&vm, &log, agent, e).await),
    }
}

/// What `name`'s templates receive: its id, the server as the guest sees it, the device's own
/// NATS user (allowed only what `agent`'s description implies:
/// [`AgentDescription::permissions`]) and the architecture. The server enforces the user's
/// permissions before this returns; asked again for the same device, the same credentials.
pub async fn device_values(
    nats: &NatsServer,
    agent: &AgentDescription,
    name: &str,
    arch: VmArchitecture,
) -> Result<TemplateValues, ScenarioError> {
    device_values_for(nats, &[agent], name, arch).await
}

/// [`device_values`] for a device that runs any of `agents` (an agent and its next release):
/// its user may do what each of them may.
pub(crate) async fn device_values_for(
    nats: &NatsServer,
    agents: &[&AgentDescription],
    name: &str,
    arch: VmArchitecture,
) -> Result<TemplateValues, ScenarioError> {
    let (mut values, permissions) = identity_request(nats, agents, name, arch)?;
    let mut credentials = nats.identify(vec![(name.to_owned(), permissions)]).await?;
    values.nats_password = credentials.remove(0).password;
    Ok(values)
}

/// `name`'s template values without its password yet, and what its NATS user may do (what
/// any of `agents` needs): what [`NatsServer::identify`] takes, for one device or a fleet's
/// in one reload.
pub(crate) fn identity_request(
    nats: &NatsServer,
    agents: &[&AgentDescription],
    name: &str,
    arch: VmArchitecture,
) -> Result<(TemplateValues, Permissions), ScenarioError> {
    let values = TemplateValues {
        device_id: name.to_owned(),
        nats_url: nats.guest_url(),
        nats_user: name.to_owned(),
        nats_password: String::new(),
        arch,
    };
    let mut permissions = Permissions::default();
    for agent in agents {
        permissions = permissions.merge(agent.permissions(&values).map_err(OnboardError::from)?);
    }
    Ok((values, permissions))
}

/// Waits for the first report from boot `boot_id` after stream sequence `after` (an agent
/// without a boot marker: its first report after `after`).
pub async fn report_from_boot(
    log: &ReportLog,
    after: u64,
    boot_id: &str,
    budget: Duration,
) -> Result<Report, NatsError> {
    let (_, report) = log
        .wait_for(after, budget, |r| match &r.boot_marker {
            Some(marker) if marker != boot_id => Verdict::Skip,
            _ => Verdict::Accept,
        })
        .await?;
    Ok(report)
}

/// Waits for the first report after a power cut. What decides, in order:
/// 1. the stream position: only reports stored after `gate` count (everything the old boot
///    sent is before it: the gate is read once the stream is quiet after the cut, with the
///    guest off: [`crate::nats::MessageLog::gate`]);
/// 2. the boot marker: a report carrying the old boot's marker after the gate fails at once;
///    one carrying another marker is the new boot's, whatever its timestamp says;
/// 3. the time, only for an agent without a boot marker: stamped after `not_before_ms` by the
///    agent's clock.
///
/// The device's clock is never trusted where a marker exists: a board without an RTC comes
/// back with its clock thrown back (`Vm::set_clock`), and its first reports are stamped
/// before the gate (logged when that happens).
pub async fn report_after_cut(
    log: &ReportLog,
    gate: u64,
    old_boot: &str,
    not_before_ms: Option<u64>,
    budget: Duration,
) -> Result<Report, NatsError> {
    let (_, report) = log
        .wait_for(gate, budget, |r| match r.boot_marker.as_deref() {
            Some(marker) if marker == old_boot => Verdict::Reject(format!(
                "a report from the old boot {old_boot} arrived after the gate"
            )),
            Some(_) => Verdict::Accept,
            None if not_before_ms.is_none_or(|t| r.timestamp_ms > t) => Verdict::Accept,
            None => Verdict::Skip,
        })
        .await?;
    if let Some(t) = not_before_ms.filter(|t| report.timestamp_ms <= *t) {
        tracing::warn!(
            "the new boot's first report is stamped {} ms before the gate by the device's clock \
             (its clock is behind: accepted on its boot marker and stream position)",
            t - report.timestamp_ms
        );
    }
    Ok(report)
}

async fn onboard_and_first_report(
    vm: &Vm,
    log: &ReportLog,
    onboarding: &Onboarding,
) -> Result<Report, ScenarioError> {
    let arch = vm.arch();
    let machine = vm.succeed("uname -m").await?;
    if machine.trim() != arch.name() {
        return Err(ScenarioError::Check(format!(
            "VM {} reports `uname -m` = {}, expected {arch}",
            vm.name(),
            machine.trim()
        )));
    }
    // The seed the harness wrote must pass cloud-init's own schema check: an invalid key is
    // only a warning on the console, and the setting it carried silently does nothing.
    let schema = vm.exec("sudo -n cloud-init schema --system").await?;
    if !schema.success() {
        return Err(ScenarioError::Check(format!(
            "VM {}: cloud-init rejects the harness's cloud-config: {}{}",
            vm.name(),
            schema.stdout.trim(),
            schema.stderr.trim()
        )));
    }
    let started = Instant::now();
    let first = onboarding.apply(vm).await?;
    tracing::info!("onboarding {}: {first}", onboarding.description.name);
    if first.changed_steps().is_empty() {
        return Err(ScenarioError::Check(format!(
            "the first onboarding of a fresh VM changed nothing: {first}"
        )));
    }
    let second = onboarding.apply(vm).await?;
    if !second.changed_steps().is_empty() {
        return Err(ScenarioError::Check(format!(
            "onboarding is not idempotent; the second run changed: {second}"
        )));
    }
    vm.timings.record("onboard", started.elapsed());
    let boot_id = vm.boot_id().await?;
    let started = Instant::now();
    let first = report_from_boot(log, 0, &boot_id, vm.budgets().first_status).await?;
    vm.timings.record("first status", started.elapsed());
    Ok(first)
}

/// Saves `vm`'s failure artifacts, the agent's journal and the device's raw report history,
/// and wraps `error` so it names the directory and quotes the last console lines.
pub(crate) async fn with_artifacts(
    vm: &Vm,
    log: &ReportLog,
    agent: &AgentDescription,
    error: ScenarioError,
) -> ScenarioError {
    let dir = keep_artifacts(vm, log, agent).await;
    let console = vm
        .console_tail(10)
        .iter()
        .map(|l| format!("\n  | {l}"))
        .collect();
    ScenarioError::WithArtifacts {
        source: Box::new(error),
        dir,
        console,
    }
}

/// Saves `vm`'s failure artifacts, the agent's journal and the device's raw report history;
/// returns their directory.
pub(crate) async fn keep_artifacts(
    vm: &Vm,
    log: &ReportLog,
    agent: &AgentDescription,
) -> std::path::PathBuf {
    let journal = agent.service.journal_command(2000);
    let dir = vm
        .collect_artifacts(&[("agent-journal.txt", journal.as_str())])
        .await;
    let _ = log.dump_history(&dir.join("status-history.jsonl")).await;
    dir
}

/// The `e2e` trial.
pub async fn e2e(lab: &Lab, arch: VmArchitecture) -> Result<PhaseTimings, ScenarioError> {
    e2e_with(lab, arch, &reference::agent()).await
}

/// The `e2e` trial for any agent.
pub async fn e2e_with(
    lab: &Lab,
    arch: VmArchitecture,
    agent: &AgentDescription,
) -> Result<PhaseTimings, ScenarioError> {
    // The trials prove the device's real first boot: always cold.
    let device = onboarded_device_started(lab, arch, "e2e", agent, Some(Start::Cold)).await?;
    Ok(device.timings.clone())
}

/// The `power_cycle` trial: a device in service (provisioning and onboarding flushed, the
/// agent reporting) loses power; then a status whose boot id differs and whose timestamp is
/// after the gate must arrive, and SSH must come back (a separate verdict). A status from the
/// old boot after the gate fails the trial.
pub async fn power_cycle(lab: &Lab, arch: VmArchitecture) -> Result<PhaseTimings, ScenarioError> {
    power_cycle_with(lab, arch, &reference::agent()).await
}

/// The `power_cycle` trial for any agent.
pub async fn power_cycle_with(
    lab: &Lab,
    arch: VmArchitecture,
    agent: &AgentDescription,
) -> Result<PhaseTimings, ScenarioError> {
    let device = onboarded_device_started(lab, arch, "pc", agent, Some(Start::Cold)).await?;
    match pull_the_plug(&device).await {
        Ok(_) => Ok(device.timings.clone()),
        Err(e) => Err(with_artifacts(&device.vm, &device.reports(), &device.agent, e).await),
    }
}

/// What the power-cut verdict accepted: the new boot's first report, and the gate's time
/// (host clock, ms) beside which its timestamp can be read.
#[derive(Debug, Clone)]
pub struct AfterCut {
    /// The new boot's first report.
    pub report: Report,
    /// The host's clock when the gate was read, just after the plug was pulled, in
    /// milliseconds since the epoch.
    pub gate_ms: u64,
}

/// The `power_cycle` trial's second half on an onboarded device: pull the plug, power on, and
/// judge the agent (by [`report_after_cut`]) and the device's SSH apart; the agent's boot
/// marker must then be the device's new boot id.
pub async fn pull_the_plug(device: &OnboardedDevice) -> Result<AfterCut, ScenarioError> {
    let vm = &device.vm;
    let old_boot = vm.boot_id().await?;
    let started = Instant::now();
    vm.power_off().await?;
    recover_after_cut(device, &old_boot, started).await
}

/// After the plug was pulled (at `started`) on boot `old_boot`: the gate, power on, and the
/// agent and SSH judged apart; the agent's boot marker must then be the device's new boot id.
pub(crate) async fn recover_after_cut(
    device: &OnboardedDevice,
    old_boot: &str,
    started: Instant,
) -> Result<AfterCut, ScenarioError> {
    let vm = &device.vm;
    let log = device.reports();
    // The gate: the guest is gone; once what it sent last has landed, nothing of the old boot
    // can come (taken before power comes back).
    let gate_seq = log.gate().await?;
    let gate_ms = now_ms();
    vm.power_on().await?;
    device.control_plane.new_boot(gate_seq, now_ms());
    let agent = async {
        let status = report_after_cut(
            &log,
            gate_seq,
            old_boot,
            Some(gate_ms),
            vm.budgets().power_cycle_recovery,
        )
        .await;
        (status, started.elapsed())
    };
    let ssh = async { (vm.wait_for_ssh().await, started.elapsed()) };
    let ((status, agent_took), (ssh, ssh_took)) = tokio::join!(agent, ssh);
    let status = match (status, ssh) {
        (Ok(status), Ok(())) => status,
        (status, ssh) => {
            return Err(ScenarioError::Recovery {
                agent: status.map(|_| agent_took).map_err(|e| e.to_string()),
                ssh: ssh.map(|()| ssh_took).map_err(|e| e.to_string()),
            });
        }
    };
    let new_boot = vm.boot_id().await?;
    if let Some(marker) = &status.boot_marker
        && *marker != new_boot
    {
        return Err(ScenarioError::Check(format!(
            "the agent reported boot {marker} after the power cycle, but the device's boot is {new_boot}"
        )));
    }
    device.timings.record("power-cycle recovery", agent_took);
    device.timings.record("ssh after power cycle", ssh_took);
    tracing::info!("first report after the power cycle: {status:?}");
    Ok(AfterCut {
        report: status,
        gate_ms,
    })
}

/// The verbs of the device's [`ControlPlane`], on the device itself.
impl OnboardedDevice {
    /// [`ControlPlane::desire`].
    pub async fn desire(&self, generation: u64, document: &str) -> Result<Desire, ScenarioError> {
        self.control_plane.desire(generation, document).await
    }

    /// [`ControlPlane::command`].
    pub async fn command(
        &self,
        request: &[u8],
        budget: Duration,
    ) -> Result<Vec<u8>, ScenarioError> {
        self.control_plane.command(request, budget).await
    }

    /// [`ControlPlane::converged`].
    pub async fn converged(
        &self,
        generation: u64,
        budget: Duration,
    ) -> Result<Converged, ScenarioError> {
        self.control_plane.converged(generation, budget).await
    }

    /// [`ControlPlane::never_reported`].
    pub async fn never_reported(
        &self,
        what: &str,
        window: Duration,
        must_not: impl Fn(&Report) -> bool,
    ) -> Result<(), ScenarioError> {
        self.control_plane
            .never_reported(what, window, must_not)
            .await
    }
}
