//! Onboarding any agent description over SSH, idempotently: packages → user → linger → files →
//! unit → enable/start → active (and the flush), in one round trip per run (two when a run that left the large
//! files out finds them changed; the `script` module). Each step says
//! whether it changed anything, and a second run changes nothing.

mod script;

use crate::agent::build::{AgentBinary, AgentBinaryError};
use crate::agent::description::{
    AgentDescription, Content, DescriptionError, Package, Source, TemplateValues,
};
use crate::config::HarnessConfig;
use crate::model::arch::VmArchitecture;
use crate::vm::{Vm, VmError};
use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use crate::agent::reference::{AGENT_UNIT, AGENT_USER};

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
    #[error("cannot pack the onboarding bundle: {0}")]
    Bundle(std::io::Error),
    #[error(
        "VM {vm}: onboarding's flush (sync, once the unit started) failed:\n{output}\n  the \
         guest's disk or file system is failing: its console log and `dmesg` say which"
    )]
    FlushFailed { vm: String, output: String },
    #[error("VM {vm}: onboarding step {step} failed:\n{output}")]
    StepFailed {
        vm: String,
        step: String,
        output: String,
    },
    #[error(
        "VM {vm}: onboarding ended without reporting every step (expected {expected:?}, \
         reported {reported:?}); its output:\n{output}"
    )]
    Incomplete {
        vm: String,
        expected: Vec<String>,
        reported: Vec<String>,
        output: String,
    },
    #[error("agent {agent} has no onboarding step {step:?}: use one of {steps:?}")]
    UnknownStep {
        agent: String,
        step: String,
        steps: Vec<String>,
    },
    #[error(
        "VM {vm}: the guest's package manager was still locked by another process after \
         {waited:?} (on Ubuntu images, apt-daily.service or apt-daily-upgrade.service in the \
         first minutes):\n{output}\n  keep them out of the way before onboarding, e.g. in \
         FirstBootConfig::runcmd: `systemctl disable --now apt-daily.timer \
         apt-daily-upgrade.timer; systemctl stop apt-daily.service apt-daily-upgrade.service`, \
         or give the wait more time with DEVICELAB_BUDGET_SCALE (it is half the command budget)"
    )]
    PackageLocked {
        vm: String,
        waited: Duration,
        output: String,
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
        "VM {vm}: the .deb given as package {name} is the package {own}: set `Package::Deb`'s \
         name to {own:?} (dpkg knows it by that name, so an installed copy would never be seen)"
    )]
    DebName {
        vm: String,
        name: String,
        own: String,
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
        "VM {vm}: {unit} did not stay active for 2 s since it was started ({state} after \
         {waited:.0?}); its journal:\n{journal}"
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
/// every template rendered with its values. Its `Debug` shows no file's bytes (a rendered
/// config holds the NATS password).
#[derive(Clone)]
pub struct Onboarding {
    pub description: AgentDescription,
    pub values: TemplateValues,
    files: Vec<script::FileToInstall>,
    debs: Vec<(String, Vec<u8>)>,
    unit: String,
    /// The VMs (by name) a run of this onboarding (whole, or up to a step) ended on: a later
    /// run there leaves the large files out of its bundle (the script checks them first).
    /// Runs of one onboarding on one VM are expected one at a time.
    completed_on: Arc<Mutex<HashSet<String>>>,
}

/// Files at least this large are left out of a run's bundle on a VM a run already completed
/// on (the agent's binary, most often): checked on the device instead, and sent again only if
/// it differs.
pub const LEAN_FROM_BYTES: usize = 64 * 1024;

impl fmt::Debug for Onboarding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Onboarding")
            .field("agent", &self.description.name)
            .field("values", &self.values)
            .field(
                "files",
                &self.files.iter().map(|x| &x.path).collect::<Vec<_>>(),
            )
            .field("debs", &self.debs.iter().map(|d| &d.0).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

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
            files.push(script::FileToInstall {
                step: f.step.clone(),
                path: f.path.clone(),
                mode: f.mode,
                group: f.group.clone(),
                bytes,
            });
        }
        let mut debs = Vec::new();
        for p in &description.packages {
            if let Package::Deb { name, files } = p
                && let Some(path) = files.get(&arch)
            {
                let bytes = read(path, &format!("the package {name}")).await?;
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
            completed_on: Arc::default(),
        })
    }

    /// Runs every step and flushes what they wrote (unless the VM's spec turned provisioning
    /// flushes off): an onboarded device keeps its onboarding through a power cut. The flush
    /// is the script's own `sync`, run while the unit's "stays active" window passes.
    pub async fn apply(&self, vm: &Vm) -> Result<OnboardReport, OnboardError> {
        let flush = vm.flushes_provisioning();
        let report = self.run(vm, None, flush).await?;
        if flush {
            tracing::info!(
                "VM {}: flushed onboarding (its sync ran while the unit's window passed; the run waited for it)",
                vm.name()
            );
            vm.flushed("onboarding");
        } else {
            // Says the spec turned flushes off, and flushes nothing.
            vm.flush_harness_writes("onboarding").await?;
        }
        Ok(report)
    }

    /// Runs the steps up to and including `last` (one of the description's steps, in their
    /// order: [`AgentDescription::steps`], where linger comes before the files) and stops
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
        self.run(vm, Some(last), false).await
    }

    /// The bundle and the script on one channel (see [`script`]), its report read back, a
    /// failure mapped to the error that names its fix; every step up to `stop_after` (all,
    /// without it) must have reported. On a VM a run ended on before, the large files stay out
    /// of the bundle, unless the device says it needs them ([`script::RESEND`]): then a second
    /// round trip with every file.
    async fn run(
        &self,
        vm: &Vm,
        stop_after: Option<&str>,
        flush: bool,
    ) -> Result<OnboardReport, OnboardError> {
        let ran = self.run_once(vm, stop_after, flush).await;
        if ran.is_ok() {
            self.completed_on().insert(vm.name().to_owned());
        }
        ran
    }

    /// One run of [`Onboarding::run`], its bookkeeping left to it.
    async fn run_once(
        &self,
        vm: &Vm,
        stop_after: Option<&str>,
        flush: bool,
    ) -> Result<OnboardReport, OnboardError> {
        let seen = self.completed_on().contains(vm.name());
        let mut out = self.send(vm, stop_after, seen, flush).await?;
        if seen && out.stdout.lines().any(|l| l == script::RESEND) {
            tracing::info!(
                "VM {}: its files differ from the last onboarding's; sending them again",
                vm.name()
            );
            out = self.send(vm, stop_after, false, flush).await?;
        }
        let report = self.read_report(vm, &out.stdout, &out.stderr, out.success())?;
        let mut expected = self.description.steps();
        if let Some(last) = stop_after
            && let Some(i) = expected.iter().position(|s| s == last)
        {
            expected.truncate(i + 1);
        }
        let reported: Vec<String> = report.steps.iter().map(|(s, _)| s.clone()).collect();
        if reported != expected {
            return Err(OnboardError::Incomplete {
                vm: vm.name().to_owned(),
                expected,
                reported,
                output: format!("{}{}", out.stdout, out.stderr),
            });
        }
        Ok(report)
    }

    /// The VMs runs of this onboarding ended on (see the field).
    fn completed_on(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.completed_on.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One run's round trip, the large files left out if `lean`.
    async fn send(
        &self,
        vm: &Vm,
        stop_after: Option<&str>,
        lean: bool,
        flush: bool,
    ) -> Result<crate::ssh::ExecOutput, OnboardError> {
        let run = script::render(
            &self.description,
            &self.files,
            &|f| lean && f.bytes.len() >= LEAN_FROM_BYTES,
            self.unit.as_bytes(),
            &self.debs,
            vm.budgets().guest_step,
            vm.budgets().command / 2,
            stop_after,
            flush,
        )
        .map_err(OnboardError::Bundle)?;
        Ok(vm.exec_with_input(&run.command, Some(&run.bundle)).await?)
    }

    /// The steps' outcomes, or the failure the script stopped at.
    fn read_report(
        &self,
        vm: &Vm,
        stdout: &str,
        stderr: &str,
        success: bool,
    ) -> Result<OnboardReport, OnboardError> {
        let mut steps = Vec::new();
        let mut output = Vec::new();
        let mut unit_state = None;
        for line in stdout.lines() {
            let mut words = line.split_whitespace();
            match words.next() {
                Some(script::STEP) => {
                    let (Some(step), Some(outcome)) = (words.next(), words.next()) else {
                        continue;
                    };
                    let outcome = match outcome {
                        "changed" => StepOutcome::Changed,
                        _ => StepOutcome::Unchanged,
                    };
                    steps.push((step.to_owned(), outcome));
                    output.clear();
                }
                Some(script::UNIT_STATE) => {
                    let state = words.next().unwrap_or("unknown").to_owned();
                    let ms: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
                    unit_state = Some((state, Duration::from_millis(ms)));
                    output.clear();
                }
                Some(script::FAIL) => {
                    let step = words.next().unwrap_or("onboarding").to_owned();
                    let what: Vec<&str> = words.collect();
                    return Err(self.failure(vm, step, &what, output.join("\n"), unit_state));
                }
                _ => output.push(line),
            }
        }
        if !success {
            return Err(OnboardError::StepFailed {
                vm: vm.name().to_owned(),
                step: "onboarding".into(),
                output: format!("{stdout}{stderr}"),
            });
        }
        Ok(OnboardReport { steps })
    }

    fn failure(
        &self,
        vm: &Vm,
        step: String,
        what: &[&str],
        output: String,
        unit_state: Option<(String, Duration)>,
    ) -> OnboardError {
        let vm = vm.name().to_owned();
        match (step.as_str(), what) {
            ("packages", ["deb", names @ ..]) => OnboardError::Package {
                vm,
                package: names.join(" "),
                arch: self.values.arch,
                output,
            },
            ("packages", ["locked", secs]) => OnboardError::PackageLocked {
                vm,
                waited: Duration::from_secs(secs.parse().unwrap_or(0)),
                output,
            },
            ("packages", ["name", name]) => OnboardError::DebName {
                vm,
                name: (*name).to_owned(),
                own: output.trim().to_owned(),
            },
            ("packages", ["mirror", names @ ..]) => OnboardError::MirrorPackage {
                vm,
                packages: names.join(" "),
                output,
            },
            ("active", _) => {
                let (state, waited) = unit_state.unwrap_or(("unknown".into(), Duration::ZERO));
                OnboardError::UnitFailed {
                    vm,
                    unit: self.description.service.unit().to_owned(),
                    state,
                    waited,
                    journal: output,
                }
            }
            ("flush", _) => OnboardError::FlushFailed { vm, output },
            _ => OnboardError::StepFailed { vm, step, output },
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
            crate::agent::build::check_elf(
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
