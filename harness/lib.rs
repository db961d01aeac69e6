//! devicelab: prove an on-device agent works on the real target. It boots real cloud images
//! as libvirt VMs of the real architecture (x86_64, and aarch64 emulated), onboards your agent
//! over SSH, watches it report to a NATS server, and pulls the plug to see it come back.
//!
//! A test asks a [`Lab`] for a VM described by a [`VirtualMachineSpec`] and gets a [`Vm`]
//! handle: verbs in the style of the NixOS test driver ([`Vm::succeed`], [`Vm::fail`],
//! [`Vm::wait_until_succeeds`], [`Vm::power_cycle`]), the faults a field device meets
//! ([`Vm::partition`], [`Vm::freeze`], [`Vm::fill_disk`], ...), and removal when it is dropped,
//! whatever way the test ends. The [`fixtures`] compose these for `#[rstest]` tests; the
//! [`Matrix`] runs the [`trials`] for your own agent, described by an
//! [`AgentDescription`](description::AgentDescription), on each architecture.
//!
//! ```no_run
//! use devicelab::{Lab, VirtualMachineSpec, VmArchitecture};
//!
//! # async fn story() -> Result<(), Box<dyn std::error::Error>> {
//! let lab = Lab::from_env().await?;
//! let spec = VirtualMachineSpec::new(&lab.vm_name("story", VmArchitecture::X86_64), VmArchitecture::X86_64);
//! let vm = lab.vm(spec).await?;
//! vm.succeed("echo hello > /tmp/greeting").await?;
//! vm.flush().await?; // what must survive the cut
//! vm.power_cycle().await?;
//! assert_eq!(vm.succeed("cat /tmp/greeting").await?.trim(), "hello");
//! vm.remove().await?;
//! # Ok(())
//! # }
//! ```
//!
//! The guide is in the repository's `docs/`; how the crate is laid out is in `ARCHITECTURE.md`.

#![warn(missing_docs)]

// The layers, bottom to top (ARCHITECTURE.md). What a test is written with is re-exported
// below; the rest of a layer is not API (the CLI and this crate's own tests reach into it).
pub mod agent;
#[doc(hidden)]
pub mod config;
pub mod fixtures;
#[doc(hidden)]
pub mod host;
#[doc(hidden)]
pub mod image;
#[doc(hidden)]
pub mod lab;
#[doc(hidden)]
pub mod model;
pub mod nats;
#[doc(hidden)]
pub mod ssh;
#[doc(hidden)]
pub mod support;
pub mod trials;
#[doc(hidden)]
pub mod vm;

pub use agent::description;
pub use agent::reference;
pub use lab::{Lab, LabError, LabNatsError};
pub use model::arch::{Accelerator, Budgets, VmArchitecture};
pub use model::spec::{FirstBootConfig, Readiness, SpecError, Start, VirtualMachineSpec};
pub use model::wait::Wait;
pub use nats::{NatsServer, ReportLog};
pub use ssh::ExecOutput;
pub use trials::{Fleet, Matrix, OnboardedDevice, Scenario};
pub use vm::faults::BadLink;
pub use vm::{PhaseTimings, PowerCut, Vm, VmError};

/// rustls needs one process-wide crypto provider before the first TLS connection.
pub fn install_crypto_provider() {
    let _ = async_nats::rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Logs through the test harness's output capture (libtest keeps each test's log and shows it
/// with a failure; nextest keeps it per test anyway), filtered by RUST_LOG (default: info for
/// devicelab). Colours only when stderr is a terminal: a CI log or a JUnit report gets plain
/// text. Idempotent: a test that `test-log` set up keeps its own subscriber.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("devicelab=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
