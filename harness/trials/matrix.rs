//! The trial matrix for any agent — {e2e, power_cycle, partition, update} × {x86_64, aarch64},
//! and a `fleet` across both — as libtest-mimic trials, so `cargo test`, `cargo nextest` and
//! their filters see one test per cell. A user's `harness = false` test target is a few lines:
//!
//! ```no_run
//! fn my_agent() -> devicelab::description::AgentDescription {
//!     devicelab::reference::agent() // yours
//! }
//! fn main() {
//!     devicelab::trials::Matrix::new(cfg!(feature = "e2e"))
//!         .agent("", my_agent, &devicelab::trials::Scenario::ALL)
//!         .run()
//! }
//! ```
//!
//! The trials boot VMs, so they run only when asked: `opted_in` (the caller's own e2e feature),
//! or ARCH set (which also restricts them to that architecture). Otherwise they are listed as
//! ignored.

use crate::agent::description::AgentDescription;
use crate::config::HarnessConfig;
use crate::lab::Lab;
use crate::model::arch::VmArchitecture;
use crate::trials::fleet;
use crate::trials::scenario;
use crate::trials::simulated::Simulator;
use libtest_mimic::{Arguments, Failed, Trial};
use std::fmt;

/// One column of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Provision, onboard twice (the second run changes nothing), first report from this boot.
    E2e,
    /// E2e, then pull the plug: a report from the new boot, and SSH back (two verdicts).
    PowerCycle,
    /// A reporting device (warm) cut off for longer than both keep-alives, then healed: every
    /// report arrives once, in order, and reporting resumes (`outage`).
    Partition,
    /// For an agent with a control part: converge to generation 1, then pull the plug on the
    /// device's own "applying 2" report; it comes back reporting 1 or 2 (never torn, never
    /// nothing), usable, and converges to 2 (`update`).
    Update,
    /// Real devices of both architectures (two of ARCH's with ARCH set) and, for a row with a
    /// simulator ([`Matrix::simulated_by`]), simulated ones, on one NATS server: a rollout
    /// through a split and a site outage; every device converges and delivers once
    /// (`fleet`). One trial per agent, named `[<agent>::]fleet`.
    Fleet,
}

impl Scenario {
    /// Every scenario: pass it to [`Matrix::agent`] to run them all.
    /// ([`Scenario::Update`] is listed only for an agent whose description has a control
    /// part.)
    pub const ALL: [Scenario; 5] = [
        Scenario::E2e,
        Scenario::PowerCycle,
        Scenario::Partition,
        Scenario::Update,
        Scenario::Fleet,
    ];
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::E2e => "e2e",
            Self::PowerCycle => "power_cycle",
            Self::Partition => "partition",
            Self::Update => "update",
            Self::Fleet => "fleet",
        })
    }
}

/// How a matrix gets its agent: a function, so each trial (its own process under nextest)
/// builds the description afresh.
pub type AgentFn = fn() -> AgentDescription;

/// How a matrix row gets the simulator of its fleet's simulated devices.
pub type SimulatorFn = fn() -> Simulator;

struct Row {
    prefix: String,
    agent: AgentFn,
    scenarios: Vec<Scenario>,
    simulator: Option<SimulatorFn>,
}

/// The trials of one or more agents.
pub struct Matrix {
    opted_in: bool,
    rows: Vec<Row>,
}

impl Matrix {
    /// `opted_in`: the VM trials run (pass your crate's `cfg!(feature = "e2e")`); setting
    /// ARCH opts in too.
    pub fn new(opted_in: bool) -> Self {
        Self {
            opted_in,
            rows: Vec::new(),
        }
    }

    /// `agent`'s `scenarios` on every architecture, named `<prefix>::<scenario>::<arch>`
    /// (`<scenario>::<arch>` with an empty prefix).
    pub fn agent(mut self, prefix: &str, agent: AgentFn, scenarios: &[Scenario]) -> Self {
        self.rows.push(Row {
            prefix: prefix.to_owned(),
            agent,
            scenarios: scenarios.to_vec(),
            simulator: None,
        });
        self
    }

    /// The last row's agent as a simulated device (a host process): its `fleet` trial runs
    /// simulated devices beside the real ones (without one, real devices only).
    pub fn simulated_by(mut self, simulator: SimulatorFn) -> Self {
        if let Some(row) = self.rows.last_mut() {
            row.simulator = Some(simulator);
        }
        self
    }

    /// The trials, with the reason each one is ignored, if it is.
    pub fn trials(&self, config: &HarnessConfig) -> Vec<Trial> {
        let opted_in = self.opted_in || config.arch_filter.is_some();
        let mut trials = Vec::new();
        let name = |prefix: &str, cell: String| {
            if prefix.is_empty() {
                cell
            } else {
                format!("{prefix}::{cell}")
            }
        };
        for arch in VmArchitecture::ALL {
            for row in &self.rows {
                let two_way = (row.agent)().control.is_some();
                for &scenario in &row.scenarios {
                    if (scenario == Scenario::Update && !two_way) || scenario == Scenario::Fleet {
                        continue;
                    }
                    let ignored = !opted_in || config.arch_filter.is_some_and(|a| a != arch);
                    let agent = row.agent;
                    trials.push(
                        Trial::test(
                            name(&row.prefix, format!("{scenario}::{arch}")),
                            move || run(agent, scenario, arch),
                        )
                        .with_ignored_flag(ignored),
                    );
                }
            }
        }
        // A fleet is one trial across the architectures (ARCH's alone, if set).
        let archs: Vec<VmArchitecture> = match config.arch_filter {
            Some(a) => vec![a],
            None => VmArchitecture::ALL.to_vec(),
        };
        for row in &self.rows {
            if row.scenarios.contains(&Scenario::Fleet) {
                let (agent, simulator, archs) = (row.agent, row.simulator, archs.clone());
                trials.push(
                    Trial::test(name(&row.prefix, "fleet".into()), move || {
                        run_fleet(agent, simulator, &archs)
                    })
                    .with_ignored_flag(!opted_in),
                );
            }
        }
        trials
    }

    /// Parses the test harness's arguments, runs the trials and exits with their status.
    pub fn run(self) -> ! {
        let mut args = Arguments::from_args();
        let config = match HarnessConfig::from_env() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("devicelab: {e}");
                std::process::exit(2);
            }
        };
        // Two emulated VMs on a small host slow each other past their budgets: one at a time
        // unless asked otherwise (nextest runs each trial in its own process).
        if args.test_threads.is_none() {
            args.test_threads = Some(1);
        }
        if !args.list && !self.opted_in && config.arch_filter.is_none() {
            eprintln!(
                "devicelab: VM trials are ignored: build with --features e2e, or set ARCH=x86_64|aarch64"
            );
        }
        libtest_mimic::run(&args, self.trials(&config)).exit()
    }
}

fn run(agent: AgentFn, scenario: Scenario, arch: VmArchitecture) -> Result<(), Failed> {
    on_a_runtime(async {
        let lab = Lab::from_env().await.map_err(|e| e.to_string())?;
        let description = agent();
        let result = match scenario {
            Scenario::E2e => scenario::e2e_with(&lab, arch, &description).await,
            Scenario::PowerCycle => scenario::power_cycle_with(&lab, arch, &description).await,
            Scenario::Partition => {
                crate::trials::outage::partition_with(&lab, arch, &description).await
            }
            Scenario::Update => crate::trials::update::update_with(&lab, arch, &description).await,
            Scenario::Fleet => unreachable!("a fleet is its own trial"),
        };
        let agent = &description.name;
        match result {
            Ok(timings) => {
                eprintln!("{agent} {scenario}::{arch} passed; phases: {timings}");
                Ok(())
            }
            Err(e) => Err(Failed::from(format!("{agent} {scenario}::{arch}: {e}"))),
        }
    })
}

fn run_fleet(
    agent: AgentFn,
    simulator: Option<SimulatorFn>,
    archs: &[VmArchitecture],
) -> Result<(), Failed> {
    on_a_runtime(async {
        let lab = Lab::from_env().await.map_err(|e| e.to_string())?;
        let description = agent();
        let agent = &description.name;
        if simulator.is_none() {
            eprintln!(
                "{agent} fleet: real devices only (the matrix row gives no simulator: \
                 Matrix::simulated_by)"
            );
        }
        match fleet::fleet_with(&lab, archs, &description, simulator.map(|s| s())).await {
            Ok(summary) => {
                eprintln!("{agent} fleet passed: {summary}");
                Ok(())
            }
            Err(e) => Err(Failed::from(format!("{agent} fleet: {e}"))),
        }
    })
}

fn on_a_runtime(
    trial: impl std::future::Future<Output = Result<(), Failed>>,
) -> Result<(), Failed> {
    crate::init_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failed::from(format!("no tokio runtime: {e}")))?;
    runtime.block_on(trial)
}
