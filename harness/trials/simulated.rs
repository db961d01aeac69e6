//! A simulated device: an agent run as a process on the test's host, with its own NATS identity
//! and its own link to the server (a [`Relay`] the test can cut), standing for a device where
//! a fleet needs many and none of them needs a real OS.
//!
//! What it proves: the agent's protocol at scale (identity, reports, desired state, delivery
//! across a cut link, a restart from what it kept). What it does not: anything of the target
//! (architecture, image, boot, unit, onboarding), and a power cut of a simulated device is a
//! `kill -9` of its process: what it wrote survives in the host's page cache, where a real
//! device would lose what it had not flushed. Its faults are the host-side ones: a cut link,
//! a freeze (SIGSTOP), a power cut (SIGKILL, then a new process in a new simulated boot).

use crate::agent::build::AgentBinary;
use crate::agent::description::{AgentDescription, ReportsOn, TemplateValues};
use crate::config::HarnessConfig;
use crate::model::arch::VmArchitecture;
use crate::nats::{NatsServer, ReportLog};
use crate::support::relay::Relay;
use crate::trials::control::ControlPlane;
use crate::trials::error::ScenarioError;
use crate::trials::scenario::device_values;
use devicelab_agent::SIMULATED_BOOT_ID_VAR;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

/// How to run the agent for one simulated device: its template values (its id, its own NATS
/// user, and the URL of its link) and a private directory for its files; returns the command
/// (the harness sets the boot id, [`SIMULATED_BOOT_ID_VAR`], and the output). The agent must
/// report that boot id as its boot marker when the variable is set (a host process shares the
/// host's kernel boot id, which no power cut changes). Called on a blocking thread: it may
/// write files, or build its agent once.
pub type Simulator =
    Arc<dyn Fn(&TemplateValues, &Path) -> std::io::Result<std::process::Command> + Send + Sync>;

/// The reference agent's binary for the host (built as for an x86_64 or aarch64 device).
pub async fn reference_binary(config: &HarnessConfig) -> Result<PathBuf, ScenarioError> {
    let arch = host_arch()?;
    Ok(AgentBinary::for_arch(config, arch).await?.path)
}

/// The host's architecture, as a simulated device reports it.
pub fn host_arch() -> Result<VmArchitecture, ScenarioError> {
    VmArchitecture::host().ok_or_else(|| {
        ScenarioError::Check(format!(
            "simulated devices run on the host, whose architecture ({}) is neither x86_64 nor aarch64",
            std::env::consts::ARCH
        ))
    })
}

/// The reference agent (`binary`, from [`reference_binary`]) as a simulated device: its
/// config rendered as on a real device, reporting every `interval_ms`, its applied state in
/// the device's directory.
pub fn reference_simulator(binary: PathBuf, interval_ms: u64) -> Simulator {
    Arc::new(move |values, dir| reference_command(&binary, interval_ms, values, dir))
}

/// The reference agent as a simulated device, reporting as in the trials
/// ([`INTERVAL_MS`](crate::agent::reference::INTERVAL_MS)); its host binary is built (or
/// found) on the first device's start, as DEVICELAB_* say.
pub fn reference() -> Simulator {
    let binary: Arc<std::sync::OnceLock<Result<PathBuf, String>>> = Arc::default();
    Arc::new(move |values, dir| {
        let path = binary
            .get_or_init(|| {
                let config = HarnessConfig::from_env().map_err(|e| e.to_string())?;
                // Simulators run on a blocking thread of the runtime (SimulatedDevice).
                tokio::runtime::Handle::current()
                    .block_on(reference_binary(&config))
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(std::io::Error::other)?;
        reference_command(&path, crate::agent::reference::INTERVAL_MS, values, dir)
    })
}

fn reference_command(
    binary: &Path,
    interval_ms: u64,
    values: &TemplateValues,
    dir: &Path,
) -> std::io::Result<std::process::Command> {
    let mut config = crate::agent::reference::config_for(values);
    config.interval_ms = interval_ms;
    if let Some(control) = config.control.as_mut() {
        control.state_path = dir.join("applied");
    }
    let path = dir.join("agent.toml");
    let text = toml::to_string(&config).map_err(std::io::Error::other)?;
    std::fs::write(&path, text)?;
    let mut command = std::process::Command::new(binary);
    command.arg(&path);
    Ok(command)
}

/// A running simulated device. Dropping it kills its process and removes its directory
/// (kept, with the agent's output, by [`SimulatedDevice::keep_evidence`]).
pub struct SimulatedDevice {
    /// The id its reports carry.
    pub device_id: String,
    /// Its template values: its own NATS user, and its link's URL.
    pub values: TemplateValues,
    /// Where its reports land.
    pub reports_on: ReportsOn,
    /// The harness as its control plane.
    pub control_plane: ControlPlane,
    agent: AgentDescription,
    nats: Arc<NatsServer>,
    relay: Relay,
    simulator: Simulator,
    dir: tempfile::TempDir,
    process: tokio::sync::Mutex<Process>,
}

struct Process {
    child: Option<tokio::process::Child>,
    boot_id: String,
}

impl SimulatedDevice {
    /// Gives `device_id` its identity on `nats` (permissions from `agent`), its link, its
    /// directory, and starts its process in a first simulated boot.
    pub async fn start(
        nats: Arc<NatsServer>,
        agent: &AgentDescription,
        device_id: &str,
        simulator: Simulator,
    ) -> Result<Self, ScenarioError> {
        let values = device_values(&nats, agent, device_id, host_arch()?).await?;
        Self::start_as(nats, agent, values, simulator).await
    }

    /// [`Self::start`] for a device whose identity `nats` has already given (`values`).
    pub(crate) async fn start_as(
        nats: Arc<NatsServer>,
        agent: &AgentDescription,
        mut values: TemplateValues,
        simulator: Simulator,
    ) -> Result<Self, ScenarioError> {
        let device_id = values.device_id.clone();
        let upstream = std::net::SocketAddr::from((nats.gateway, nats.port));
        let relay = Relay::start(upstream)
            .await
            .map_err(|e| ScenarioError::Check(format!("cannot start {device_id}'s link: {e}")))?;
        values.nats_url = format!("nats://{}", relay.address);
        let reports_on = agent
            .reports_on(&values)
            .map_err(crate::agent::onboard::OnboardError::from)?;
        let control_plane = ControlPlane::for_device(&nats, agent, &values).await?;
        let dir = tempfile::Builder::new()
            .prefix(&format!(
                "{}{device_id}-",
                crate::host::reaper::simulated_dir_prefix(std::process::id())
            ))
            .tempdir()
            .map_err(|e| ScenarioError::Check(format!("no directory for {device_id}: {e}")))?;
        let device = Self {
            device_id: device_id.to_owned(),
            values,
            reports_on,
            control_plane,
            agent: agent.clone(),
            nats,
            relay,
            simulator,
            dir,
            process: tokio::sync::Mutex::new(Process {
                child: None,
                boot_id: String::new(),
            }),
        };
        device.power_on().await?;
        Ok(device)
    }

    /// This device's reports, decoded by its agent's description.
    pub fn reports(&self) -> ReportLog {
        self.nats
            .report_log(&self.reports_on, self.agent.reports.decode.clone())
            .for_device(&self.device_id)
    }

    /// The simulated boot it is in (its reports' boot marker, for the reference agent).
    pub async fn boot_id(&self) -> String {
        self.process.lock().await.boot_id.clone()
    }

    /// Where the agent's output goes (kept with the evidence).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    /// Starts the agent in a new simulated boot (after [`Self::power_off`], or the first).
    pub async fn power_on(&self) -> Result<(), ScenarioError> {
        let mut process = self.process.lock().await;
        if process.child.is_some() {
            return Ok(());
        }
        let boot_id = format!(
            "sim-{}-{}",
            self.device_id,
            hex::encode(rand::random::<[u8; 6]>())
        );
        let command = {
            let (simulator, values, dir) = (
                self.simulator.clone(),
                self.values.clone(),
                self.dir.path().to_owned(),
            );
            // A simulator may build its agent first: off the async workers.
            tokio::task::spawn_blocking(move || simulator(&values, &dir))
                .await
                .map_err(std::io::Error::other)
                .and_then(|c| c)
        };
        let child = command.and_then(|c| self.spawn(c, &boot_id)).map_err(|e| {
            ScenarioError::Check(format!(
                "cannot start simulated device {}'s agent: {e}",
                self.device_id
            ))
        })?;
        *process = Process {
            child: Some(child),
            boot_id,
        };
        Ok(())
    }

    fn spawn(
        &self,
        mut command: std::process::Command,
        boot_id: &str,
    ) -> std::io::Result<tokio::process::Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        command
            .env(SIMULATED_BOOT_ID_VAR, boot_id)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut command = tokio::process::Command::from(command);
        command.kill_on_drop(true);
        crate::support::process::dies_with_parent(&mut command);
        command.spawn()
    }

    /// A power cut: the process is killed (SIGKILL) and reaped; nothing it had not sent is
    /// sent.
    pub async fn power_off(&self) -> Result<(), ScenarioError> {
        let mut process = self.process.lock().await;
        if let Some(mut child) = process.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        Ok(())
    }

    /// Stops the process (SIGSTOP) until [`Self::thaw`]: a hung device.
    pub async fn freeze(&self) -> Result<(), ScenarioError> {
        self.signal(rustix::process::Signal::STOP).await
    }

    /// Lets a frozen process run again (SIGCONT).
    pub async fn thaw(&self) -> Result<(), ScenarioError> {
        self.signal(rustix::process::Signal::CONT).await
    }

    async fn signal(&self, signal: rustix::process::Signal) -> Result<(), ScenarioError> {
        let process = self.process.lock().await;
        let pid = process
            .child
            .as_ref()
            .and_then(|c| c.id())
            .and_then(|id| rustix::process::Pid::from_raw(id as i32))
            .ok_or_else(|| {
                ScenarioError::Check(format!(
                    "simulated device {} has no running process to signal (is it powered off?)",
                    self.device_id
                ))
            })?;
        rustix::process::kill_process(pid, signal).map_err(|e| {
            ScenarioError::Check(format!("cannot signal {}'s agent: {e}", self.device_id))
        })
    }

    /// Cuts its link: nothing crosses, both ways, until [`Self::heal`].
    pub fn partition(&self) {
        self.relay.cut();
    }

    /// Restores its link.
    pub fn heal(&self) {
        self.relay.heal();
    }

    /// Its agent's process id, while it runs.
    pub async fn process_id(&self) -> Option<u32> {
        self.process
            .lock()
            .await
            .child
            .as_ref()
            .and_then(|c| c.id())
    }

    /// Keeps its directory (config, applied state, the agent's output) and returns where.
    pub fn keep_evidence(&self) -> PathBuf {
        let kept = std::env::temp_dir().join(format!(
            "devicelab-sim-evidence-{}-{}",
            self.device_id,
            std::process::id()
        ));
        let _ = std::fs::create_dir_all(&kept);
        for e in std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = std::fs::copy(e.path(), kept.join(e.file_name()));
        }
        kept
    }
}

impl Drop for SimulatedDevice {
    fn drop(&mut self) {
        // A frozen process must be killable: SIGKILL works on a stopped process too.
        if let Some(child) = self.process.get_mut().child.as_mut() {
            let _ = child.start_kill();
        }
    }
}
