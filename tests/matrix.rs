//! The end-to-end matrix: {e2e, power_cycle, partition, update} × {x86_64, aarch64} for the
//! reference agent, and {e2e, power_cycle, partition} for a second agent described through the
//! public API (`heartbeat::…`: it has no control part, so no `update`). Built
//! by the same helper a user's crate calls (`devicelab::trials::Matrix`).
//!
//! The trials boot VMs, so they run only when asked: built with `--features e2e`, or with ARCH
//! set (which also restricts them to that architecture). Otherwise they are listed as ignored.

mod agents;

use devicelab::trials::{Matrix, Scenario};

fn main() {
    Matrix::new(cfg!(feature = "e2e"))
        .agent("", devicelab::reference::agent, &Scenario::ALL)
        .simulated_by(devicelab::trials::simulated::reference)
        .agent("heartbeat", agents::heartbeat, &Scenario::ALL)
        .run()
}
