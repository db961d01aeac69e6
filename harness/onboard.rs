//! Onboarding the agent over SSH, idempotently: each step says whether it changed anything,
//! and a second run changes nothing.

use crate::agent::AgentBinary;
use crate::ssh::shell_quote;
use crate::vm::{Vm, VmError, user_systemctl};
use devicelab_agent::AgentConfig;
use sha2::{Digest, Sha256};
use std::fmt;

pub const AGENT_USER: &str = "devicelab-agent";
pub const AGENT_UNIT: &str = "devicelab-agent.service";
const BINARY_PATH: &str = "/usr/local/bin/devicelab-agent";
const CONFIG_PATH: &str = "/etc/devicelab-agent/agent.toml";
// System-wide user-unit directory: applies to the agent user's manager, owned by root.
const UNIT_PATH: &str = "/etc/systemd/user/devicelab-agent.service";

#[derive(Debug, thiserror::Error)]
pub enum OnboardError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("cannot read the agent binary {path}: {source}")]
    Binary {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("onboarding step {step} printed {output:?}, expected `changed` or `unchanged`")]
    Unexpected { step: &'static str, output: String },
    #[error("there is no onboarding step {0:?}: use one of {STEPS:?}")]
    UnknownStep(String),
}

/// The onboarding steps, in the order they run.
pub const STEPS: [&str; 6] = ["user", "binary", "config", "unit", "linger", "service"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    Changed,
    Unchanged,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnboardReport {
    pub steps: Vec<(&'static str, StepOutcome)>,
}

impl OnboardReport {
    pub fn changed_steps(&self) -> Vec<&'static str> {
        self.steps
            .iter()
            .filter(|(_, o)| *o == StepOutcome::Changed)
            .map(|(s, _)| *s)
            .collect()
    }
}

impl fmt::Display for OnboardReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .steps
            .iter()
            .map(|(s, o)| {
                format!(
                    "{s}: {}",
                    if *o == StepOutcome::Changed {
                        "changed"
                    } else {
                        "unchanged"
                    }
                )
            })
            .collect();
        f.write_str(&parts.join(", "))
    }
}

/// What to install on the device.
#[derive(Debug, Clone)]
pub struct Onboarding {
    pub binary: AgentBinary,
    pub config: AgentConfig,
}

fn unit_file() -> String {
    format!(
        r#"[Unit]
Description=devicelab reference agent
StartLimitIntervalSec=0

[Service]
ExecStart={BINARY_PATH} {CONFIG_PATH}
Restart=always
RestartSec=1

[Install]
WantedBy=default.target
"#
    )
}

impl Onboarding {
    /// Runs every step, then flushes what they wrote (unless the VM's spec turned provisioning
    /// flushes off): an onboarded device keeps its onboarding through a power cut.
    pub async fn apply(&self, vm: &Vm) -> Result<OnboardReport, OnboardError> {
        let report = self.run(vm, None).await?;
        vm.flush_harness_writes("onboarding").await?;
        Ok(report)
    }

    /// Runs the steps up to and including `last` (one of [`STEPS`]) and stops there, flushing
    /// nothing: a device caught mid-onboarding, for power-cut tests.
    pub async fn apply_until(&self, vm: &Vm, last: &str) -> Result<OnboardReport, OnboardError> {
        let last = STEPS
            .into_iter()
            .find(|s| *s == last)
            .ok_or_else(|| OnboardError::UnknownStep(last.to_owned()))?;
        self.run(vm, Some(last)).await
    }

    async fn run(
        &self,
        vm: &Vm,
        stop_after: Option<&'static str>,
    ) -> Result<OnboardReport, OnboardError> {
        // Each step ends with this: it returns early once the step to stop after has run.
        macro_rules! stop_here {
            ($steps:expr) => {
                if $steps.last().map(|(s, _)| Some(*s)) == Some(stop_after) {
                    return Ok(OnboardReport { steps: $steps });
                }
            };
        }
        let binary = std::fs::read(&self.binary.path).map_err(|source| OnboardError::Binary {
            path: self.binary.path.clone(),
            source,
        })?;
        let user = shell_quote(AGENT_USER);
        let mut steps = Vec::new();

        let step = "user";
        let out = vm
            .succeed(&format!(
                "if id -u {user} >/dev/null 2>&1; then echo unchanged; \
                 else sudo -n useradd --create-home --shell /usr/sbin/nologin {user} && echo changed; fi"
            ))
            .await?;
        steps.push((step, outcome(step, &out)?));
        stop_here!(steps);

        let binary_changed = ensure_file(
            vm,
            "binary",
            BINARY_PATH,
            &binary,
            0o755,
            "root",
            &mut steps,
        )
        .await?;
        stop_here!(steps);
        // The config holds the NATS password: readable by root and the agent's group only.
        let config = self.config.to_toml();
        let config_changed = ensure_file(
            vm,
            "config",
            CONFIG_PATH,
            config.as_bytes(),
            0o640,
            AGENT_USER,
            &mut steps,
        )
        .await?;
        stop_here!(steps);
        let unit = unit_file();
        let unit_changed = ensure_file(
            vm,
            "unit",
            UNIT_PATH,
            unit.as_bytes(),
            0o644,
            "root",
            &mut steps,
        )
        .await?;
        stop_here!(steps);

        // Linger starts the user's systemd at boot, without a login: what lets a user unit
        // come back after a power cycle. Then wait for that manager's private socket (what
        // `systemctl --user` uses when there is no user D-Bus, as on minimal images).
        let step = "linger";
        let tries = vm.budgets().guest_step.as_millis().div_ceil(100);
        let out = vm
            .succeed(&format!(
                "if [ -e /var/lib/systemd/linger/{user} ]; then echo unchanged; \
                 else sudo -n loginctl enable-linger {user} && echo changed; fi; \
                 sock=/run/user/$(id -u {user})/systemd/private; \
                 for i in $(seq {tries}); do sudo -n test -S $sock && exit 0; sleep 0.1; done; \
                 echo \"the user manager never opened $sock within {budget:?}\" >&2; exit 1",
                budget = vm.budgets().guest_step
            ))
            .await?;
        steps.push((step, outcome(step, &out)?));
        stop_here!(steps);

        let step = "service";
        let restart = binary_changed || config_changed || unit_changed;
        let sc = |args: &str| user_systemctl(AGENT_USER, args);
        let command = format!(
            "set -e; if [ {restart} = true ]; then {reload}; {enable}; {restart_cmd}; echo changed; \
             elif [ \"$({is_enabled} 2>/dev/null)\" = enabled ] && [ \"$({is_active} 2>/dev/null)\" = active ]; then echo unchanged; \
             else {reload}; {enable}; {start}; echo changed; fi",
            reload = sc("daemon-reload"),
            enable = sc(&format!("enable --quiet {AGENT_UNIT}")),
            restart_cmd = sc(&format!("restart {AGENT_UNIT}")),
            start = sc(&format!("start {AGENT_UNIT}")),
            is_enabled = sc(&format!("is-enabled {AGENT_UNIT}")),
            is_active = sc(&format!("is-active {AGENT_UNIT}")),
        );
        let out = vm.succeed(&command).await?;
        steps.push((step, outcome(step, &out)?));
        Ok(OnboardReport { steps })
    }
}

fn outcome(step: &'static str, output: &str) -> Result<StepOutcome, OnboardError> {
    match output.lines().last().map(str::trim) {
        Some("changed") => Ok(StepOutcome::Changed),
        Some("unchanged") => Ok(StepOutcome::Unchanged),
        _ => Err(OnboardError::Unexpected {
            step,
            output: output.to_owned(),
        }),
    }
}

/// Installs `contents` at `path` (owner root, `group`, `mode`) unless it is already there;
/// returns whether it changed anything.
async fn ensure_file(
    vm: &Vm,
    step: &'static str,
    path: &str,
    contents: &[u8],
    mode: u32,
    group: &str,
    steps: &mut Vec<(&'static str, StepOutcome)>,
) -> Result<bool, OnboardError> {
    let want = format!("{} {mode:o} {group}", hex::encode(Sha256::digest(contents)));
    let p = shell_quote(path);
    let have = vm
        .exec(&format!(
            "h=$(sudo -n sha256sum {p} 2>/dev/null) && echo \"${{h%% *}} $(sudo -n stat -c '%a %G' {p})\""
        ))
        .await?;
    if have.success() && have.stdout.trim() == want {
        steps.push((step, StepOutcome::Unchanged));
        return Ok(false);
    }
    let dir = shell_quote(path.rsplit_once('/').map(|(d, _)| d).unwrap_or("/"));
    vm.succeed(&format!("sudo -n mkdir -p {dir}")).await?;
    vm.upload(contents, path, mode, true).await?;
    vm.succeed(&format!("sudo -n chgrp {} {p}", shell_quote(group)))
        .await?;
    steps.push((step, StepOutcome::Changed));
    Ok(true)
}
