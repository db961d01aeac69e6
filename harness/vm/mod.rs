//! A VM from plan to removal: the [`plan`] a request resolves to, carried out by [`run`] (a VM
//! slot, then a [`cold`] boot or a [`warm`] restore, both through the one skeleton in
//! [`start`]); the handle ([`handle`]) with its wait verbs ([`waits`]) and fault verbs
//! ([`faults`]); its cloud-init [`seed`], serial [`console`], kept [`artifacts`], and
//! [`teardown`]. Every error is a [`VmError`] ([`error`]).
//!
//! Never imports `lab`, `agent`, `nats` or `trials`.

pub mod artifacts;
pub mod cold;
pub mod console;
pub mod error;
pub mod faults;
pub mod handle;
pub mod plan;
pub mod run;
pub mod seed;
pub mod start;
pub mod teardown;
pub mod waits;
pub mod warm;

pub use error::{VmError, WarmError};
pub use handle::{PhaseTimings, PowerCut, Vm};
