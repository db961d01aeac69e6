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
use std::time::{Duration, Instant};

fn recovery_message(agent: &Result<Duration, String>, ssh: &Result<Duration, String>) -> String {
    match (agent, ssh) {
        (Ok(a), Err(e)) => format!(
            "the agent recovered in {:.1} s (a status from the new boot), but SSH did not come back: {e}",
            a.as_secs_f64()
        ),
        (Err(e), Ok(s)) => format!(
            "SSH came back in {:.1} s, but the agent did not recover: {e}",
            s.as_secs_f64()
        ),
        (Err(a), Err(s)) => {
            format!("neither the agent nor SSH came back:\n  agent: {a}\n  SSH: {s}")
        }
        (Ok(a), Ok(s)) => format!(
            "the agent recovered in {:.1} s and SSH in {:.1} s",
            a.as_secs_f64(),
            s.as_secs_f64()
        ),
    }
}

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
    /// After a power cycle the agent (judged by its status stream) and the device's SSH are
    /// two verdicts: a broken sshd is never reported as a broken agent, nor the reverse.
    #[error("{}", recovery_message(agent, ssh))]
    Recovery {
        /// How long until a status from the new boot arrived, or why none did.
        agent: Result<Duration, String>,
        /// How long until SSH was back, or why it was not.
        ssh: Result<Duration, String>,
    },
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
    let agent = agent_config(name, &nats);
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

/// The reference agent's configuration for device `name`, reporting to `nats` every 2 s.
pub fn agent_config(name: String, nats: &NatsServer) -> AgentConfig {
    AgentConfig {
        device_id: name,
        nats_url: nats.guest_url(),
        interval_ms: 2_000,
        subject_prefix: DEFAULT_SUBJECT_PREFIX.into(),
        nats_user: nats.credentials().map(|c| c.user.clone()),
        nats_password: nats.credentials().map(|c| c.password.clone()),
    }
}

/// Waits for a report of `device_id` from boot `boot_id`, after stream sequence `after`.
pub async fn status_from_boot(
    nats: &NatsServer,
    device_id: &str,
    after: u64,
    boot_id: &str,
    budget: Duration,
) -> Result<Status, NatsError> {
    let (_, status) = nats
        .status_log(device_id)
        .wait_for(after, budget, |s| {
            if s.boot_id == boot_id {
                Verdict::Accept
            } else {
                Verdict::Skip
            }
        })
        .await?;
    Ok(status)
}

/// Waits for the first report of `device_id` after a power cut: after stream sequence `gate`
/// (everything the old boot sent is before it), from any boot but `old_boot` (a report from
/// the old boot after the gate fails at once), and, with `not_before_ms`, stamped later than
/// that by the agent's clock.
pub async fn status_after_cut(
    nats: &NatsServer,
    device_id: &str,
    gate: u64,
    old_boot: &str,
    not_before_ms: Option<u64>,
    budget: Duration,
) -> Result<Status, NatsError> {
    let (_, status) = nats
        .status_log(device_id)
        .wait_for(gate, budget, |s| {
            if s.boot_id == old_boot {
                Verdict::Reject(format!(
                    "a status from the old boot {old_boot} arrived after the gate"
                ))
            } else if not_before_ms.is_none_or(|t| s.timestamp_ms > t) {
                Verdict::Accept
            } else {
                Verdict::Skip
            }
        })
        .await?;
    Ok(status)
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
    let first_status = status_from_boot(
        nats,
        &agent.device_id,
        0,
        &boot_id,
        vm.budgets().first_status,
    )
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

/// The `power_cycle` trial: a device in service (provisioning and onboarding flushed, the
/// agent reporting) loses power; then a status whose boot id differs and whose timestamp is
/// after the gate must arrive, and SSH must come back (a separate verdict). A status from the
/// old boot after the gate fails the trial.
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
    vm.power_on().await?;
    let agent = async {
        let status = status_after_cut(
            &device.nats,
            &device.agent.device_id,
            gate_seq,
            &old_boot,
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
    if status.boot_id != new_boot {
        return Err(ScenarioError::Check(format!(
            "the agent reported boot {} after the power cycle, but the device's boot is {new_boot}",
            status.boot_id
        )));
    }
    device.timings.record("power-cycle recovery", agent_took);
    device.timings.record("ssh after power cycle", ssh_took);
    tracing::info!(
        "first status after the power cycle: boot {} seq {}",
        status.boot_id,
        status.seq
    );
    Ok(())
}
