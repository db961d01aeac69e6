//! The end-to-end matrix: {e2e, power_cycle} × {x86_64, aarch64}, as libtest-mimic trials so
//! `cargo test`, `cargo nextest` and their filters see one test per cell.
//!
//! The trials boot VMs, so they run only when asked: built with `--features e2e`, or with ARCH
//! set (which also restricts them to that architecture). Otherwise they are listed as ignored.

use devicelab::config::HarnessConfig;
use devicelab::{Lab, VmArchitecture, scenario};
use libtest_mimic::{Arguments, Failed, Trial};

const SCENARIOS: [&str; 2] = ["e2e", "power_cycle"];

fn main() {
    let mut args = Arguments::from_args();
    let config = match HarnessConfig::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("devicelab: {e}");
            std::process::exit(2);
        }
    };
    // Two emulated VMs on a small host slow each other past their budgets: one at a time
    // unless asked otherwise (nextest runs each trial in its own process and uses test groups).
    if args.test_threads.is_none() {
        args.test_threads = Some(1);
    }
    let opted_in = cfg!(feature = "e2e") || config.arch_filter.is_some();
    let mut trials = Vec::new();
    for arch in VmArchitecture::ALL {
        for scenario in SCENARIOS {
            let skip_reason = if !opted_in {
                Some("VM trials run with --features e2e or ARCH=<arch>".to_owned())
            } else if config.arch_filter.is_some_and(|a| a != arch) {
                Some(format!(
                    "ARCH restricts the trials to {}",
                    config.arch_filter.unwrap()
                ))
            } else {
                None
            };
            let name = format!("{scenario}::{arch}");
            trials.push(
                Trial::test(name, move || run(scenario, arch))
                    .with_ignored_flag(skip_reason.is_some()),
            );
        }
    }
    if !args.list && !opted_in {
        eprintln!(
            "devicelab: VM trials are ignored: build with --features e2e, or set ARCH=x86_64|aarch64"
        );
    }
    libtest_mimic::run(&args, trials).exit();
}

fn run(scenario: &'static str, arch: VmArchitecture) -> Result<(), Failed> {
    devicelab::init_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let lab = Lab::from_env().await.map_err(|e| e.to_string())?;
        let result = match scenario {
            "e2e" => scenario::e2e(&lab, arch).await,
            _ => scenario::power_cycle(&lab, arch).await,
        };
        match result {
            Ok(timings) => {
                eprintln!("{scenario}::{arch} passed; phases: {timings}");
                Ok(())
            }
            Err(e) => Err(Failed::from(format!("{scenario}::{arch}: {e}"))),
        }
    })
}
