//! Power-cut sweep: cut a fresh device's power at a chosen point between first boot and a
//! running agent, power it on again, and say whether it came back usable (SSH, the agent's
//! unit active, a status from the new boot) and what broke if not. What a power cut loses is
//! what the guest had not flushed, so each point runs with or without the harness's flush of
//! provisioning and onboarding, and the timing that decides the outcome is measured and
//! reported with it (how old the host keys were at the cut, the guest's writeback delay).

use crate::agent::onboard::Onboarding;
use crate::agent::reference::{self, AGENT_UNIT, AGENT_USER};
use crate::lab::Lab;
use crate::model::arch::VmArchitecture;
use crate::model::spec::{Readiness, VirtualMachineSpec};
use crate::nats::NatsServer;
use crate::nats::ReportLog;
use crate::ssh::user_systemctl;
use crate::trials::scenario::{ScenarioError, device_values, report_after_cut, report_from_boot};
use crate::vm::{PowerCut, Vm};
use std::fmt;
use std::time::{Duration, Instant};

/// The event a cut point is measured from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchor {
    /// An SSH login works: cloud-init's init stage has just written the host keys (sshd
    /// starts right after it); its later stages may still run.
    SshUp,
    /// Provisioning finished: `cloud-init status --wait` returned.
    CloudInitDone,
    /// Onboarding ran up to and including this step (one of the reference agent's steps:
    /// `reference::agent().steps()`), then stopped.
    OnboardStep(&'static str),
    /// Onboarding finished and the agent's first status arrived.
    Reporting,
}

/// Where to cut: `delay` after `anchor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CutPoint {
    /// The event the cut is timed from.
    pub anchor: Anchor,
    /// How long after that event the plug is pulled.
    pub delay: Duration,
}

impl CutPoint {
    /// `delay` after the first SSH login works ([`Anchor::SshUp`]).
    pub fn after_ssh_up(delay: Duration) -> Self {
        Self {
            anchor: Anchor::SshUp,
            delay,
        }
    }
    /// `delay` after provisioning finished ([`Anchor::CloudInitDone`]).
    pub fn after_cloud_init(delay: Duration) -> Self {
        Self {
            anchor: Anchor::CloudInitDone,
            delay,
        }
    }
    /// Right after onboarding ran up to and including `step`, one of the reference agent's
    /// steps ([`Anchor::OnboardStep`]).
    pub fn after_onboard_step(step: &'static str) -> Self {
        Self {
            anchor: Anchor::OnboardStep(step),
            delay: Duration::ZERO,
        }
    }
    /// `delay` after the onboarded agent's first status arrived ([`Anchor::Reporting`]).
    pub fn while_reporting(delay: Duration) -> Self {
        Self {
            anchor: Anchor::Reporting,
            delay,
        }
    }

    /// The sweep docs/power-cuts.md's table comes from: right after provisioning, then as the
    /// writeback window (~30 s) closes and after it, mid-onboarding, and with the agent running.
    pub fn full_sweep() -> Vec<CutPoint> {
        let s = Duration::from_secs;
        vec![
            Self::after_ssh_up(s(0)),
            Self::after_cloud_init(s(0)),
            Self::after_cloud_init(s(40)),
            Self::after_onboard_step("binary"),
            Self::while_reporting(s(0)),
        ]
    }
}

impl fmt::Display for CutPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.anchor {
            Anchor::SshUp => f.write_str("SSH up")?,
            Anchor::CloudInitDone => f.write_str("cloud-init done")?,
            Anchor::OnboardStep(step) => write!(f, "onboarding step `{step}`")?,
            Anchor::Reporting => f.write_str("agent reporting")?,
        }
        write!(f, " + {} s", self.delay.as_secs())
    }
}

/// What one cut did to the device.
#[derive(Debug, Clone)]
pub struct CutOutcome {
    /// Where the plug was pulled.
    pub point: CutPoint,
    /// Whether the harness flushed provisioning (and onboarding) before the cut.
    pub flushed: bool,
    /// What the VM handle recorded at the cut: how long after provisioning it came and what
    /// had been flushed ([`Vm::last_power_cut`]).
    pub cut: Option<PowerCut>,
    /// Age of the SSH host key (written by cloud-init at first boot) at the harness's last
    /// look before the cut, by the guest's clock (`None`: it could not be read).
    pub host_key_age: Option<Duration>,
    /// From that last look until the plug was pulled (libvirt's destroy returned), by the
    /// host's clock: the key was at most `host_key_age + to_cut` old at the cut. Seconds on a
    /// loaded host.
    pub to_cut: Duration,
    /// The guest's writeback delay for dirty data (`vm.dirty_expire_centisecs`) at that last
    /// look: a cut inside that delay can lose the unflushed key (`None`: it could not be read).
    pub writeback_after: Option<Duration>,
    /// At that last look, whether the key's data was still in memory only: its extents
    /// delayed-allocated, not yet on disk (`filefrag`; `None`: it could not be read). Its age
    /// inside the writeback delay says the kernel had no reason to write it; this says nothing
    /// else had either.
    pub host_key_in_memory: Option<bool>,
    /// Power on → SSH back, or the harness's error (with its diagnosis).
    pub ssh: Result<Duration, String>,
    /// Power on → the SSH verdict, whichever it was: a broken device is told apart in
    /// seconds from console evidence, not after the budget.
    pub ssh_decided_after: Duration,
    /// Power on → a status from the new boot, or why none came.
    pub status: Result<Duration, String>,
    /// The agent's unit state once SSH was back (`None`: no SSH to ask).
    pub agent_active: Option<bool>,
}

impl CutOutcome {
    /// Whether the host key was younger than the guest's writeback delay at the cut, by at
    /// least `margin` even at its oldest (`Some(true)`), older by at least `margin` even at its
    /// youngest (`Some(false)`), or too close to call (`None`): the timing that decides whether
    /// an unflushed key survives.
    pub fn cut_inside_writeback_window(&self, margin: Duration) -> Option<bool> {
        let (age, window) = (self.host_key_age?, self.writeback_after?);
        if age + self.to_cut + margin <= window {
            Some(true)
        } else if age >= window + margin {
            Some(false)
        } else {
            None
        }
    }

    /// The device came back usable: SSH, the agent's unit active, a status from the new boot.
    pub fn usable(&self) -> bool {
        self.ssh.is_ok() && self.status.is_ok() && self.agent_active == Some(true)
    }

    /// What broke, in a line; empty when the device is usable.
    pub fn broke(&self) -> String {
        let mut parts = Vec::new();
        if let Err(e) = &self.ssh {
            parts.push(format!("SSH: {}", first_cause(e)));
        }
        if self.agent_active == Some(false) {
            parts.push("agent unit not active".to_owned());
        }
        if let Err(e) = &self.status {
            parts.push(format!("status: {}", first_cause(e)));
        }
        parts.join("; ")
    }
}

/// The most telling line of a long error: the guest's evidence or likely cause if there is
/// one, else its first line.
fn first_cause(error: &str) -> String {
    let lines: Vec<&str> = error.lines().map(str::trim).collect();
    lines
        .iter()
        .find(|l| l.starts_with("likely cause:"))
        .or_else(|| lines.iter().find(|l| l.starts_with("the guest reports:")))
        .or(lines.first())
        .map(|l| l.to_string())
        .unwrap_or_default()
}

/// Runs `points`, each on a fresh device, with and/or without the harness's flush.
pub async fn sweep(
    lab: &Lab,
    arch: VmArchitecture,
    points: &[CutPoint],
    flush_modes: &[bool],
) -> Result<Vec<CutOutcome>, ScenarioError> {
    let guest_default = None;
    let nats = lab.nats().await?;
    let mut outcomes = Vec::new();
    for (i, point) in points.iter().enumerate() {
        for (j, flush) in flush_modes.iter().enumerate() {
            let name = lab.vm_name(&format!("cut{i}{j}"), arch);
            let outcome = cut_at(lab, &nats, arch, &name, *point, *flush, guest_default).await?;
            tracing::info!(
                "power-cut sweep, {arch}, {point}, {}: {}",
                if *flush { "flushed" } else { "not flushed" },
                if outcome.usable() {
                    "usable".to_owned()
                } else {
                    outcome.broke()
                }
            );
            outcomes.push(outcome);
        }
    }
    Ok(outcomes)
}

/// One cut: provision a device named `name` (flushing provisioning or not; with the guest's
/// writeback delay set to `writeback_delay`, or the image's), bring it to `point`, pull the
/// plug, power on, and judge what came back. A device cut before its onboarding finished is
/// onboarded once SSH is back, as a provisioning system would retry. Errors before the cut
/// are errors; what the cut breaks is the outcome.
pub async fn cut_at(
    lab: &Lab,
    nats: &NatsServer,
    arch: VmArchitecture,
    name: &str,
    point: CutPoint,
    flush: bool,
    writeback_delay: Option<Duration>,
) -> Result<CutOutcome, ScenarioError> {
    let ready = match point.anchor {
        Anchor::SshUp => Readiness::SshLogin,
        _ => Readiness::CloudInitDone,
    };
    // A cut point is timed from a first boot: always cold.
    let mut spec = VirtualMachineSpec::new(name, arch)
        .with_start(crate::model::spec::Start::Cold)
        .with_provisioning_flush(flush)
        .ready_when(ready);
    spec.writeback_delay = writeback_delay;
    // The agent first: the cut is timed from the end of provisioning, which must not wait
    // on a build.
    let agent = reference::agent();
    let values = device_values(nats, &agent, name, arch).await?;
    let reports_on = agent
        .reports_on(&values)
        .map_err(crate::agent::onboard::OnboardError::from)?;
    let onboarding = Onboarding::prepare(&lab.config, &agent, values).await?;
    let log = nats
        .report_log(&reports_on, agent.reports.decode.clone())
        .for_device(name);
    let vm = lab.vm(spec).await?;
    let reporting = match point.anchor {
        Anchor::SshUp | Anchor::CloudInitDone => false,
        Anchor::OnboardStep(step) => {
            onboarding.apply_until(&vm, step).await?;
            false
        }
        Anchor::Reporting => {
            onboarding.apply(&vm).await?;
            let boot = vm.boot_id().await?;
            report_from_boot(&log, 0, &boot, vm.budgets().first_status).await?;
            true
        }
    };
    tokio::time::sleep(point.delay).await;
    let (host_key_age, writeback_after, old_boot, host_key_in_memory) = last_look(&vm).await?;
    let looked = Instant::now();
    vm.power_off().await?;
    let to_cut = looked.elapsed();
    let gate = log.gate().await?;
    let started = Instant::now();
    vm.power_on().await?;
    let budget = vm.budgets().power_cycle_recovery;
    // The verdict and when it came, whichever it was.
    let ssh = async {
        let r = vm.wait_for_ssh().await;
        let decided = started.elapsed();
        (r.map(|()| decided).map_err(|e| e.to_string()), decided)
    };
    let ((ssh, ssh_decided_after), status) = if reporting {
        // The agent is judged by its own reports, whether or not SSH comes back.
        let status = async {
            report_after_cut(&log, gate, &old_boot, None, budget)
                .await
                .map(|_| started.elapsed())
                .map_err(|e| e.to_string())
        };
        tokio::join!(ssh, status)
    } else {
        let ssh = ssh.await;
        let status = match &ssh.0 {
            Err(_) => Err("not onboarded before the cut, and no SSH to onboard it".to_owned()),
            Ok(_) => onboard_after_cut(&vm, &onboarding, &log, gate)
                .await
                .map(|()| started.elapsed()),
        };
        (ssh, status)
    };
    let agent_active = match &ssh {
        Err(_) => None,
        Ok(_) => Some(
            vm.exec(&user_systemctl(
                AGENT_USER,
                &format!("is-active {AGENT_UNIT}"),
            ))
            .await?
            .stdout
            .trim()
                == "active",
        ),
    };
    Ok(CutOutcome {
        point,
        flushed: flush,
        cut: vm.last_power_cut(),
        host_key_age,
        to_cut,
        writeback_after,
        host_key_in_memory,
        ssh,
        ssh_decided_after,
        status,
        agent_active,
    })
}

async fn onboard_after_cut(
    vm: &Vm,
    onboarding: &Onboarding,
    log: &ReportLog,
    gate: u64,
) -> Result<(), String> {
    // A cut during first boot may leave cloud-init stages to finish on this one.
    vm.wait_for_cloud_init()
        .await
        .map_err(|e| format!("cloud-init after the cut: {e}"))?;
    onboarding
        .apply(vm)
        .await
        .map_err(|e| format!("onboarding after the cut failed: {e}"))?;
    let boot = vm.boot_id().await.map_err(|e| e.to_string())?;
    report_from_boot(log, gate, &boot, vm.budgets().first_status)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// What [`last_look`] reads: the host key's age, the writeback delay, the boot id, and
/// whether the key's data was still in memory only.
type LastLook = (Option<Duration>, Option<Duration>, String, Option<bool>);

/// Read on the guest in one round trip just before the cut (each costs seconds under TCG):
/// the host key's age, the dirty-data writeback delay, the boot id, and how many of the key's
/// extents are still delayed-allocated (`x`: unreadable).
async fn last_look(vm: &Vm) -> Result<LastLook, ScenarioError> {
    let out = vm
        .succeed(
            "k=/etc/ssh/ssh_host_ed25519_key; \
             echo $(( $(date +%s) - $(stat -c %Y $k) )) \
             $(cat /proc/sys/vm/dirty_expire_centisecs) $(cat /proc/sys/kernel/random/boot_id) \
             $(if f=$(sudo -n filefrag -v $k 2>/dev/null); then echo \"$f\" | grep -c delalloc; \
             else echo x; fi)",
        )
        .await?;
    let mut fields = out.split_whitespace();
    let age = fields
        .next()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs);
    let expire = fields
        .next()
        .and_then(|v| v.parse::<u64>().ok())
        .map(|cs| Duration::from_millis(cs * 10));
    let boot_id = fields.next().unwrap_or_default().to_owned();
    let in_memory = fields
        .next()
        .and_then(|v| v.parse::<u64>().ok())
        .map(|delayed| delayed > 0);
    Ok((age, expire, boot_id, in_memory))
}

/// A Markdown table of `outcomes`, one row per cut.
pub fn table(arch: VmArchitecture, outcomes: &[CutOutcome]) -> String {
    let secs = |d: &Option<Duration>| d.map_or("?".to_owned(), |d| format!("{}", d.as_secs()));
    let took = |r: &Result<Duration, String>| match r {
        Ok(d) => format!("{:.0} s", d.as_secs_f64()),
        Err(_) => "no".to_owned(),
    };
    let ssh = |o: &CutOutcome| match &o.ssh {
        Ok(d) => format!("{:.0} s", d.as_secs_f64()),
        Err(_) => format!(
            "no (said so after {:.0} s)",
            o.ssh_decided_after.as_secs_f64()
        ),
    };
    let mut out = format!(
        "| {arch}: cut at | flushed | host key age at the cut, s (at the last look – at most) | SSH back | agent active | status from the new boot | usable | what broke |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    );
    for o in outcomes {
        out.push_str(&format!(
            "| {} | {} | {}–{} (writeback after {}) | {} | {} | {} | {} | {} |\n",
            o.point,
            if o.flushed { "yes" } else { "no" },
            secs(&o.host_key_age),
            secs(&o.host_key_age.map(|a| a + o.to_cut)),
            secs(&o.writeback_after),
            ssh(o),
            match o.agent_active {
                Some(true) => "yes",
                Some(false) => "no",
                None => "?",
            },
            took(&o.status),
            if o.usable() { "**yes**" } else { "**no**" },
            o.broke().replace('|', "/"),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_diagnosis_line_is_what_a_table_row_shows() {
        let ssh = "VM x: sshd failed to start, so the wait cannot succeed; console: [FAILED] ...\n  \
                   the guest reports: /etc/ssh/ssh_host_ed25519_key is empty (0 bytes)\n  \
                   likely cause: host keys empty after a power cut within ~30 s of first boot: provisioning not flushed";
        let o = CutOutcome {
            point: CutPoint::after_cloud_init(Duration::ZERO),
            flushed: false,
            cut: None,
            host_key_age: Some(Duration::from_secs(9)),
            to_cut: Duration::from_millis(1500),
            writeback_after: Some(Duration::from_secs(30)),
            host_key_in_memory: Some(true),
            ssh: Err(ssh.to_owned()),
            ssh_decided_after: Duration::from_secs(31),
            status: Err("not onboarded before the cut, and no SSH to onboard it".into()),
            agent_active: None,
        };
        assert!(!o.usable());
        assert!(
            o.broke().starts_with("SSH: likely cause: host keys empty"),
            "{}",
            o.broke()
        );
        // 9–10 s old against 30 s: inside by 5 s margins; the upper bound decides.
        assert_eq!(
            o.cut_inside_writeback_window(Duration::from_secs(5)),
            Some(true)
        );
        let late = CutOutcome {
            to_cut: Duration::from_secs(18),
            ..o.clone()
        };
        assert_eq!(
            late.cut_inside_writeback_window(Duration::from_secs(5)),
            None
        );
        let old = CutOutcome {
            host_key_age: Some(Duration::from_secs(40)),
            ..o.clone()
        };
        assert_eq!(
            old.cut_inside_writeback_window(Duration::from_secs(5)),
            Some(false)
        );
        let t = table(VmArchitecture::X86_64, &[o]);
        assert!(
            t.contains("| cloud-init done + 0 s | no | 9–10 (writeback after 30) | no (said so after 31 s) | ? | no | **no** |"),
            "{t}"
        );
    }
}
