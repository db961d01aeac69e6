//! acme's device tests: the whole {e2e, power_cycle, partition, update} × {x86_64, aarch64}
//! matrix for the acme agent. `cargo nextest run -p acme-device-tests --features e2e`
//! (ARCH=x86_64 for one arch).

mod acme;

use devicelab::trials::{Matrix, Scenario};

fn main() {
    Matrix::new(cfg!(feature = "e2e"))
        .agent("acme", acme::agent, &Scenario::ALL)
        .simulated_by(acme::simulator)
        .run()
}
