//! The fleet benchmark: many simulated devices on one host, what each costs, and whether every
//! report is stored once, in order.
//!
//!     cargo bench --bench fleet                                  # 500 devices, 60 s
//!     BENCH_DEVICES=100 BENCH_SECONDS=20 cargo bench --bench fleet
//!     BENCH_REAL=3 BENCH_DEVICES=20 cargo bench --bench fleet     # with 3 real devices
//!
//! Starts a NATS server on 127.0.0.1 (DEVICELAB_NATS says how) and `BENCH_DEVICES` simulated
//! devices of the reference agent (each its own host process, its own NATS user and its own
//! link), reporting every second. Once all report, it measures `BENCH_SECONDS`: the reports
//! stored (against one per device per second), each device's delivery verdict (every report
//! once, in order), and the host CPU time and resident memory of the agents' processes, per
//! device, and of the NATS server in process mode. With `BENCH_REAL` real devices (VMs of
//! x86_64, or ARCH's) in the fleet, it then cuts their power at once and prints the spread
//! (first to last stop, and first to last `destroy`) and their recovery. Says how busy the
//! host was.

use devicelab::config::HarnessConfig;
use devicelab::nats::NatsServer;
use devicelab::trials::fleet::Device;
use devicelab::trials::simulated::{reference_binary, reference_simulator};
use devicelab::trials::{Fleet, Select};
use devicelab::{Lab, VmArchitecture};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn var(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// CPU seconds (user + system) and resident MiB of process `pid`.
fn usage(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command's closing parenthesis; utime and stime are 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = (fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?) / ticks;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((cpu, rss_kib / 1024.0))
}

async fn agents_usage(fleet: &Fleet) -> (f64, f64) {
    let mut total = (0.0, 0.0);
    for m in &fleet.members {
        if let Device::Simulated(d) = &m.device
            && let Some((cpu, rss)) = d.process_id().await.and_then(usage)
        {
            total.0 += cpu;
            total.1 += rss;
        }
    }
    total
}

#[tokio::main]
async fn main() {
    devicelab::init_logging();
    devicelab::install_crypto_provider();
    let devices = var("BENCH_DEVICES", 500) as usize;
    // Each device holds three sockets here (its link's listener and both ends it relays).
    if let Ok(limit) = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .maximum
        .ok_or(())
    {
        let _ = rustix::process::setrlimit(
            rustix::process::Resource::Nofile,
            rustix::process::Rlimit {
                current: Some(limit),
                maximum: Some(limit),
            },
        );
    }
    let seconds = var("BENCH_SECONDS", 60);
    let load_before = load();
    let config = HarnessConfig::from_env().expect("DEVICELAB_* settings");
    let binary = reference_binary(&config)
        .await
        .expect("the reference agent builds");
    // BENCH_REAL real devices (x86_64, or ARCH's) join the fleet: the server then listens on
    // the lab's network, where they reach it.
    let real = var("BENCH_REAL", 0) as usize;
    let lab = if real > 0 {
        Some(Lab::from_env().await.expect("a lab for the real devices"))
    } else {
        None
    };
    let address = match &lab {
        Some(lab) => lab.gateway().await.expect("the lab's network"),
        None => std::net::Ipv4Addr::LOCALHOST,
    };
    let nats = Arc::new(
        NatsServer::start(&config, address, &devicelab::lab::run_owner())
            .await
            .expect("a NATS server"),
    );
    let arch = config.arch_filter.unwrap_or(VmArchitecture::X86_64);
    let started = Instant::now();
    let fleet = Fleet::of(&devicelab::reference::agent())
        .real(real, arch, "real")
        .simulated(devices, "bench")
        .simulated_by(reference_simulator(binary, 1_000))
        .start_on(lab.as_deref(), nats.clone())
        .await
        .expect("the fleet starts");
    let all = fleet.group(Select::All);
    let budget = Duration::from_secs(60);
    let reporting = fleet.reporting(&all, budget).await;
    let ready = started.elapsed();
    let marks = fleet.mark(&all, budget).await;
    let (cpu_before, _) = agents_usage(&fleet).await;
    let server_before = nats.process_id().and_then(usage);
    let from = fleet.members[0].reports().last_sequence().await.unwrap();
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let to = fleet.members[0].reports().last_sequence().await.unwrap();
    let measured = window.elapsed().as_secs_f64();
    let (cpu_after, rss) = agents_usage(&fleet).await;
    let server_after = nats.process_id().and_then(usage);
    let delivered = fleet.delivered(&marks, 1, budget).await;
    let n = devices as f64;
    let stored = to - from;
    println!(
        "fleet benchmark: {devices} simulated devices and {real} real ones, 1 report/s each \
         (the real ones: every 2 s), {seconds} s measured"
    );
    println!("| figure | value |\n| --- | --- |");
    println!(
        "| started and all reporting | {:.1} s ({reporting}) |",
        ready.as_secs_f64()
    );
    println!(
        "| reports stored in the window | {stored} (expected ~{:.0}: {devices} × {measured:.1} s, \
         + {real} × {measured:.1} s / 2) |",
        n * measured + real as f64 * measured / 2.0
    );
    println!("| delivery: once, in order, per device | {delivered} |");
    println!(
        "| agent CPU per device | {:.2} % of one core ({:.3} s over the window) |",
        (cpu_after - cpu_before) / n / measured * 100.0,
        (cpu_after - cpu_before) / n
    );
    println!("| agent resident memory per device | {:.1} MiB |", rss / n);
    if let (Some(b), Some(a)) = (server_before, server_after) {
        println!(
            "| NATS server CPU | {:.1} % of one core; resident {:.0} MiB |",
            (a.0 - b.0) / measured * 100.0,
            a.1
        );
    }
    println!(
        "| load average (1/5/15 min) before / after | {load_before} / {} |",
        load()
    );
    if real > 0 {
        let group = fleet.group(Select::Real);
        let cut = fleet.power_cut(&group).await.expect("a group power cut");
        println!(
            "| group power cut of {real} real devices: first to last stop / destroy | {} ms / {} ms |",
            cut.spread.as_millis(),
            cut.destroy_spread.unwrap_or_default().as_millis()
        );
        let recovered = fleet.power_on(&cut).await;
        println!("| their recovery (power-on to a report from the new boot) | {recovered} |");
        if recovered.passed != recovered.judged {
            eprintln!("{}", fleet.table());
            fleet.verdict().expect("every real device recovers");
        }
    }
    if delivered.passed != fleet.members.len() || reporting.passed != fleet.members.len() {
        eprintln!("{}", fleet.table());
        fleet.verdict().expect("every device passes");
    }
}
