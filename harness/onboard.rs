//! Onboarding any agent description over SSH, idempotently: packages → user → files → unit →
//! linger → enable/start → active. Each step says whether it changed anything, and a second
//! run changes nothing.

use crate::agent::{AgentBinary, AgentBinaryError};
use crate::arch::VmArchitecture;
use crate::config::HarnessConfig;
use crate::description::{
    AgentDescription, Content, DescriptionError, Package, Source, TemplateValues,
};
use crate::ssh::shell_quote;
use crate::vm::{Vm, VmError, user_systemctl};
use sha2::{Digest, Sha256};
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use crate::reference::{AGENT_UNIT, AGENT_USER};

#[derive(Debug, thiserror::Error)]
pub enum OnboardError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Description(#[from] DescriptionError),
    #[error(transparent)]
    Binary(#[from] AgentBinaryError),
    #[error("cannot read {path} (to ship as {guest_path}): {source}")]
    Read {
        path: PathBuf,
        guest_path: String,
        source: std::io::Error,
    },
    #[error("onboarding step {step} printed {output:?}, expected `changed` or `unchanged`")]
    Unexpected { step: String, output: String },
    #[error("agent {agent} has no onboarding step {step:?}: use one of {steps:?}")]
    UnknownStep {
        agent: String,
        step: String,
        steps: Vec<String>,
    },
    #[error(
        "VM {vm}: the package {package} cannot be installed:\n{output}\n  \
         check the .deb is for {arch} and that every package it depends on is in the description"
    )]
    Package {
        vm: String,
        package: String,
        arch: VmArchitecture,
        output: String,
    },
    #[error(
        "VM {vm}: apt could not install {packages} from the guest's mirror:\n{output}\n  \
         check the names, and that the guest's apt sources reach a mirror; a guest with no \
         route out needs the .deb files instead (Package::Deb)"
    )]
    MirrorPackage {
        vm: String,
        packages: String,
        output: String,
    },
    #[error(
        "VM {vm}: {unit} is {state} {waited:.0?} after it was started; its journal:\n{journal}"
    )]
    UnitFailed {
        vm: String,
        unit: String,
        state: String,
        waited: Duration,
        journal: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    Changed,
    Unchanged,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnboardReport {
    pub steps: Vec<(String, StepOutcome)>,
}

impl OnboardReport {
    pub fn changed_steps(&self) -> Vec<&str> {
        self.steps
            .iter()
            .filter(|(_, o)| *o == StepOutcome::Changed)
            .map(|(s, _)| s.as_str())
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

/// A description made concrete for one device: every file's bytes for its architecture,
/// every template rendered with its values.
#[derive(Debug, Clone)]
pub struct Onboarding {
    pub description: AgentDescription,
    pub values: TemplateValues,
    files: Vec<(String, String, u32, String, Vec<u8>)>,
    debs: Vec<(String, Vec<u8>)>,
    unit: String,
}

/// Where uploaded `.deb` files wait on the device.
const DEB_DIR: &str = "/var/cache/devicelab/debs";

impl Onboarding {
    /// Resolves `description` for a device with `values` (building or reading what it ships
    /// for `values.arch`); fails before anything is sent if a template or a file is wrong.
    pub async fn prepare(
        config: &HarnessConfig,
        description: &AgentDescription,
        values: TemplateValues,
    ) -> Result<Self, OnboardError> {
        let arch = values.arch;
        description.check(&[arch])?;
        let mut files = Vec::new();
        for f in &description.files {
            let bytes = match &f.content {
                Content::Template(t) => description.render(t, &values)?.into_bytes(),
                Content::Render(render) => render(&values).into_bytes(),
                Content::Shipped(source) => ship(config, source, arch, &f.path).await?,
            };
            files.push((
                f.step.clone(),
                f.path.clone(),
                f.mode,
                f.group.clone(),
                bytes,
            ));
        }
        let mut debs = Vec::new();
        for p in &description.packages {
            if let Package::Deb { name, files } = p
                && let Some(path) = files.get(&arch)
            {
                let bytes = read(path, &format!("{DEB_DIR}/{name}.deb")).await?;
                debs.push((name.clone(), bytes));
            }
        }
        let unit = description.render(description.service.text(), &values)?;
        Ok(Self {
            description: description.clone(),
            values,
            files,
            debs,
            unit,
        })
    }

    /// Runs every step, then flushes what they wrote (unless the VM's spec turned provisioning
    /// flushes off): an onboarded device keeps its onboarding through a power cut.
    pub async fn apply(&self, vm: &Vm) -> Result<OnboardReport, OnboardError> {
        let report = self.run(vm, None).await?;
        vm.flush_harness_writes("onboarding").await?;
        Ok(report)
    }

    /// Runs the steps up to and including `last` (one of the description's steps) and stops
    /// there, flushing nothing: a device caught mid-onboarding, for power-cut tests.
    pub async fn apply_until(&self, vm: &Vm, last: &str) -> Result<OnboardReport, OnboardError> {
        let steps = self.description.steps();
        if !steps.iter().any(|s| s == last) {
            return Err(OnboardError::UnknownStep {
                agent: self.description.name.clone(),
                step: last.to_owned(),
                steps,
            });
        }
        self.run(vm, Some(last)).await
    }

    async fn run(&self, vm: &Vm, stop_after: Option<&str>) -> Result<OnboardReport, OnboardError> {
        let mut steps: Vec<(String, StepOutcome)> = Vec::new();
        // Each step ends with this: it returns early once the step to stop after has run.
        macro_rules! stop_here {
            () => {
                if stop_after.is_some() && steps.last().map(|(s, _)| s.as_str()) == stop_after {
                    return Ok(OnboardReport { steps });
                }
            };
        }
        let d = &self.description;

        if !d.packages.is_empty() {
            let outcome = self.packages(vm).await?;
            steps.push(("packages".into(), outcome));
            stop_here!();
        }

        if let Some(user) = &d.user {
            let user = shell_quote(user);
            let out = vm
                .succeed(&format!(
                    "if id -u {user} >/dev/null 2>&1; then echo unchanged; \
                     else sudo -n useradd --create-home --shell /usr/sbin/nologin {user} && echo changed; fi"
                ))
                .await?;
            steps.push(("user".into(), outcome("user", &out)?));
            stop_here!();
        }

        let mut restart = false;
        for (step, path, mode, group, bytes) in &self.files {
            let changed = ensure_file(vm, path, bytes, *mode, group).await?;
            restart |= changed;
            steps.push((step.clone(), changed.into()));
            stop_here!();
        }

        let unit_changed =
            ensure_file(vm, &d.service.path(), self.unit.as_bytes(), 0o644, "root").await?;
        restart |= unit_changed;
        steps.push(("unit".into(), unit_changed.into()));
        stop_here!();

        if let Some(user) = d.service.user() {
            // Linger starts the user's systemd at boot, without a login: what lets a user unit
            // come back after a power cycle. Then wait for that manager's private socket (what
            // `systemctl --user` uses when there is no user D-Bus, as on minimal images).
            let budget = vm.budgets().guest_step;
            let tries = budget.as_millis().div_ceil(100);
            let user = shell_quote(user);
            let out = vm
                .succeed(&format!(
                    "if [ -e /var/lib/systemd/linger/{user} ]; then echo unchanged; \
                     else sudo -n loginctl enable-linger {user} && echo changed; fi; \
                     sock=/run/user/$(id -u {user})/systemd/private; \
                     for i in $(seq {tries}); do sudo -n test -S $sock && exit 0; sleep 0.1; done; \
                     echo \"the user manager never opened $sock within {budget:?}\" >&2; exit 1"
                ))
                .await?;
            steps.push(("linger".into(), outcome("linger", &out)?));
            stop_here!();
        }

        let unit = shell_quote(d.service.unit());
        let sc = |args: &str| match d.service.user() {
            None => format!("sudo -n systemctl {args}"),
            Some(user) => user_systemctl(user, args),
        };
        let command = format!(
            "set -e; if [ {restart} = true ]; then {reload}; {enable}; {restart_cmd}; echo changed; \
             elif [ \"$({is_enabled} 2>/dev/null)\" = enabled ] && [ \"$({is_active} 2>/dev/null)\" = active ]; then echo unchanged; \
             else {reload}; {enable}; {start}; echo changed; fi",
            reload = sc("daemon-reload"),
            enable = sc(&format!("enable --quiet {unit}")),
            restart_cmd = sc(&format!("restart {unit}")),
            start = sc(&format!("start {unit}")),
            is_enabled = sc(&format!("is-enabled {unit}")),
            is_active = sc(&format!("is-active {unit}")),
        );
        let out = vm.succeed(&command).await?;
        steps.push(("service".into(), outcome("service", &out)?));
        self.ensure_active(vm, &sc(&format!("is-active {unit}")))
            .await?;
        Ok(OnboardReport { steps })
    }

    /// The unit must be active, and stay so for a moment: one that fails (or restarts in a
    /// loop) is an onboarding error with its journal, not a missing report minutes later.
    async fn ensure_active(&self, vm: &Vm, is_active: &str) -> Result<(), OnboardError> {
        let started = Instant::now();
        let budget = vm.budgets().guest_step;
        let mut active_since: Option<Instant> = None;
        loop {
            let state = vm.exec(is_active).await?.stdout.trim().to_owned();
            if state == "active" {
                let since = *active_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= Duration::from_secs(2) {
                    return Ok(());
                }
            } else {
                active_since = None;
                if state == "failed" || started.elapsed() >= budget {
                    let journal = vm
                        .exec(&self.description.service.journal_command(30))
                        .await?;
                    return Err(OnboardError::UnitFailed {
                        vm: vm.name().to_owned(),
                        unit: self.description.service.unit().to_owned(),
                        state,
                        waited: started.elapsed(),
                        journal: format!("{}{}", journal.stdout, journal.stderr),
                    });
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Uploads the `.deb` files and installs the ones whose version is not installed yet (all
    /// together, so they may depend on each other); mirror packages through apt.
    async fn packages(&self, vm: &Vm) -> Result<StepOutcome, OnboardError> {
        let mut changed = false;
        let mut to_install = Vec::new();
        for (name, bytes) in &self.debs {
            let path = format!("{DEB_DIR}/{name}.deb");
            ensure_file(vm, &path, bytes, 0o644, "root").await?;
            let p = shell_quote(&path);
            let n = shell_quote(name);
            let state = vm
                .exec(&format!(
                    "[ \"$(dpkg-query -W -f='${{Status}} ${{Version}}' {n} 2>/dev/null)\" = \
                     \"install ok installed $(dpkg-deb -f {p} Version)\" ] && echo installed"
                ))
                .await?;
            if state.stdout.trim() != "installed" {
                to_install.push(p);
            }
        }
        if !to_install.is_empty() {
            let out = vm
                .exec(&format!("sudo -n dpkg -i {}", to_install.join(" ")))
                .await?;
            if !out.success() {
                return Err(OnboardError::Package {
                    vm: vm.name().to_owned(),
                    package: to_install.join(" "),
                    arch: self.values.arch,
                    output: format!("{}{}", out.stdout, out.stderr),
                });
            }
            changed = true;
        }
        // Mirror packages not installed yet: the package lists first (a fresh cloud image has
        // none), then all of them in one apt run.
        let mut missing = Vec::new();
        for p in &self.description.packages {
            if let Package::Mirror(name) = p {
                let n = shell_quote(name);
                let state = vm
                    .exec(&format!("dpkg-query -W -f='${{Status}}' {n} 2>/dev/null"))
                    .await?;
                if state.stdout.trim() != "install ok installed" {
                    missing.push(n);
                }
            }
        }
        if !missing.is_empty() {
            let names = missing.join(" ");
            let out = vm
                .exec(&format!(
                    "sudo -n apt-get update -q && \
                     sudo -n DEBIAN_FRONTEND=noninteractive apt-get install -y -q {names}"
                ))
                .await?;
            if !out.success() {
                return Err(OnboardError::MirrorPackage {
                    vm: vm.name().to_owned(),
                    packages: names,
                    output: format!("{}{}", out.stdout, out.stderr),
                });
            }
            changed = true;
        }
        Ok(changed.into())
    }
}

impl From<bool> for StepOutcome {
    fn from(changed: bool) -> Self {
        if changed {
            Self::Changed
        } else {
            Self::Unchanged
        }
    }
}

/// The bytes of a shipped source for `arch` (built, checked, or read).
async fn ship(
    config: &HarnessConfig,
    source: &Source,
    arch: VmArchitecture,
    guest_path: &str,
) -> Result<Vec<u8>, OnboardError> {
    let path = match source {
        Source::Bytes(b) => return Ok(b.clone()),
        Source::File(p) => p.clone(),
        Source::Prebuilt(per_arch) => {
            // `check` made sure the architecture is there.
            let path = per_arch.get(&arch).cloned().unwrap_or_default();
            crate::agent::check_elf(
                &path,
                arch,
                &format!("the prebuilt binary for {guest_path}"),
            )?;
            path
        }
        Source::Cargo {
            manifest,
            package,
            bin,
        } => {
            AgentBinary::cargo(config, manifest, package, bin, arch)
                .await?
                .path
        }
    };
    read(&path, guest_path).await
}

async fn read(path: &std::path::Path, guest_path: &str) -> Result<Vec<u8>, OnboardError> {
    tokio::fs::read(path)
        .await
        .map_err(|source| OnboardError::Read {
            path: path.to_owned(),
            guest_path: guest_path.to_owned(),
            source,
        })
}

fn outcome(step: &str, output: &str) -> Result<StepOutcome, OnboardError> {
    match output.lines().last().map(str::trim) {
        Some("changed") => Ok(StepOutcome::Changed),
        Some("unchanged") => Ok(StepOutcome::Unchanged),
        _ => Err(OnboardError::Unexpected {
            step: step.to_owned(),
            output: output.to_owned(),
        }),
    }
}

/// Installs `contents` at `path` (owner root, `group`, `mode`) unless it is already there;
/// returns whether it changed anything.
async fn ensure_file(
    vm: &Vm,
    path: &str,
    contents: &[u8],
    mode: u32,
    group: &str,
) -> Result<bool, OnboardError> {
    let want = format!("{} {mode:o} {group}", hex::encode(Sha256::digest(contents)));
    let p = shell_quote(path);
    let have = vm
        .exec(&format!(
            "h=$(sudo -n sha256sum {p} 2>/dev/null) && echo \"${{h%% *}} $(sudo -n stat -c '%a %G' {p})\""
        ))
        .await?;
    if have.success() && have.stdout.trim() == want {
        return Ok(false);
    }
    let dir = shell_quote(path.rsplit_once('/').map(|(d, _)| d).unwrap_or("/"));
    vm.succeed(&format!("sudo -n mkdir -p {dir}")).await?;
    vm.upload(contents, path, mode, true).await?;
    vm.succeed(&format!("sudo -n chgrp {} {p}", shell_quote(group)))
        .await?;
    Ok(true)
}
