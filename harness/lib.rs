//! devicelab: prove an on-device agent works on the real target. Boots real cloud images as
//! libvirt VMs of the real architecture, onboards the agent over SSH, watches it report to
//! NATS, and pulls the plug to see it come back.
//!
//! The pieces mirror testcontainers: an image ([`image`]), a request ([`spec`]), the lab that
//! resolves a request into a plan ([`lab::Lab`]), a runner that carries it out ([`runner`]), a
//! handle ([`vm::Vm`]) removed by [`teardown`], and wait strategies ([`waits`]).

pub mod agent;
pub mod config;
pub mod fixtures;
pub mod host;
pub mod image;
pub mod lab;
pub mod model;
pub mod nats;
pub mod ssh;
pub mod support;
pub mod trials;
pub mod vm;

pub use lab::Lab;
pub use model::arch::VmArchitecture;
pub use model::spec::VirtualMachineSpec;
pub use vm::Vm;

/// rustls needs one process-wide crypto provider before the first TLS connection.
pub fn install_crypto_provider() {
    let _ = async_nats::rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Logs through the test harness's output capture (libtest keeps each test's log and shows it
/// with a failure; nextest keeps it per test anyway), filtered by RUST_LOG (default: info for
/// devicelab). Idempotent: a test that `test-log` set up keeps its own subscriber.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("devicelab=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}
