//! The trials the matrix runs, written as the story a user would tell: provision a device,
//! onboard the agent, see it report; then pull the plug and see it report from the new boot.
//! When a step fails, the VM's artifacts are saved and the error names where.

use crate::agent::{AgentBinary, AgentBinaryError};
use crate::arch::VmArchitecture;
use crate::lab::{Lab, LabNatsError};
use crate::nats::{NatsError, NatsServer, Verdict};
use crate::onboard::{AGENT_UNIT, AGENT_USER, OnboardError, Onboarding};
use crate::spec::VirtualMachineSpec;
use crate::vm::{PhaseTimings, Vm, VmError};
use devicelab_agent::{AgentConfig, DEFAULT_SUBJECT_PREFIX, Status, now_ms};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Nats(#[from] LabNatsError),
    #[error(transparent)]
    Status(#[from] NatsError),
    #[error(transparent)]
    Onboard(#[from] OnboardError),
    #[error(transparent)]
    Agent(#[from] AgentBinaryError),
    #[error("{0}")]
    Check(String),
    #[error(
        "{source}\n  failure artifacts: {dir} (serial log, domain XML, cloud-init logs, journal, \
         agent journal, status history)\n  last console lines:{console}"
    )]
    WithArtifacts {
        source: Box<ScenarioError>,
        dir: PathBuf,
        console: String,
    },
}

/// A device with the agent onboarded and reporting.
pub struct OnboardedDevice {
    pub vm: Vm,
    pub nats: NatsServer,
    pub agent: AgentConfig,
    pub first_status: Status,
    pub timings: PhaseTimings,
}

/// Provision → check the architecture → onboard (twice: the second run must change nothing)
/// → the agent's first status arrives from this boot.
pub async fn onboarded_device(
    lab: &Lab,
    arch: VmArchitecture,
    what: &str,
) -> Result<OnboardedDevice, ScenarioError> {
    let nats = lab.nats().await?;
    let name = lab.vm_name(what, arch);
    let (vm, binary) = tokio::join!(
        lab.vm(VirtualMachineSpec::new(&name, arch)),
        lab.agent_binary(arch)
    );
    let (vm, binary) = (vm?, binary?);
    let agent = AgentConfig {
        device_id: name,
        nats_url: nats.guest_url(),
        interval_ms: 2_000,
        subject_prefix: DEFAULT_SUBJECT_PREFIX.into(),
        nats_user: nats.credentials().map(|c| c.user.clone()),
        nats_password: nats.credentials().map(|c| c.password.clone()),
    };
    let timings = vm.timings.clone();
    match onboard_and_first_status(&vm, &nats, &agent, binary).await {
        Ok(first_status) => Ok(OnboardedDevice {
            vm,
            nats,
            agent,
            first_status,
            timings,
        }),
        Err(e) => Err(with_artifacts(&vm, &nats, &agent.device_id, e).await),
    }
}

async fn onboard_and_first_status(
    vm: &Vm,
    nats: &NatsServer,
    agent: &AgentConfig,
    binary: AgentBinary,
) -> Result<Status, ScenarioError> {
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
    let onboarding = Onboarding {
        binary,
        config: agent.clone(),
    };
    let started = Instant::now();
    let first = onboarding.apply(vm).await?;
    tracing::info!("onboarding: {first}");
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
    vm.wait_for_unit(AGENT_UNIT, Some(AGENT_USER)).await?;
    let boot_id = vm.boot_id().await?;
    let started = Instant::now();
    let (_, first_status) = nats
        .status_log(&agent.device_id)
        .wait_for(0, vm.budgets().first_status, |s| {
            if s.boot_id == boot_id {
                Verdict::Accept
            } else {
                Verdict::Skip
            }
        })
        .await?;
    vm.timings.record("first status", started.elapsed());
    Ok(first_status)
}

/// Saves `vm`'s failure artifacts and the device's status history, and wraps `error` so it
/// names the directory and quotes the last console lines.
async fn with_artifacts(
    vm: &Vm,
    nats: &NatsServer,
    device_id: &str,
    error: ScenarioError,
) -> ScenarioError {
    let agent_journal =
        format!("sudo -n journalctl --no-pager -o short-precise _SYSTEMD_USER_UNIT={AGENT_UNIT}");
    let dir = vm
        .collect_artifacts(&[("agent-journal.txt", agent_journal.as_str())])
        .await;
    let _ = nats
        .status_log(device_id)
        .dump_history(&dir.join("status-history.jsonl"))
        .await;
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

/// The `e2e` trial.
pub async fn e2e(lab: &Lab, arch: VmArchitecture) -> Result<PhaseTimings, ScenarioError> {
    let device = onboarded_device(lab, arch, "e2e").await?;
    Ok(device.timings.clone())
}

/// The `power_cycle` trial: a hard power cycle, then a status whose boot id differs and whose
/// timestamp is after the gate. A status from the old boot after the gate fails the trial.
pub async fn power_cycle(lab: &Lab, arch: VmArchitecture) -> Result<PhaseTimings, ScenarioError> {
    let device = onboarded_device(lab, arch, "pc").await?;
    match pull_the_plug(&device).await {
        Ok(()) => Ok(device.timings.clone()),
        Err(e) => Err(with_artifacts(&device.vm, &device.nats, &device.agent.device_id, e).await),
    }
}

async fn pull_the_plug(device: &OnboardedDevice) -> Result<(), ScenarioError> {
    let vm = &device.vm;
    let old_boot = vm.boot_id().await?;
    let log = device.nats.status_log(&device.agent.device_id);
    let started = Instant::now();
    vm.power_off().await?;
    // The gate: the guest is gone, so everything the old boot sent is in the stream by now.
    let gate_seq = log.last_sequence().await?;
    let gate_ms = now_ms();
    vm.power_on_and_wait().await?;
    let new_boot = vm.boot_id().await?;
    if new_boot == old_boot {
        return Err(ScenarioError::Check(format!(
            "boot id unchanged after a power cycle: {new_boot}"
        )));
    }
    let (_, status) = log
        .wait_for(gate_seq, vm.budgets().power_cycle_recovery, |s| {
            if s.boot_id == old_boot {
                Verdict::Reject(format!(
                    "a status from the old boot {old_boot} arrived after the gate"
                ))
            } else if s.boot_id == new_boot && s.timestamp_ms > gate_ms {
                Verdict::Accept
            } else {
                Verdict::Skip
            }
        })
        .await?;
    device
        .timings
        .record("power-cycle recovery", started.elapsed());
    tracing::info!(
        "first status after the power cycle: boot {} seq {}",
        status.boot_id,
        status.seq
    );
    Ok(())
}
