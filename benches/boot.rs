//! The boot benchmark: what a device test costs, phase by phase, against a bare baseline.
//!
//!     cargo bench --bench boot                         # both architectures, 3 runs
//!     BENCH_RUNS=1 ARCH=aarch64 cargo bench --bench boot
//!
//! Per architecture, `BENCH_RUNS` times: the reference agent's power-cycle trial (provision →
//! onboard twice → first status → pull the plug → status from the new boot), and a bare
//! baseline on the same image, the same domain XML and the same cloud-config: define, start,
//! poll the lease and TCP 22 every 100 ms, then `ssh true` with the OpenSSH client (retried
//! every 100 ms until it logs in), then `cloud-init status --wait` and QEMU's resident memory.
//! Then a warm start (`Start::Warm`): the saved VM is built once before the runs (not
//! measured); each run restores a clone and records restore → SSH and the whole request.
//! The harness's own overhead is the ratio of its time to SSH to the baseline's. With
//! `BENCH_REMOTE_URI` set to a libvirt host reached over SSH (`qemu+ssh://…`), each run also
//! runs the same trial there, right after the local one, and records the ratio of the two
//! trials' wall times: the transport's overhead. Prints a table (min / median / max per phase)
//! and writes `target/devicelab-bench/boot.json`; says how busy the host was (load average
//! before and after).
//!
//!     BENCH_RUNS=1 ARCH=x86_64 BENCH_REMOTE_URI='qemu+ssh://ci@kvm-server/system' cargo bench --bench boot
//!
//! With `BENCH_KNOBS=1` it measures only what each QEMU knob of an emulated aarch64 guest
//! (`host::qemu_probe::AARCH64_TCG_KNOBS`) buys: per run, the bare baseline with every knob the
//! host's QEMU accepts, without each one in turn, and with none.
//!
//!     BENCH_KNOBS=1 BENCH_RUNS=1 cargo bench --bench boot
//!
//! With `BENCH_COLD_BUILD=1` it measures only what a new user's first build costs: per run,
//! `cargo build --workspace --all-targets` into a target directory of its own
//! (`target/devicelab-bench/cold-build`, emptied before and removed after, also when the build
//! fails), with the crates already downloaded (`--offline --locked`: the registry's cache is not
//! the build) and no compiler cache (`RUSTC_WRAPPER` and its kin unset for it). No VM is
//! booted; the report goes to `target/devicelab-bench/cold-build.json`.
//!
//!     BENCH_COLD_BUILD=1 BENCH_RUNS=1 cargo bench --bench boot

use devicelab::VirtualMachineSpec;
use devicelab::host::qemu_probe::AARCH64_TCG_KNOBS;
use devicelab::{Lab, VmArchitecture, trials::scenario, vm::run};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Default, Serialize)]
struct Report {
    runs_per_arch: usize,
    load_before: String,
    load_after: String,
    /// Per architecture, per phase: every run's seconds.
    phases: BTreeMap<String, BTreeMap<String, Vec<f64>>>,
}

/// Seconds from the define to each point of the bare boot.
struct Bare {
    lease: f64,
    port_22: f64,
    ssh: f64,
    cloud_init: f64,
    qemu_rss_mib: Option<f64>,
}

const POLL: Duration = Duration::from_millis(100);

fn main() {
    devicelab::init_logging();
    let runs: usize =
        match std::env::var("BENCH_RUNS") {
            Err(_) => 3,
            Ok(v) => v.parse().ok().filter(|n| *n > 0).unwrap_or_else(|| {
                panic!("BENCH_RUNS={v:?}: give a whole number of runs, 1 or more")
            }),
        };
    // `cargo bench` passes `--bench`; a filter, if any, is not ours to read.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/devicelab-bench");
    let (report, file) = if std::env::var("BENCH_COLD_BUILD").is_ok_and(|v| v == "1") {
        (cold_build(runs, &dir.join("cold-build")), "cold-build.json")
    } else {
        let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
        (rt.block_on(bench(runs)), "boot.json")
    };
    print_table(&report);
    std::fs::create_dir_all(&dir).expect("target/devicelab-bench");
    let path = dir.join(file);
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(&report).expect("serializes"),
    )
    .expect("write the report");
    println!("\nwritten: {}", path.display());
}

async fn bench(runs: usize) -> Report {
    let lab = Lab::from_env().await.unwrap_or_else(|e| panic!("{e}"));
    let remote = match std::env::var("BENCH_REMOTE_URI") {
        Ok(uri) if !uri.is_empty() => {
            let mut config = lab.config.clone();
            config.libvirt_uri = uri;
            Some(
                Lab::new(config)
                    .await
                    .unwrap_or_else(|e| panic!("BENCH_REMOTE_URI: {e}")),
            )
        }
        _ => None,
    };
    let archs: Vec<VmArchitecture> = match lab.config.arch_filter {
        Some(a) => vec![a],
        None => VmArchitecture::ALL.to_vec(),
    };
    let mut report = Report {
        runs_per_arch: runs,
        load_before: load(),
        ..Default::default()
    };
    if std::env::var("BENCH_KNOBS").is_ok_and(|v| v == "1") {
        if lab
            .config
            .arch_filter
            .is_some_and(|a| a != VmArchitecture::Aarch64)
        {
            panic!("BENCH_KNOBS measures aarch64's QEMU knobs: unset ARCH, or set ARCH=aarch64");
        }
        knobs(&lab, runs, &mut report).await;
        report.load_after = load();
        return report;
    }
    for arch in archs {
        eprintln!("bench: {arch}: building the saved VM for the warm starts (once, not measured)");
        warm_vm(&lab, arch).await;
        let phases = report.phases.entry(arch.name().to_owned()).or_default();
        for run in 1..=runs {
            eprintln!("bench: {arch} run {run}/{runs}: bare baseline");
            let bare = bare_baseline(&lab, arch, &format!("bare{run}"), None).await;
            let mut add =
                |phase: &str, secs: f64| phases.entry(phase.to_owned()).or_default().push(secs);
            add("bare: define → lease", bare.lease);
            add("bare: define → port 22", bare.port_22);
            add("bare: define → ssh true", bare.ssh);
            add("bare: define → cloud-init done", bare.cloud_init);
            if let Some(rss) = bare.qemu_rss_mib {
                add("QEMU RSS at cloud-init done (MiB)", rss);
            }
            eprintln!("bench: {arch} run {run}/{runs}: the power-cycle trial");
            let trial_started = Instant::now();
            let timings = scenario::power_cycle(&lab, arch)
                .await
                .unwrap_or_else(|e| panic!("{arch} power cycle: {e}"));
            let local_trial = trial_started.elapsed().as_secs_f64();
            add("harness: the whole trial", local_trial);
            let t: BTreeMap<String, f64> = timings
                .entries()
                .into_iter()
                .map(|(p, d)| (p, d.as_secs_f64()))
                .collect();
            for (phase, secs) in &t {
                add(&format!("harness: {phase}"), *secs);
            }
            if let Some(ssh) = t.get("ssh") {
                add("ratio: harness time to SSH ÷ bare", ssh / bare.ssh);
            }
            if let Some(remote) = &remote {
                eprintln!(
                    "bench: {arch} run {run}/{runs}: the power-cycle trial on the remote host"
                );
                let started = Instant::now();
                let timings = scenario::power_cycle(remote, arch)
                    .await
                    .unwrap_or_else(|e| panic!("{arch} power cycle on the remote host: {e}"));
                let remote_trial = started.elapsed().as_secs_f64();
                for (phase, d) in timings.entries() {
                    add(&format!("remote: {phase}"), d.as_secs_f64());
                }
                add("remote: the whole trial", remote_trial);
                add(
                    "ratio: remote trial ÷ local trial",
                    remote_trial / local_trial,
                );
            }
            eprintln!("bench: {arch} run {run}/{runs}: a warm start");
            let (parts, whole) = warm_vm(&lab, arch).await;
            for (part, secs) in parts {
                let part = part.strip_prefix("warm ").unwrap_or(&part);
                add(&format!("warm: {part}"), secs);
            }
            add("warm: request → ready VM", whole);
        }
    }
    report.load_after = load();
    report
}

/// A warm VM of the default request: (restore → SSH and each of its parts, request → ready)
/// in seconds; removed.
async fn warm_vm(lab: &Arc<Lab>, arch: VmArchitecture) -> (Vec<(String, f64)>, f64) {
    let started = Instant::now();
    let vm = lab
        .vm(
            VirtualMachineSpec::new(lab.vm_name("bench-warm", arch), arch)
                .with_start(devicelab::model::spec::Start::Warm),
        )
        .await
        .unwrap_or_else(|e| panic!("{arch} warm start: {e}"));
    let whole = started.elapsed().as_secs_f64();
    let parts = vm
        .timings
        .entries()
        .into_iter()
        .filter(|(p, _)| p.starts_with("warm restore"))
        .map(|(p, d)| (p, d.as_secs_f64()))
        .collect();
    vm.remove().await.unwrap_or_else(|e| panic!("{e}"));
    (parts, whole)
}

/// The workspace's every target built `runs` times from nothing into `target_dir` (emptied
/// before each run, removed after): seconds per run, under "host".
fn cold_build(runs: usize, target_dir: &std::path::Path) -> Report {
    let mut report = Report {
        runs_per_arch: runs,
        load_before: load(),
        ..Default::default()
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut times = Vec::new();
    for run in 1..=runs {
        empty(target_dir);
        eprintln!(
            "bench: cold build run {run}/{runs}: cargo build --workspace --all-targets --offline --locked into {}",
            target_dir.display()
        );
        let started = Instant::now();
        // A compiler cache or a shared build directory would make the build warm.
        let status = std::process::Command::new(&cargo)
            .args([
                "build",
                "--workspace",
                "--all-targets",
                "--offline",
                "--locked",
            ])
            .arg("--manifest-path")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
            .env("CARGO_TARGET_DIR", target_dir)
            .env_remove("RUSTC_WRAPPER")
            .env_remove("CARGO_BUILD_RUSTC_WRAPPER")
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .env_remove("CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER")
            .env_remove("CARGO_BUILD_BUILD_DIR")
            .env_remove("CARGO_BUILD_TARGET")
            .status()
            .unwrap_or_else(|e| panic!("cannot run cargo ({cargo:?}): {e}"));
        let secs = started.elapsed().as_secs_f64();
        if !status.success() {
            empty(target_dir);
            panic!(
                "the cold build failed ({status}): its output is above; with `--offline \
                 --locked`, run `cargo fetch` first if a crate is missing"
            );
        }
        times.push(secs);
    }
    empty(target_dir);
    report.phases.entry("host".to_owned()).or_default().insert(
        "cold cargo build --workspace --all-targets (s)".to_owned(),
        times,
    );
    report.load_after = load();
    report
}

/// Removes `dir` and everything in it, if it is there: a build into what is left would not be
/// cold.
fn empty(dir: &std::path::Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("cannot empty {}: {e}: remove it by hand", dir.display()),
    }
}

/// The aarch64 bare baseline `runs` times with each set of knobs: every knob the host's QEMU
/// accepts, each left out in turn, and none.
async fn knobs(lab: &Arc<Lab>, runs: usize, report: &mut Report) {
    let arch = VmArchitecture::Aarch64;
    let all = lab.qemu_args(arch).await.unwrap_or_else(|e| panic!("{e}"));
    if all.is_empty() {
        panic!(
            "BENCH_KNOBS: this host's QEMU takes none of the aarch64 TCG knobs (or runs aarch64 under KVM)"
        );
    }
    let mut variants = vec![("every knob".to_owned(), all.clone())];
    for knob in AARCH64_TCG_KNOBS {
        let without: Vec<String> = all
            .chunks(2)
            .filter(|pair| *pair != knob.args)
            .flatten()
            .cloned()
            .collect();
        if without.len() < all.len() {
            variants.push((format!("without {}", knob.args.join(" ")), without));
        }
    }
    variants.push(("no knob".to_owned(), Vec::new()));
    let phases = report.phases.entry(arch.name().to_owned()).or_default();
    for run in 1..=runs {
        for (i, (variant, args)) in variants.iter().enumerate() {
            eprintln!("bench: {arch} run {run}/{runs}: bare baseline, {variant}: {args:?}");
            let bare =
                bare_baseline(lab, arch, &format!("knobs{run}-{i}"), Some(args.clone())).await;
            let mut add = |phase: &str, secs: f64| {
                phases
                    .entry(format!("{variant}: {phase}"))
                    .or_default()
                    .push(secs)
            };
            add("define → ssh true", bare.ssh);
            add("define → cloud-init done", bare.cloud_init);
        }
    }
}

/// The same plan the harness boots (image, XML, cloud-config), with none of its waits: the
/// domain is defined and started, and the clock runs from there. `qemu_args`, if given,
/// replaces the plan's extra QEMU arguments.
async fn bare_baseline(
    lab: &Arc<Lab>,
    arch: VmArchitecture,
    name: &str,
    qemu_args: Option<Vec<String>>,
) -> Bare {
    let name = lab.vm_name(name, arch);
    let spec = VirtualMachineSpec::new(&name, arch).with_provisioning_flush(false);
    let mut plan = lab.plan(spec).await.unwrap_or_else(|e| panic!("{e}"));
    plan.waits.clear();
    if let Some(args) = qemu_args {
        plan.qemu_args = args;
    }
    let started = Instant::now();
    let vm = run::run(plan).await.unwrap_or_else(|e| panic!("{e}"));
    let lv = lab.libvirt.clone();
    let ip = loop {
        let n = name.clone();
        let lease = lv
            .run(move |lv| lv.lease_ipv4(&lv.domain(&n)?, &n))
            .await
            .ok()
            .flatten();
        if let Some(ip) = lease {
            break ip;
        }
        tokio::time::sleep(POLL).await;
    };
    let lease = started.elapsed().as_secs_f64();
    let port_22 = poll_port(ip, started).await;
    let ssh = |command: &'static str| {
        let key = lab.client_key.path.clone();
        async move {
            tokio::process::Command::new("ssh")
                .arg("-i")
                .arg(&key)
                .args([
                    "-o",
                    "StrictHostKeyChecking=no",
                    "-o",
                    "UserKnownHostsFile=/dev/null",
                ])
                .args([
                    "-o",
                    "BatchMode=yes",
                    "-o",
                    "ConnectTimeout=5",
                    "-o",
                    "LogLevel=ERROR",
                ])
                .arg(format!("devicelab@{ip}"))
                .arg(command)
                .status()
                .await
                .is_ok_and(|s| s.success())
        }
    };
    while !ssh("true").await {
        tokio::time::sleep(POLL).await;
    }
    let ssh_at = started.elapsed().as_secs_f64();
    ssh("cloud-init status --wait >/dev/null; true").await;
    let cloud_init = started.elapsed().as_secs_f64();
    let rss = qemu_rss_mib(&name);
    vm.remove().await.unwrap_or_else(|e| panic!("{e}"));
    Bare {
        lease,
        port_22,
        ssh: ssh_at,
        cloud_init,
        qemu_rss_mib: rss,
    }
}

async fn poll_port(ip: Ipv4Addr, started: Instant) -> f64 {
    let addr = SocketAddr::new(ip.into(), 22);
    loop {
        let open =
            tokio::task::spawn_blocking(move || TcpStream::connect_timeout(&addr, POLL).is_ok())
                .await
                .unwrap_or(false);
        if open {
            return started.elapsed().as_secs_f64();
        }
        tokio::time::sleep(POLL).await;
    }
}

/// QEMU's resident memory for domain `name` (libvirt's pid file for it).
fn qemu_rss_mib(name: &str) -> Option<f64> {
    let pid = std::fs::read_to_string(format!("/run/libvirt/qemu/{name}.pid")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

fn load() -> String {
    let avg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "{} on {cores} cores",
        avg.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    )
}

fn print_table(report: &Report) {
    println!(
        "\nboot benchmark: {} run(s) per architecture (or of the cold build)",
        report.runs_per_arch
    );
    println!(
        "host load (1, 5, 15 min): before {}, after {}",
        report.load_before, report.load_after
    );
    for (arch, phases) in &report.phases {
        println!("\n{arch:<48} {:>8} {:>8} {:>8}", "min", "median", "max");
        for (phase, values) in phases {
            let mut v = values.clone();
            v.sort_by(f64::total_cmp);
            let median = v[v.len() / 2];
            println!(
                "{phase:<48} {:>8.2} {median:>8.2} {:>8.2}",
                v[0],
                v[v.len() - 1]
            );
        }
    }
}
