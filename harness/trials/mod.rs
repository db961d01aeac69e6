//! The trials: an onboarded device and the power-cycle story with its verdicts ([`scenario`]),
//! riding out a network partition ([`outage`]), the power-cut sweep ([`power_cut`]), the
//! harness as the device's control plane ([`control`]), power cuts during an update
//! ([`update`]) and during an update of the agent itself ([`agent_update`]), a fleet of real
//! and simulated devices ([`fleet`], [`simulated`]), and the matrix
//! that runs them for any agent on each architecture ([`matrix`]).

pub mod agent_update;
pub mod control;
pub mod error;
pub mod fleet;
pub mod matrix;
pub mod outage;
pub mod power_cut;
pub mod scenario;
pub mod simulated;
pub mod update;

pub use control::{ControlPlane, Converged, Desire};
pub use fleet::{Fleet, FleetBuilder, Group, Select};
pub use matrix::{AgentFn, Matrix, Scenario};
pub use scenario::OnboardedDevice;
pub use simulated::{SimulatedDevice, Simulator};
pub use update::{ApplyCut, ArmedCut, CutWhen, Fired, StateFile, Trigger};
