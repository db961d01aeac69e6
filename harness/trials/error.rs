//! Why a trial failed ([`ScenarioError`]): the error of the layer that failed, a verdict of
//! the trial itself, or either with the failure artifacts it kept.

use crate::agent::build::AgentBinaryError;
use crate::agent::onboard::OnboardError;
use crate::lab::{LabError, LabNatsError};
use crate::nats::NatsError;
use crate::vm::VmError;
use std::path::PathBuf;
use std::time::Duration;

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

/// Why a trial failed: the error of the layer that failed, a verdict of the trial itself, or
/// either with the failure artifacts it kept.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// Starting or driving the VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The run's NATS server could not be started.
    #[error(transparent)]
    Nats(#[from] LabNatsError),
    /// A lab on another host could not be opened.
    #[error(transparent)]
    Lab(#[from] Box<LabError>),
    /// Reading the device's reports failed, or the report waited for did not arrive in time
    /// or was rejected.
    #[error(transparent)]
    Status(#[from] NatsError),
    /// Onboarding failed, or the agent's description is wrong (checked before anything boots).
    #[error(transparent)]
    Onboard(#[from] OnboardError),
    /// The agent's binary could not be built, read, or is for another architecture.
    #[error(transparent)]
    Agent(#[from] AgentBinaryError),
    /// A check of the trial failed (the VM's architecture, cloud-init's schema check,
    /// onboarding's idempotence, delivery across an outage); the message says what was
    /// expected and what was seen.
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
    /// A command sent to the agent ([`OnboardedDevice::command`](crate::OnboardedDevice::command)) got no reply.
    #[error("the command on {subject} failed: {reason}")]
    Command {
        /// The subject the command was sent on.
        subject: String,
        /// Why: no reply in time, or nothing listens.
        reason: String,
    },
    #[error(
        "{source}\n  failure artifacts: {dir} (serial log, domain XML, cloud-init logs, journal, \
         agent journal, status history)\n  last console lines:{console}"
    )]
    /// A failure on a running device, with its evidence kept: the message names the
    /// artifacts' directory and quotes the serial console's last lines.
    WithArtifacts {
        /// The failure itself.
        source: Box<ScenarioError>,
        /// Where the failure artifacts are (serial log, domain XML, cloud-init logs, journal,
        /// agent journal, report history).
        dir: PathBuf,
        /// The serial console's last lines, formatted for the message.
        console: String,
    },
}
