//! A fleet: real devices of mixed architectures and simulated ones beside them, on one NATS
//! server, each with its own identity, its own report log and its own faults; selected as
//! groups ([`Select`], [`Group`]) and faulted a group at a time (a partition, a freeze, a
//! group power cut: a site outage); judged per device and for the fleet (every device
//! reports from this boot, converges to a generation, delivers every report once, in order).
//! Each verdict fills a column of one table ([`Fleet::table`]); a failing device names itself
//! and keeps its evidence while the others' verdicts are still reported.

use crate::agent::description::{AgentDescription, Report, TemplateValues};
use crate::lab::Lab;
use crate::model::arch::{Accelerator, VmArchitecture};
use crate::model::spec::Start;
use crate::nats::{NatsServer, ReportLog, Verdict};
use crate::trials::control::ControlPlane;
use crate::trials::error::ScenarioError;
use crate::trials::outage::judge_delivery;
use crate::trials::scenario::{self, OnboardedDevice, report_after_cut, report_from_boot};
use crate::trials::simulated::{SimulatedDevice, Simulator};
use crate::vm::faults::BadLink;
use devicelab_agent::now_ms;
use futures_util::future::join_all;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// One device of the fleet: a VM with the agent onboarded, or the agent as a host process.
pub enum Device {
    /// A real device: a VM of its architecture.
    Real(Box<OnboardedDevice>),
    /// A simulated device ([`crate::trials::simulated`]).
    Simulated(SimulatedDevice),
}

/// A fleet's device, with its label.
pub struct Member {
    /// What the test called its part of the fleet ("site-a", "sim").
    pub label: String,
    /// The device.
    pub device: Device,
    /// How long it took to start, from its VM slot (or its process) to its first report.
    pub started_in: std::time::Duration,
    /// How long after the fleet's start it got its VM slot (zero for a simulated device).
    pub slot_after: std::time::Duration,
    /// The libvirt URI of the host it runs on (`None` for a simulated device).
    pub host: Option<String>,
}

impl Member {
    /// The id its reports carry.
    pub fn device_id(&self) -> &str {
        match &self.device {
            Device::Real(d) => &d.device_id,
            Device::Simulated(d) => &d.device_id,
        }
    }

    /// `x86_64`, `aarch64`, or `simulated`.
    pub fn kind(&self) -> &'static str {
        match &self.device {
            Device::Real(d) => d.vm.arch().name(),
            Device::Simulated(_) => "simulated",
        }
    }

    /// Its reports, decoded by its agent's description.
    pub fn reports(&self) -> ReportLog {
        match &self.device {
            Device::Real(d) => d.reports(),
            Device::Simulated(d) => d.reports(),
        }
    }

    /// The harness as its control plane.
    pub fn control_plane(&self) -> &ControlPlane {
        match &self.device {
            Device::Real(d) => &d.control_plane,
            Device::Simulated(d) => &d.control_plane,
        }
    }

    /// The boot it is in now, as its reports' boot marker says it.
    async fn boot(&self) -> Result<String, ScenarioError> {
        Ok(match &self.device {
            Device::Real(d) => d.vm.boot_id().await?,
            Device::Simulated(d) => d.boot_id().await,
        })
    }

    /// How long a report may take to come back after a power cut.
    fn recovery_budget(&self) -> Duration {
        match &self.device {
            Device::Real(d) => d.vm.budgets().power_cycle_recovery,
            Device::Simulated(_) => SIMULATED_RECOVERY,
        }
    }

    fn real(&self, fault: &str) -> Result<&OnboardedDevice, ScenarioError> {
        match &self.device {
            Device::Real(d) => Ok(d),
            Device::Simulated(d) => Err(ScenarioError::Check(format!(
                "this fault ({fault}) acts on real devices only; {} is simulated (a host \
                 process): select the real devices for it (Select::Real)",
                d.device_id
            ))),
        }
    }

    /// Keeps its evidence (a VM's failure artifacts; a simulated device's output and state);
    /// returns where.
    async fn keep_evidence(&self) -> String {
        match &self.device {
            Device::Real(d) => scenario::keep_artifacts(&d.vm, &d.reports(), &d.agent)
                .await
                .display()
                .to_string(),
            Device::Simulated(d) => d.keep_evidence().display().to_string(),
        }
    }
}

/// A simulated device's budget for its first report after a power cut (a process restart).
const SIMULATED_RECOVERY: Duration = Duration::from_secs(30);

/// Which devices a group takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Select {
    /// Every device.
    All,
    /// The real devices (VMs).
    Real,
    /// The simulated devices.
    Simulated,
    /// The real devices of one architecture.
    Arch(VmArchitecture),
    /// The devices the builder gave this label.
    Label(String),
}

/// Some of a fleet's devices, in the fleet's order: what a group fault or verdict acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Shown in the table's column for what happened to each device.
    pub name: String,
    members: Vec<usize>,
}

impl Group {
    /// How many devices it holds.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Its first half (rounded down) and the rest: a network split into halves.
    pub fn halves(&self) -> (Group, Group) {
        let at = self.members.len() / 2;
        (
            self.part(&self.members[..at], "first half"),
            self.part(&self.members[at..], "second half"),
        )
    }

    /// Its first `k` devices.
    pub fn first(&self, k: usize) -> Group {
        self.part(
            &self.members[..k.min(self.members.len())],
            &format!("first {k}"),
        )
    }

    /// This group's devices and `other`'s, in the fleet's order.
    pub fn and(&self, other: &Group) -> Group {
        let mut members = self.members.clone();
        members.extend(&other.members);
        members.sort_unstable();
        members.dedup();
        Group {
            name: format!("{} + {}", self.name, other.name),
            members,
        }
    }

    /// The same devices under another name (the table shows it).
    pub fn named(self, name: impl Into<String>) -> Group {
        Group {
            name: name.into(),
            ..self
        }
    }

    fn part(&self, members: &[usize], what: &str) -> Group {
        Group {
            name: format!("{what} of {}", self.name),
            members: members.to_vec(),
        }
    }
}

enum Planned {
    Real(VmArchitecture),
    Simulated,
}

/// Describes a fleet: its agent, its real devices per architecture, its simulated ones.
pub struct FleetBuilder {
    agent: AgentDescription,
    planned: Vec<(Planned, String, AgentDescription)>,
    simulator: Option<Simulator>,
    start: Option<Start>,
}

impl FleetBuilder {
    /// `count` real devices of `arch`, labelled `label`, running the fleet's agent.
    pub fn real(self, count: usize, arch: VmArchitecture, label: &str) -> Self {
        let agent = self.agent.clone();
        self.real_with(count, arch, label, &agent)
    }

    /// `count` real devices of `arch` running `agent` (a group with another description).
    pub fn real_with(
        mut self,
        count: usize,
        arch: VmArchitecture,
        label: &str,
        agent: &AgentDescription,
    ) -> Self {
        for _ in 0..count {
            self.planned
                .push((Planned::Real(arch), label.to_owned(), agent.clone()));
        }
        self
    }

    /// `count` simulated devices labelled `label`, run by the fleet's simulator
    /// ([`Self::simulated_by`]; the reference agent's when none is given).
    pub fn simulated(mut self, count: usize, label: &str) -> Self {
        for _ in 0..count {
            self.planned
                .push((Planned::Simulated, label.to_owned(), self.agent.clone()));
        }
        self
    }

    /// How the simulated devices run their agent.
    pub fn simulated_by(mut self, simulator: Simulator) -> Self {
        self.simulator = Some(simulator);
        self
    }

    /// Starts the real devices cold or warm (default: as DEVICELAB_START says).
    pub fn start_as(mut self, start: Start) -> Self {
        self.start = Some(start);
        self
    }

    /// Starts the fleet's NATS server (the agent's `nats_config`) and every device: on `lab`'s
    /// host, and on every other host its configuration lists (DEVICELAB_HOSTS), as
    /// [`FleetBuilder::start_across`] places them.
    pub async fn start(self, lab: &Lab) -> Result<Fleet, ScenarioError> {
        let others = lab.other_hosts().await.map_err(Box::new)?;
        let labs: Vec<&Lab> = std::iter::once(lab)
            .chain(others.iter().map(|l| &**l))
            .collect();
        let mut fleet = self.start_across(&labs).await?;
        fleet.hosts = others;
        Ok(fleet)
    }

    /// Starts the fleet's NATS server, offered to the guests of every host of `labs`, and
    /// every device. Each real device is placed on the host with the most free VM slots when
    /// its turn comes, else on the first host where one comes free: every host onboards as
    /// many devices at once as it has slots.
    pub async fn start_across(self, labs: &[&Lab]) -> Result<Fleet, ScenarioError> {
        let mut uris: Vec<&str> = labs.iter().map(|l| l.config.libvirt_uri.as_str()).collect();
        uris.sort_unstable();
        if let Some(twice) = uris.windows(2).find(|w| w[0] == w[1]) {
            return Err(ScenarioError::Check(format!(
                "the fleet's labs name the host {} twice: give each host one lab",
                twice[0]
            )));
        }
        let nats = Arc::new(Lab::nats_across(labs, &self.agent.nats_config).await?);
        self.start_on_hosts(labs, nats).await
    }

    /// Starts every device against `nats`: the real ones onboarded concurrently, as many at
    /// once as the host has VM slots (the rest wait their turn to onboard; once up, all run at
    /// once, as one test's VMs may), beside the simulated ones.
    /// A fleet of simulated devices only needs no `lab` (nor libvirt). Every device gets its
    /// own NATS identity; every agent description is checked first.
    pub async fn start_on(
        self,
        lab: Option<&Lab>,
        nats: Arc<NatsServer>,
    ) -> Result<Fleet, ScenarioError> {
        self.start_on_hosts(lab.as_slice(), nats).await
    }

    /// [`FleetBuilder::start_on`] the hosts of `labs` (placed as
    /// [`FleetBuilder::start_across`] says; `nats` must be offered to each host's guests).
    pub async fn start_on_hosts(
        self,
        labs: &[&Lab],
        nats: Arc<NatsServer>,
    ) -> Result<Fleet, ScenarioError> {
        let started = Instant::now();
        let archs: Vec<VmArchitecture> = self
            .planned
            .iter()
            .filter_map(|(p, ..)| match p {
                Planned::Real(a) => Some(*a),
                Planned::Simulated => None,
            })
            .collect();
        for (_, _, agent) in &self.planned {
            agent
                .check(&archs)
                .map_err(crate::agent::onboard::OnboardError::from)?;
        }
        let run_id = crate::lab::run_owner().run_id;
        let reference = crate::agent::reference::agent().name;
        let simulator = match &self.simulator {
            Some(s) => s.clone(),
            None if self.planned.len() == archs.len() || self.agent.name == reference => {
                crate::trials::simulated::reference()
            }
            None => {
                return Err(ScenarioError::Check(format!(
                    "the fleet's simulated devices need to know how to run {} on the host: \
                     give FleetBuilder::simulated_by a Simulator (only the reference agent has \
                     one by default)",
                    self.agent.name
                )));
            }
        };
        for (_, label, _) in &self.planned {
            if label.is_empty()
                || !label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            {
                return Err(ScenarioError::Check(format!(
                    "the fleet label {label:?} names devices and VMs: use lowercase letters, \
                     digits and `-`"
                )));
            }
        }
        // As many onboardings at once on each host as it has slots: a fleet is one test, whose
        // VMs would otherwise all go over the count at once.
        let slots: Vec<tokio::sync::Semaphore> = labs
            .iter()
            .map(|lab| {
                let count = archs.iter().map(|a| lab.vm_slots(*a).count).min();
                tokio::sync::Semaphore::new(count.unwrap_or(1).max(1))
            })
            .collect();
        let concurrent: usize = slots.iter().map(|s| s.available_permits()).sum();
        // Every device's name and identity first, in one reload of the server's
        // configuration (a reload per device would keep JetStream busy while the others start).
        let mut identities: Vec<TemplateValues> = Vec::with_capacity(self.planned.len());
        let mut requests = Vec::with_capacity(self.planned.len());
        for (i, (planned, label, agent)) in self.planned.iter().enumerate() {
            let (name, arch) = match planned {
                Planned::Real(arch) => {
                    let lab = labs.first().ok_or_else(|| {
                        ScenarioError::Check(
                            "a fleet with real devices needs a lab: start it with \
                             FleetBuilder::start(&lab)"
                                .into(),
                        )
                    })?;
                    (lab.vm_name(&format!("fleet-{label}"), *arch), *arch)
                }
                Planned::Simulated => (
                    format!("{label}-{run_id}-{i}"),
                    crate::trials::simulated::host_arch()?,
                ),
            };
            let (values, permissions) = scenario::identity_request(&nats, &[agent], &name, arch)?;
            requests.push((name, permissions));
            identities.push(values);
        }
        let credentials = nats.identify(requests).await?;
        for (values, given) in identities.iter_mut().zip(credentials) {
            values.nats_password = given.password;
        }
        let starts =
            self.planned
                .iter()
                .zip(identities)
                .map(|((planned, label, agent), values)| {
                    let (nats, simulator, slots) = (nats.clone(), &simulator, &slots);
                    let start = self.start;
                    async move {
                        let mut began = std::time::Instant::now();
                        let (mut host, mut started_in) = (None, None);
                        let device = match planned {
                            Planned::Real(arch) => {
                                let kvm: Vec<bool> = labs
                                    .iter()
                                    .map(|lab| lab.accel(*arch).accel == Accelerator::Kvm)
                                    .collect();
                                let (at, _slot) = place(slots, &kvm).await;
                                began = std::time::Instant::now();
                                let lab = labs[at];
                                let uri = lab.config.libvirt_uri.clone();
                                let values = TemplateValues {
                                    nats_url: nats.guest_url_on(&uri),
                                    ..values
                                };
                                host = Some(uri);
                                let device = Box::pin(scenario::onboard_device(
                                    lab, nats, values, agent, start,
                                ))
                                .await?;
                                // Timed while the slot is held: the next device's slot comes
                                // after this one's start on its host ends.
                                started_in = Some(began.elapsed());
                                Device::Real(Box::new(device))
                            }
                            Planned::Simulated => {
                                let simulator = simulator.clone();
                                Device::Simulated(
                                    SimulatedDevice::start_as(nats, agent, values, simulator)
                                        .await?,
                                )
                            }
                        };
                        Ok::<_, ScenarioError>(Member {
                            label: label.clone(),
                            device,
                            started_in: started_in.unwrap_or_else(|| began.elapsed()),
                            slot_after: match planned {
                                Planned::Real(_) => began.duration_since(started),
                                Planned::Simulated => Duration::ZERO,
                            },
                            host,
                        })
                    }
                });
        let results = join_all(starts).await;
        let mut members = Vec::with_capacity(results.len());
        let mut failed = Vec::new();
        for r in results {
            match r {
                Ok(m) => members.push(m),
                Err(e) => failed.push(e.to_string()),
            }
        }
        if !failed.is_empty() {
            // The started devices go with `members` (their drop removes them).
            return Err(ScenarioError::Check(format!(
                "{} of the fleet's {} devices did not start:\n  {}",
                failed.len(),
                self.planned.len(),
                failed.join("\n  ")
            )));
        }
        let fleet = Fleet {
            nats,
            cuts: Mutex::new(vec![0; members.len()]),
            members,
            started,
            table: Mutex::new(Table::default()),
            hosts: Vec::new(),
        };
        if labs.len() > 1 {
            fleet.note_all("host", |m| m.host.as_deref().map_or("-".into(), host_name));
        }
        fleet.note_all("started", |m| match &m.device {
            Device::Real(_) => format!(
                "{:.0} s (slot at {:.0} s)",
                m.started_in.as_secs_f64(),
                m.slot_after.as_secs_f64()
            ),
            Device::Simulated(_) => "process".into(),
        });
        tracing::info!(
            "fleet of {} devices started in {:.1} s ({} onboarded at once)",
            fleet.members.len(),
            started.elapsed().as_secs_f64(),
            concurrent
        );
        Ok(fleet)
    }
}

/// The table the verdicts fill: one row per device, one column per verdict or fault.
#[derive(Default)]
struct Table {
    columns: Vec<String>,
    cells: BTreeMap<(usize, String), String>,
    failures: BTreeMap<usize, Vec<String>>,
    /// Where failing devices' evidence was kept.
    evidence: Vec<String>,
}

/// A fleet's devices, their NATS server and their table. Dropping it removes every device.
pub struct Fleet {
    /// The server every device reports to.
    pub nats: Arc<NatsServer>,
    /// The devices, in the builder's order.
    pub members: Vec<Member>,
    started: Instant,
    table: Mutex<Table>,
    /// Each device's power cuts so far: a delivery verdict allows one new boot per cut.
    cuts: Mutex<Vec<usize>>,
    /// The labs of the hosts beyond the one the fleet was started from (DEVICELAB_HOSTS),
    /// held as long as their devices.
    hosts: Vec<Arc<Lab>>,
}

/// A free VM slot on one of the hosts whose slots `slots` counts (the fleet's own count of
/// each host's slots: other tests' VMs wait for the host's slot locks later, in
/// [`Lab::vm`]): the index of that host, and the slot. Where the device's architecture runs
/// under KVM (`kvm`, per host) when asked, else anywhere: the host with the most free slots,
/// the first of equals; with none free, the first host where one comes free.
async fn place<'a>(
    slots: &'a [tokio::sync::Semaphore],
    kvm: &[bool],
) -> (usize, tokio::sync::SemaphorePermit<'a>) {
    let free: Vec<usize> = slots.iter().map(|s| s.available_permits()).collect();
    if let Some(placed) =
        pick(&free, kvm).and_then(|at| slots[at].try_acquire().ok().map(|slot| (at, slot)))
    {
        return placed;
    }
    let waits = slots
        .iter()
        .enumerate()
        .map(|(at, s)| Box::pin(async move { (at, s.acquire().await.expect("never closed")) }));
    futures_util::future::select_all(waits).await.0
}

/// Of hosts with `free` slots each, the one to place a device on: a KVM host for its
/// architecture (`kvm`) before one that emulates it, then the most free slots, then the first.
fn pick(free: &[usize], kvm: &[bool]) -> Option<usize> {
    (0..free.len())
        .filter(|&at| free[at] > 0)
        .rev()
        .max_by_key(|&at| (kvm.get(at).copied().unwrap_or(false), free[at]))
}

/// The host a libvirt URI names, for a table ("local" for this machine's).
fn host_name(uri: &str) -> String {
    crate::config::uri_host(uri).unwrap_or_else(|| "local".into())
}

/// A group power cut as it happened.
#[derive(Debug, Clone)]
pub struct GroupCut {
    /// The group whose power was cut.
    pub group: Group,
    /// From the first device's stop to the last's: how close to one instant the cut was
    /// (a VM stops when it is paused, a process when it is killed).
    pub spread: Duration,
    /// From the first real device's `destroy` to the last's.
    pub destroy_spread: Option<Duration>,
    /// Each device's boot before the cut.
    old_boots: Vec<(usize, String)>,
}

/// A fleet verdict's figures: how many devices passed, the slowest and the spread.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetFigures {
    /// Devices that passed.
    pub passed: usize,
    /// Devices judged.
    pub judged: usize,
    /// The slowest device and its time.
    pub slowest: Option<(String, Duration)>,
    /// From the fastest device to the slowest.
    pub spread: Duration,
}

impl std::fmt::Display for FleetFigures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} passed", self.passed, self.judged)?;
        if let Some((device, took)) = &self.slowest {
            write!(
                f,
                "; slowest {device} ({:.1} s); spread {:.1} s",
                took.as_secs_f64(),
                self.spread.as_secs_f64()
            )?;
        }
        Ok(())
    }
}

/// What one device's reports looked like when a delivery verdict began.
#[derive(Debug, Clone)]
pub struct Mark {
    seq: u64,
    report: Report,
    cuts: usize,
}

/// Every device's [`Mark`]: taken before a fault, judged after ([`Fleet::delivered`]).
#[derive(Debug, Clone)]
pub struct Marks(Vec<(usize, Mark)>);

impl Fleet {
    /// A fleet running `agent`: add its devices, then start it.
    pub fn of(agent: &AgentDescription) -> FleetBuilder {
        FleetBuilder {
            agent: agent.clone(),
            planned: Vec::new(),
            simulator: None,
            start: None,
        }
    }

    /// The devices `select` takes.
    pub fn group(&self, select: Select) -> Group {
        let name = match &select {
            Select::All => "all".to_owned(),
            Select::Real => "real".to_owned(),
            Select::Simulated => "simulated".to_owned(),
            Select::Arch(a) => a.name().to_owned(),
            Select::Label(l) => l.clone(),
        };
        let members = self
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| match (&select, &m.device) {
                (Select::All, _) => true,
                (Select::Real, Device::Real(_)) => true,
                (Select::Simulated, Device::Simulated(_)) => true,
                (Select::Arch(a), Device::Real(d)) => d.vm.arch() == *a,
                (Select::Label(l), _) => m.label == *l,
                _ => false,
            })
            .map(|(i, _)| i)
            .collect();
        Group { name, members }
    }

    fn each<'a>(&'a self, group: &'a Group) -> impl Iterator<Item = (usize, &'a Member)> + 'a {
        group.members.iter().map(|&i| (i, &self.members[i]))
    }

    fn note(&self, i: usize, column: &str, cell: String) {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if !t.columns.iter().any(|c| c == column) {
            t.columns.push(column.to_owned());
        }
        t.cells.insert((i, column.to_owned()), cell);
    }

    fn note_all(&self, column: &str, cell: impl Fn(&Member) -> String) {
        for (i, m) in self.members.iter().enumerate() {
            self.note(i, column, cell(m));
        }
    }

    fn fail(&self, i: usize, column: &str, why: String) {
        self.note(i, column, "FAILED".into());
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        t.failures
            .entry(i)
            .or_default()
            .push(format!("{column}: {why}"));
    }

    /// Runs `fault` on every device of `group` at once; the table's `column` says it.
    async fn on_group<F>(&self, group: &Group, column: &str, fault: F) -> Result<(), ScenarioError>
    where
        F: AsyncFn(&Member) -> Result<(), ScenarioError>,
    {
        let results = join_all(self.each(group).map(|(i, m)| {
            let fault = &fault;
            async move { (i, fault(m).await) }
        }))
        .await;
        let (done, verdict) = self.every_one(&format!("{column} on {}", group.name), results);
        for (i, ()) in done {
            self.note(i, "faults", self.faults_cell(i, column));
        }
        verdict
    }

    /// Each device's result, split: the devices it went right for (with what they gave), and
    /// `Ok`, or one error naming every device whose `what` failed.
    fn every_one<T>(
        &self,
        what: &str,
        results: Vec<(usize, Result<T, ScenarioError>)>,
    ) -> (Vec<(usize, T)>, Result<(), ScenarioError>) {
        let mut done = Vec::with_capacity(results.len());
        let mut failed = Vec::new();
        for (i, r) in results {
            match r {
                Ok(t) => done.push((i, t)),
                Err(e) => failed.push(format!("{}: {e}", self.members[i].device_id())),
            }
        }
        let verdict = if failed.is_empty() {
            Ok(())
        } else {
            Err(ScenarioError::Check(format!(
                "{what} failed for {} device(s):\n  {}",
                failed.len(),
                failed.join("\n  ")
            )))
        };
        (done, verdict)
    }

    fn faults_cell(&self, i: usize, fault: &str) -> String {
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        match t.cells.get(&(i, "faults".to_owned())) {
            Some(before) if !before.is_empty() => format!("{before}, {fault}"),
            _ => fault.to_owned(),
        }
    }

    /// Cuts every device of `group` off the network (a real device: [`crate::Vm::partition`];
    /// a simulated one: its link) until [`Self::heal`].
    pub async fn partition(&self, group: &Group) -> Result<(), ScenarioError> {
        self.on_group(group, "partition", async |m| match &m.device {
            Device::Real(d) => Ok(d.vm.partition().await?),
            Device::Simulated(d) => {
                d.partition();
                Ok(())
            }
        })
        .await
    }

    /// Restores every device's network after [`Self::partition`].
    pub async fn heal(&self, group: &Group) -> Result<(), ScenarioError> {
        self.on_group(group, "healed", async |m| match &m.device {
            Device::Real(d) => Ok(d.vm.heal().await?),
            Device::Simulated(d) => {
                d.heal();
                Ok(())
            }
        })
        .await
    }

    /// Freezes every device of `group` (a VM paused; a process stopped) until [`Self::thaw`].
    pub async fn freeze(&self, group: &Group) -> Result<(), ScenarioError> {
        self.on_group(group, "freeze", async |m| match &m.device {
            Device::Real(d) => Ok(d.vm.freeze().await?),
            Device::Simulated(d) => d.freeze().await,
        })
        .await
    }

    /// Lets every frozen device of `group` run again.
    pub async fn thaw(&self, group: &Group) -> Result<(), ScenarioError> {
        self.on_group(group, "thawed", async |m| match &m.device {
            Device::Real(d) => Ok(d.vm.thaw().await?),
            Device::Simulated(d) => d.thaw().await,
        })
        .await
    }

    /// Runs `fault` on the VM of every device of `group` at once (real devices only).
    async fn on_real<F>(&self, group: &Group, column: &str, fault: F) -> Result<(), ScenarioError>
    where
        F: AsyncFn(&crate::vm::Vm) -> Result<(), crate::vm::VmError>,
    {
        self.on_group(group, column, async |m| {
            Ok(fault(&m.real(column)?.vm).await?)
        })
        .await
    }

    /// Unplugs every real device's cable ([`crate::Vm::unplug_network`]).
    pub async fn unplug_network(&self, group: &Group) -> Result<(), ScenarioError> {
        self.on_real(group, "unplugged", async |vm| vm.unplug_network().await)
            .await
    }

    /// Plugs every real device's cable back in.
    pub async fn plug_network(&self, group: &Group) -> Result<(), ScenarioError> {
        self.on_real(group, "plugged", async |vm| vm.plug_network().await)
            .await
    }

    /// Degrades every real device's link ([`crate::Vm::degrade_link`]).
    pub async fn degrade_link(&self, group: &Group, link: BadLink) -> Result<(), ScenarioError> {
        self.on_real(group, "bad link", async |vm| vm.degrade_link(link).await)
            .await
    }

    /// Restores every real device's link.
    pub async fn restore_link(&self, group: &Group) -> Result<(), ScenarioError> {
        self.on_real(group, "link restored", async |vm| vm.restore_link().await)
            .await
    }

    /// Sets every real device's clock to `to` ([`crate::Vm::set_clock`]).
    pub async fn set_clock(&self, group: &Group, to: SystemTime) -> Result<(), ScenarioError> {
        self.on_real(group, "clock set", async |vm| vm.set_clock(to).await)
            .await
    }

    /// Puts every real device's clock right again.
    pub async fn restore_clock(&self, group: &Group) -> Result<(), ScenarioError> {
        self.on_real(group, "clock restored", async |vm| vm.restore_clock().await)
            .await
    }

    /// Fills every real device's disk, leaving `leave` bytes ([`crate::Vm::fill_disk`]).
    pub async fn fill_disk(&self, group: &Group, leave: u64) -> Result<(), ScenarioError> {
        self.on_real(group, "disk full", async |vm| {
            vm.fill_disk(leave).await.map(drop)
        })
        .await
    }

    /// Frees what [`Self::fill_disk`] took.
    pub async fn free_disk(&self, group: &Group) -> Result<(), ScenarioError> {
        self.on_real(group, "disk freed", async |vm| vm.free_disk().await)
            .await
    }

    /// A site outage: every device of `group` loses power at once. The VMs are paused
    /// together (the instant they stop) and then destroyed; the simulated devices' processes
    /// are killed. Nothing is flushed first. The spread (first stop to last) is measured and
    /// logged; power comes back with [`Self::power_on`].
    pub async fn power_cut(&self, group: &Group) -> Result<GroupCut, ScenarioError> {
        let mut old_boots = Vec::with_capacity(group.len());
        for (i, m) in self.each(group) {
            old_boots.push((i, m.boot().await?));
        }
        let stops = join_all(self.each(group).map(|(i, m)| async move {
            let stopped = match &m.device {
                Device::Real(d) => d.vm.freeze().await.map_err(ScenarioError::from),
                Device::Simulated(d) => d.power_off().await,
            };
            (i, stopped.map(|()| Instant::now()))
        }))
        .await;
        let destroys = join_all(self.each(group).filter_map(|(i, m)| match &m.device {
            Device::Real(d) => Some(async move {
                (
                    i,
                    d.vm.power_off()
                        .await
                        .map(|()| Instant::now())
                        .map_err(ScenarioError::from),
                )
            }),
            Device::Simulated(_) => None,
        }))
        .await;
        // Stops, then destroys: one verdict over both.
        let all = stops
            .into_iter()
            .map(|(i, r)| (i, r.map(|t| (false, t))))
            .chain(destroys.into_iter().map(|(i, r)| (i, r.map(|t| (true, t)))))
            .collect();
        let (done, verdict) = self.every_one(&format!("the power cut of {}", group.name), all);
        verdict?;
        let at = |destroy: bool| -> Vec<Instant> {
            done.iter()
                .filter(|(_, (d, _))| *d == destroy)
                .map(|(_, (_, t))| *t)
                .collect()
        };
        let (stopped, destroyed) = (at(false), at(true));
        let spread_of = |ts: &[Instant]| match (ts.iter().min(), ts.iter().max()) {
            (Some(a), Some(b)) => Some(b.duration_since(*a)),
            _ => None,
        };
        let cut = GroupCut {
            group: group.clone(),
            spread: spread_of(&stopped).unwrap_or_default(),
            destroy_spread: spread_of(&destroyed),
            old_boots,
        };
        for (i, _) in self.each(group) {
            self.note(i, "faults", self.faults_cell(i, "power cut"));
            self.cuts.lock().unwrap_or_else(|p| p.into_inner())[i] += 1;
        }
        let summary = format!(
            "group power cut of {} ({} devices): stopped within {} ms of each other{}",
            group.name,
            group.len(),
            cut.spread.as_millis(),
            cut.destroy_spread.map_or(String::new(), |d| format!(
                "; destroyed within {} ms",
                d.as_millis()
            ))
        );
        tracing::info!("{summary}");
        eprintln!("{summary}");
        Ok(cut)
    }

    /// Powers the devices of `cut` on again and judges each: its first report after the cut
    /// comes from a new boot (read past a gate taken with the device off, as the
    /// `power_cycle` trial does), and a real device's SSH is back. Fills the table's
    /// "recovery" column: from power-on to both.
    pub async fn power_on(&self, cut: &GroupCut) -> FleetFigures {
        let recoveries = join_all(cut.old_boots.iter().map(|(i, old_boot)| async move {
            let m = &self.members[*i];
            let log = m.reports();
            let result = async {
                let gate = log.gate().await?;
                let on = Instant::now();
                match &m.device {
                    Device::Real(d) => d.vm.power_on().await?,
                    Device::Simulated(d) => d.power_on().await?,
                }
                m.control_plane().new_boot(gate, now_ms());
                report_after_cut(&log, gate, old_boot, None, m.recovery_budget()).await?;
                if let Device::Real(d) = &m.device {
                    d.vm.wait_for_ssh().await?;
                }
                Ok::<_, ScenarioError>(on.elapsed())
            }
            .await;
            (*i, result)
        }))
        .await;
        self.judged("recovery", recoveries).await
    }

    /// Every device of `group` reports from its current boot within `budget` (a real
    /// device's first report after onboarding is one already). The "reports" column says when,
    /// counted from the fleet's start (a real device's onboarding included).
    pub async fn reporting(&self, group: &Group, budget: Duration) -> FleetFigures {
        let results = join_all(self.each(group).map(|(i, m)| async move {
            let result = async {
                let boot = m.boot().await?;
                report_from_boot(&m.reports(), 0, &boot, budget).await?;
                Ok::<_, ScenarioError>(self.started.elapsed())
            }
            .await;
            (i, result)
        }))
        .await;
        self.judged("reports", results).await
    }

    /// Puts generation `generation` (`document`) as every device's desired state in `group`;
    /// returns how many devices it was put for. A device whose put failed fails the
    /// "desire N" column (its evidence kept); the others go on.
    pub async fn desire(&self, group: &Group, generation: u64, document: &str) -> usize {
        let results = join_all(self.each(group).map(|(i, m)| async move {
            (i, m.control_plane().desire(generation, document).await)
        }))
        .await;
        let mut put = 0;
        for (i, r) in results {
            match r {
                Ok(_) => put += 1,
                Err(e) => {
                    self.failed_with_evidence(i, &format!("desire {generation}"), &e)
                        .await
                }
            }
        }
        put
    }

    /// Every device of `group` reports `generation` applied within `budget` (timed from its
    /// put, or its last power-on if later). Fills the table's "gen N" column.
    pub async fn converged(
        &self,
        group: &Group,
        generation: u64,
        budget: Duration,
    ) -> FleetFigures {
        let results = join_all(self.each(group).map(|(i, m)| async move {
            (
                i,
                m.control_plane()
                    .converged(generation, budget)
                    .await
                    .map(|c| c.took),
            )
        }))
        .await;
        self.judged(&format!("gen {generation}"), results).await
    }

    /// Where each device of `group` stands now: a fresh report and its stream position, the
    /// start of a later [`Self::delivered`] verdict. A device without a fresh report within
    /// `budget` fails the "mark" column and is left out of the verdict.
    pub async fn mark(&self, group: &Group, budget: Duration) -> Marks {
        let marks = join_all(self.each(group).map(|(i, m)| async move {
            let log = m.reports();
            let result = async {
                let from = log.last_sequence().await?;
                Ok::<_, ScenarioError>(log.wait_for(from, budget, |_| Verdict::Accept).await?)
            }
            .await;
            (i, result)
        }))
        .await;
        let mut kept = Vec::with_capacity(marks.len());
        for (i, r) in marks {
            match r {
                Ok((seq, report)) => {
                    let cuts = self.cuts.lock().unwrap_or_else(|p| p.into_inner())[i];
                    kept.push((i, Mark { seq, report, cuts }));
                }
                Err(e) => self.failed_with_evidence(i, "mark", &e).await,
            }
        }
        Marks(kept)
    }

    /// Every report each marked device made since its mark arrived once, in order: within
    /// each boot, the counter rises by one (an agent without one: its timestamps rise), and a
    /// new boot's starts at 1; a boot that ended in a power cut may have lost what it had not
    /// sent yet; a device has no more new boots than power cuts since its mark, and nothing
    /// of an older boot arrives after a newer one. Waits until each device made `fresh`
    /// reports stamped a second after this call (by the device's clock: put right a clock a
    /// test moved first). Fills the table's "delivery" column.
    pub async fn delivered(&self, marks: &Marks, fresh: usize, budget: Duration) -> FleetFigures {
        let since = now_ms();
        let started = Instant::now();
        let results = join_all(marks.0.iter().map(|(i, mark)| async move {
            let m = &self.members[*i];
            let result = async {
                let mut new = 0;
                let after = m
                    .reports()
                    .collect(mark.seq, budget, |r| {
                        new += usize::from(r.timestamp_ms > since + 1_000);
                        new >= fresh
                    })
                    .await?;
                let reports: Vec<Report> = after.into_iter().map(|s| s.report).collect();
                let cuts = self.cuts.lock().unwrap_or_else(|p| p.into_inner())[*i] - mark.cuts;
                judge_across_boots(&mark.report, &reports, cuts).map_err(ScenarioError::Check)?;
                Ok::<_, ScenarioError>(started.elapsed())
            }
            .await;
            (*i, result)
        }))
        .await;
        self.judged("delivery", results).await
    }

    /// Keeps device `i`'s evidence and fails its `column` with `error`.
    async fn failed_with_evidence(&self, i: usize, column: &str, error: &ScenarioError) {
        let evidence = self.members[i].keep_evidence().await;
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .evidence
            .push(evidence.clone());
        self.fail(i, column, format!("{error} (evidence: {evidence})"));
    }

    /// Records each device's result in `column`, keeps the failing ones' evidence, and sums
    /// up.
    async fn judged(
        &self,
        column: &str,
        results: Vec<(usize, Result<Duration, ScenarioError>)>,
    ) -> FleetFigures {
        let mut times = Vec::new();
        for (i, r) in &results {
            match r {
                Ok(took) => {
                    self.note(*i, column, format!("{:.1} s", took.as_secs_f64()));
                    times.push((self.members[*i].device_id().to_owned(), *took));
                }
                Err(e) => self.failed_with_evidence(*i, column, e).await,
            }
        }
        let slowest = times.iter().max_by_key(|(_, t)| *t).cloned();
        let fastest = times.iter().map(|(_, t)| *t).min().unwrap_or_default();
        let figures = FleetFigures {
            passed: times.len(),
            judged: results.len(),
            spread: slowest
                .as_ref()
                .map_or(Duration::ZERO, |(_, t)| t.saturating_sub(fastest)),
            slowest,
        };
        tracing::info!("fleet {column}: {figures}");
        figures
    }

    /// The table so far: device, kind, label, then one column per verdict or fault.
    pub fn table(&self) -> String {
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = format!("| device | kind | label | {} |\n", t.columns.join(" | "));
        out.push_str(&format!("|{}\n", " --- |".repeat(3 + t.columns.len())));
        for (i, m) in self.members.iter().enumerate() {
            let cells: Vec<&str> = t
                .columns
                .iter()
                .map(|c| t.cells.get(&(i, c.clone())).map_or("", String::as_str))
                .collect();
            out.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                m.device_id(),
                m.kind(),
                m.label,
                cells.join(" | ")
            ));
        }
        out
    }

    /// Removes every real device's VM and waits until each is gone (dropping the fleet
    /// removes them too, in the background): what a test does before a host it placed devices
    /// on goes away. The simulated devices stop with the fleet. Every VM is removed whatever
    /// fails; the first failure is returned.
    pub async fn remove(self) -> Result<(), ScenarioError> {
        let vms = self.members.into_iter().filter_map(|m| match m.device {
            Device::Real(d) => Some(d.vm.remove()),
            Device::Simulated(_) => None,
        });
        join_all(vms)
            .await
            .into_iter()
            .collect::<Result<Vec<()>, _>>()
            .map(|_| ())
            .map_err(ScenarioError::from)
    }

    /// Where the evidence of each failing device was kept (a VM's failure artifacts, a
    /// simulated device's output and state), in the order the failures were found.
    pub fn evidence(&self) -> Vec<std::path::PathBuf> {
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        t.evidence.iter().map(std::path::PathBuf::from).collect()
    }

    /// Ok when every verdict passed for every device; otherwise an error naming each failing
    /// device, what failed and where its evidence is, with the whole table.
    pub fn verdict(&self) -> Result<(), ScenarioError> {
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if t.failures.is_empty() {
            return Ok(());
        }
        let failures: Vec<String> = t
            .failures
            .iter()
            .map(|(i, why)| format!("{}: {}", self.members[*i].device_id(), why.join("; ")))
            .collect();
        drop(t);
        Err(ScenarioError::Check(format!(
            "{} of the fleet's {} devices failed:\n  {}\n{}",
            failures.len(),
            self.members.len(),
            failures.join("\n  "),
            self.table()
        )))
    }
}

/// How many simulated devices the `fleet` trial runs beside the real ones.
pub const FLEET_SIMULATED: usize = 50;
/// How long the `fleet` trial keeps half the fleet cut off and the other half without power.
pub const FLEET_OUTAGE: Duration = Duration::from_secs(30);

/// The real devices of the `fleet` trial: two x86_64 and one aarch64, or two of the one
/// architecture ARCH picks.
pub fn fleet_devices(archs: &[VmArchitecture]) -> Vec<(usize, VmArchitecture)> {
    match archs {
        [one] => vec![(2, *one)],
        _ => vec![(2, VmArchitecture::X86_64), (1, VmArchitecture::Aarch64)],
    }
}

/// The `fleet` trial: the real devices of [`fleet_devices`] and, with a simulator,
/// [`FLEET_SIMULATED`] simulated ones, on one NATS server. Every device reports from this
/// boot; a generation is rolled out to all (an agent with a control part) and converges;
/// then the next one is rolled out while half the real and half the simulated devices are
/// cut off and the other halves lose power at once (a site outage), for [`FLEET_OUTAGE`];
/// power comes back and the network heals; every device converges to it and delivered every
/// report once, in order. Prints the fleet's table; fails naming every failing device.
pub async fn fleet_with(
    lab: &Lab,
    archs: &[VmArchitecture],
    agent: &AgentDescription,
    simulator: Option<Simulator>,
) -> Result<String, ScenarioError> {
    let mut builder = Fleet::of(agent);
    for (count, arch) in fleet_devices(archs) {
        builder = builder.real(count, arch, "site");
    }
    if let Some(simulator) = simulator {
        builder = builder
            .simulated(FLEET_SIMULATED, "sim")
            .simulated_by(simulator);
    }
    let fleet = builder.start(lab).await?;
    let all = fleet.group(Select::All);
    let budget = fleet
        .members
        .iter()
        .map(Member::recovery_budget)
        .max()
        .unwrap_or(SIMULATED_RECOVERY);
    let two_way = agent.control.is_some();
    let first = fleet.reporting(&all, budget).await;
    if two_way {
        fleet.desire(&all, 1, "fleet rollout 1").await;
        fleet.converged(&all, 1, budget).await;
    }
    let marks = fleet.mark(&all, budget).await;
    if two_way {
        fleet.desire(&all, 2, "fleet rollout 2").await;
    }
    let (real_split, real_site) = fleet.group(Select::Real).halves();
    let (sim_split, sim_site) = fleet.group(Select::Simulated).halves();
    let split = real_split.and(&sim_split).named("split");
    let site = real_site.and(&sim_site).named("site outage");
    fleet.partition(&split).await?;
    let cut = match fleet.power_cut(&site).await {
        Ok(cut) => cut,
        Err(e) => {
            let _ = fleet.heal(&split).await;
            return Err(e);
        }
    };
    tokio::time::sleep(FLEET_OUTAGE).await;
    let (recovered, healed) = tokio::join!(fleet.power_on(&cut), fleet.heal(&split));
    healed?;
    let converged = if two_way {
        Some(fleet.converged(&all, 2, budget).await)
    } else {
        None
    };
    let delivered = fleet.delivered(&marks, 3, budget).await;
    let table = fleet.table();
    let summary = format!(
        "fleet of {} ({} real): first reports {first}; site outage of {} devices, stopped \
         within {} ms{}; recovery {recovered}{}; delivery {delivered}",
        fleet.members.len(),
        fleet.group(Select::Real).len(),
        cut.group.len(),
        cut.spread.as_millis(),
        cut.destroy_spread.map_or(String::new(), |d| format!(
            " (VMs destroyed within {} ms)",
            d.as_millis()
        )),
        converged.map_or(String::new(), |c| format!("; generation 2 {c}")),
    );
    eprintln!("{summary}\n{table}");
    fleet.verdict()?;
    Ok(summary)
}

/// Judges a device's reports after `last_before`, across the boots they span (at most
/// `new_boots`: one per power cut): each boot's reports continue without a gap or a repeat
/// ([`judge_delivery`]); a new boot starts its own run, at report #1 for an agent with a
/// counter; a boot seen before never comes back.
pub fn judge_across_boots(
    last_before: &Report,
    after: &[Report],
    new_boots: usize,
) -> Result<(), String> {
    let mut seen = vec![last_before.boot_marker.clone()];
    let mut start = 0;
    let mut prev = last_before.clone();
    while start < after.len() {
        let boot = &after[start].boot_marker;
        let end = after[start..]
            .iter()
            .position(|r| &r.boot_marker != boot)
            .map_or(after.len(), |n| start + n);
        let run = &after[start..end];
        if boot == &prev.boot_marker {
            judge_delivery(&prev, run, (0, 0), Duration::from_secs(1))?;
        } else {
            if seen.contains(boot) {
                return Err(format!(
                    "a report of boot {boot:?} arrived after a newer boot's: out of order"
                ));
            }
            seen.push(boot.clone());
            if seen.len() - 1 > new_boots {
                return Err(format!(
                    "reports from boot {boot:?}: the device booted anew without a power cut \
                     ({new_boots} cut(s) since the mark)"
                ));
            }
            if let Some(first) = run[0].seq.filter(|s| *s != 1) {
                return Err(format!(
                    "boot {boot:?} starts at report #{first}: #1..#{} never arrived",
                    first - 1
                ));
            }
            judge_delivery(&run[0], &run[1..], (0, 0), Duration::from_secs(1))?;
        }
        prev = run[run.len() - 1].clone();
        start = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_goes_to_a_kvm_host_with_a_free_slot_then_to_the_freest() {
        // A KVM host with one free slot beats an emulating one with two.
        assert_eq!(pick(&[2, 1], &[false, true]), Some(1));
        // A KVM host with none free does not.
        assert_eq!(pick(&[2, 0], &[false, true]), Some(0));
        // Among equals in KVM, the most free slots, then the first.
        assert_eq!(pick(&[1, 2], &[false, false]), Some(1));
        assert_eq!(pick(&[2, 2], &[true, true]), Some(0));
        assert_eq!(pick(&[0, 0], &[true, false]), None);
    }

    #[tokio::test]
    async fn placing_takes_the_picked_hosts_slot() {
        let slots = [
            tokio::sync::Semaphore::new(2),
            tokio::sync::Semaphore::new(1),
        ];
        let (at, _held) = place(&slots, &[false, true]).await;
        assert_eq!(at, 1);
        assert_eq!(slots[1].available_permits(), 0);
        let (at, _held) = place(&slots, &[false, true]).await;
        assert_eq!(at, 0, "the KVM host is full: the other one");
    }

    fn report(boot: &str, seq: u64) -> Report {
        Report {
            device_id: "d".into(),
            timestamp_ms: seq,
            boot_marker: Some(boot.into()),
            seq: Some(seq),
            ..Report::default()
        }
    }

    #[test]
    fn each_boot_delivers_its_run_and_no_old_boot_comes_back() {
        let before = report("a", 5);
        let ok = [
            report("a", 6),
            report("a", 7),
            report("b", 1),
            report("b", 2),
        ];
        judge_across_boots(&before, &ok, 1).unwrap();
        // What the old boot had not sent when the power went is lost, not a gap.
        judge_across_boots(&before, &[report("b", 1), report("b", 2)], 1).unwrap();
        let fails = |after: &[Report], new_boots: usize, why: &str| {
            let e = judge_across_boots(&before, after, new_boots).unwrap_err();
            assert!(e.contains(why), "{e}");
        };
        fails(
            &[report("a", 6), report("b", 1), report("b", 3)],
            1,
            "never arrived",
        );
        fails(&[report("b", 1), report("a", 6)], 2, "out of order");
        fails(&[report("a", 6), report("a", 6)], 0, "repeated");
        // A device that was not cut must not come back from another boot.
        fails(&ok, 0, "without a power cut");
        // A new boot's opening reports must be there.
        fails(&[report("b", 3), report("b", 4)], 1, "#1..#2 never arrived");
    }

    #[test]
    fn groups_split_and_join_in_the_fleets_order() {
        let g = Group {
            name: "real".into(),
            members: vec![0, 1, 2],
        };
        let (a, b) = g.halves();
        assert_eq!(
            (a.members.clone(), b.members.clone()),
            (vec![0], vec![1, 2])
        );
        assert_eq!(b.and(&a).members, vec![0, 1, 2]);
        assert_eq!(g.first(2).members, vec![0, 1]);
        assert_eq!(g.first(9).len(), 3);
    }
}
