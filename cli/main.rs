//! `devicelab`: the host side of the harness from a shell. `doctor` checks every host piece a
//! run needs; `fetch` downloads and verifies the images (what a CI cache step runs); `ls`,
//! `ssh` and `clean` look after what runs left on the host (each host of DEVICELAB_HOSTS).

use clap::{Parser, Subcommand};
use devicelab::VmArchitecture;
use devicelab::config::{HarnessConfig, NatsMode, uri_host};
use devicelab::host::doctor::{self, Scope};
use devicelab::host::libvirt::Libvirt;
use devicelab::host::pool::Pool;
use devicelab::host::reaper::{self, OwnerRecord};
use devicelab::host::remote;
use devicelab::image::source::ImageSource;
use devicelab::model::spec::ADMIN_USER;
use devicelab::ssh::keys::client_key_path;
use devicelab::ssh::shell_quote;
use indicatif::{ProgressBar, ProgressStyle};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

#[derive(Parser)]
#[command(
    name = "devicelab",
    version,
    about = "devicelab's host tools (configured by the same DEVICELAB_* variables as the tests)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Checks every host piece a run needs, one line each, with the fix for each miss
    /// (non-zero exit status on any miss).
    Doctor {
        /// x86_64, aarch64 or all.
        #[arg(long, default_value = "all", value_parser = archs)]
        arch: Archs,
    },
    /// Downloads and verifies the pinned images (and pulls the NATS image), then prints their
    /// paths: what a CI cache step runs.
    Fetch {
        /// x86_64, aarch64 or all.
        #[arg(long, default_value = "all", value_parser = archs)]
        arch: Archs,
    },
    /// Lists devicelab's VMs (on each host of DEVICELAB_HOSTS) and NATS containers, and how to
    /// log in to each VM.
    Ls,
    /// Logs in to a VM (one kept with DEVICELAB_KEEP, or one a running test holds).
    Ssh {
        vm: String,
        /// A command to run instead of a login shell.
        #[arg(trailing_var_arg = true)]
        command: Vec<String>,
    },
    /// Removes what dead runs left behind and what was kept (VMs, volumes, run dirs,
    /// containers), through the same reaper the tests run; a live run's VMs are left alone.
    Clean {
        /// Also empty the warm-start cache (the saved VMs no clone is using).
        #[arg(long)]
        warm: bool,
    },
}

#[derive(Clone)]
struct Archs(Vec<VmArchitecture>);

fn archs(value: &str) -> Result<Archs, String> {
    if value == "all" {
        return Ok(Archs(VmArchitecture::ALL.to_vec()));
    }
    VmArchitecture::parse(value, "--arch")
        .map(|a| Archs(vec![a]))
        .map_err(|e| e.to_string())
}

#[tokio::main]
async fn main() -> ExitCode {
    devicelab::install_crypto_provider();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("devicelab=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let config = match HarnessConfig::from_env() {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let result = match cli.command {
        Cmd::Doctor { arch } => return doctor(&config, arch.0).await,
        Cmd::Fetch { arch } => fetch(&config, arch.0).await,
        Cmd::Ls => ls(&config).await,
        Cmd::Ssh { vm, command } => ssh(&config, &vm, &command),
        Cmd::Clean { warm } => clean(&config, warm).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("devicelab: {e}");
    ExitCode::FAILURE
}

type Result<T = (), E = String> = std::result::Result<T, E>;

/// Every check, on each host of DEVICELAB_HOSTS (under its URI) or on the one host.
async fn doctor(config: &HarnessConfig, archs: Vec<VmArchitecture>) -> ExitCode {
    let mut misses = 0;
    let hosts = config.host_configs();
    let several = hosts.len() > 1;
    for host in hosts {
        if several {
            println!("host {}:", host.libvirt_uri);
        }
        let archs = archs.clone();
        let report =
            tokio::task::spawn_blocking(move || doctor::check(&host, &Scope::everything(archs)))
                .await
                .expect("the checks ran");
        print!("{report}");
        misses += report.failures().count();
    }
    if misses == 0 {
        println!("all set: nothing missing");
        ExitCode::SUCCESS
    } else {
        println!("{misses} missing (each ✗ above says how to fix it)");
        ExitCode::FAILURE
    }
}

async fn fetch(config: &HarnessConfig, archs: Vec<VmArchitecture>) -> Result {
    use std::io::IsTerminal;
    // A terminal gets a bar per file (indicatif); a log (CI) keeps the plain lines every 5 s.
    if std::io::stderr().is_terminal() {
        let bars = std::sync::Mutex::new(std::collections::HashMap::<String, ProgressBar>::new());
        devicelab::image::download::show_progress_with(Box::new(move |name, got, total| {
            let mut bars = bars.lock().unwrap_or_else(|p| p.into_inner());
            let bar = bars.entry(name.to_owned()).or_insert_with(|| {
                let bar = match total {
                    Some(t) => ProgressBar::new(t).with_style(
                        ProgressStyle::with_template(
                            "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {eta}",
                        )
                        .expect("a valid template")
                        .progress_chars("#>-"),
                    ),
                    None => ProgressBar::new_spinner().with_style(
                        ProgressStyle::with_template("{msg} {spinner} {binary_bytes}")
                            .expect("a valid template"),
                    ),
                };
                bar.with_message(name.to_owned())
            });
            bar.set_position(got);
            if total.is_some_and(|t| got >= t) {
                bar.finish();
            }
        }));
    }
    for arch in archs {
        let source = ImageSource::for_arch(config, arch).map_err(|e| e.to_string())?;
        let image = source
            .resolve(&config.image_cache_dir())
            .await
            .map_err(|e| format!("{arch} image: {e}"))?;
        println!("{arch} image: {}", image.path.display());
    }
    if let NatsMode::Container { image } = &config.nats {
        let podman = &config.podman;
        let exists = tokio::process::Command::new(podman)
            .args(["image", "exists", image])
            .status()
            .await
            .is_ok_and(|s| s.success());
        if !exists {
            let out = tokio::process::Command::new(podman)
                .args(["pull", "-q", image])
                .output()
                .await
                .map_err(|e| {
                    format!(
                        "cannot run {}: {e} (install podman, or DEVICELAB_NATS=process)",
                        podman.display()
                    )
                })?;
            if !out.status.success() {
                return Err(format!(
                    "podman could not pull the NATS image {image}: {}\n  offline: fixtures/nats/build-image.sh builds one from Debian's nats-server (set DEVICELAB_NATS_IMAGE to it), or use DEVICELAB_NATS=process",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        println!("NATS image: {image}");
    }
    Ok(())
}

/// A VM of devicelab's on this host, as its run dir records it.
struct Listed {
    name: String,
    running: bool,
    owner: Option<OwnerRecord>,
    /// The request it was started for, where that is another name (a warm clone's domain has
    /// its saved VM's name; its run dir has the request's).
    request: Option<String>,
}

async fn ls(config: &HarnessConfig) -> Result {
    let listed = each_host(config, |host| async move {
        ls_vms(&host).await?;
        // This machine's are listed below, with its containers.
        match uri_host(&host.libvirt_uri) {
            Some(_) => ls_saved(host.warm_dir()).await,
            None => Ok(()),
        }
    })
    .await;
    let hosts = config.host_configs();
    if hosts.len() > 1 || uri_host(&hosts[0].libvirt_uri).is_some() {
        println!("this machine:");
    }
    ls_saved_and_containers(config).await.and(listed)
}

/// `what` for each host (under a heading naming it, when there are several), on to the next
/// one whatever fails: the hosts that failed, named with their errors.
async fn each_host<F, Fut>(config: &HarnessConfig, what: F) -> Result
where
    F: Fn(HarnessConfig) -> Fut,
    Fut: std::future::Future<Output = Result>,
{
    let hosts = config.host_configs();
    let several = hosts.len() > 1;
    let mut failed = Vec::new();
    for host in hosts {
        let uri = host.libvirt_uri.clone();
        if several {
            println!("host {uri}:");
        }
        if let Err(e) = what(host).await {
            eprintln!("devicelab: {uri}: {e}");
            failed.push(format!("{uri}: {e}"));
        }
    }
    match failed.is_empty() {
        true => Ok(()),
        false => Err(failed.join("; ")),
    }
}

/// The devicelab VMs on the host `config` names, whose they are, and how to log in to each.
async fn ls_vms(config: &HarnessConfig) -> Result {
    let uri = config.libvirt_uri.clone();
    let runs = config.runs_dir();
    let vms = tokio::task::spawn_blocking(move || -> Result<Vec<Listed>> {
        let lv = Libvirt::open(&uri).map_err(|e| e.to_string())?;
        let conn = lv.conn().map_err(|e| e.to_string())?;
        let domains = conn.list_all_domains(0).map_err(|e| e.to_string())?;
        Ok(domains
            .iter()
            .filter_map(|d| {
                let name = d.name().ok()?;
                if !name.starts_with("devicelab-") {
                    return None;
                }
                let dir = reaper::run_dir_of(&runs, &name);
                Some(Listed {
                    running: d.is_active().unwrap_or(false),
                    owner: dir.as_deref().and_then(OwnerRecord::read),
                    request: dir
                        .and_then(|dir| Some(dir.file_name()?.to_string_lossy().into_owned()))
                        .filter(|request| *request != name),
                    name,
                })
            })
            .collect())
    })
    .await
    .map_err(|e| e.to_string())??;
    if vms.is_empty() {
        println!("VMs: none");
    }
    for vm in &vms {
        let state = if vm.running { "running" } else { "shut off" };
        let whose = match &vm.owner {
            Some(o) if o.kept => "kept (DEVICELAB_KEEP)".to_owned(),
            Some(o) if reaper::is_alive(o.pid, o.start_time) => {
                format!("run {} (pid {}) is using it", o.run_id, o.pid)
            }
            Some(o) => format!(
                "left by run {} (pid {} is gone): devicelab clean removes it",
                o.run_id, o.pid
            ),
            None => "no run dir: devicelab clean cannot tell whose it is".to_owned(),
        };
        let request = vm
            .request
            .as_ref()
            .map(|r| format!(", request {r}"))
            .unwrap_or_default();
        println!("VM {} ({state}{request}): {whose}", vm.name);
        if let Some(login) = login_args(config, &vm.name) {
            let pasted: Vec<String> = login.iter().map(|a| pasteable(a)).collect();
            println!("    ssh: ssh {}", pasted.join(" "));
        }
    }
    Ok(())
}

/// The saved VMs whose records are in `warm_dir`.
async fn ls_saved(warm_dir: std::path::PathBuf) -> Result {
    let saved = tokio::task::spawn_blocking(move || devicelab::vm::warm::saved_vms(&warm_dir))
        .await
        .map_err(|e| e.to_string())?;
    if saved.is_empty() {
        println!("saved VMs (warm starts): none");
    }
    for s in &saved {
        // Another host's saved VMs are volumes of its pool: only their records are here.
        let size = if s.on_host {
            "volumes of the host's pool".to_owned()
        } else {
            format!("{} MiB", s.bytes >> 20)
        };
        println!(
            "saved VM {} ({size}{}): devicelab clean --warm removes it",
            s.name,
            if s.in_use { ", a clone is running" } else { "" }
        );
    }
    Ok(())
}

/// This machine's saved VMs and NATS containers.
async fn ls_saved_and_containers(config: &HarnessConfig) -> Result {
    // This machine's libvirt's, when the configuration names it (another host's are listed
    // under it; `devicelab clean --warm` removes a host's after reaping it).
    if config
        .host_configs()
        .iter()
        .any(|h| uri_host(&h.libvirt_uri).is_none())
    {
        ls_saved(config.local_warm_dir()).await?;
    }
    let podman = &config.podman;
    if let Ok(out) = tokio::process::Command::new(podman)
        .args(["ps", "-a", "--filter", "label=devicelab.pid"])
        .args([
            "--format",
            "{{.Names}} ({{.Status}}) kept={{index .Labels \"devicelab.kept\"}}",
        ])
        .output()
        .await
    {
        let text = String::from_utf8_lossy(&out.stdout);
        if text.trim().is_empty() {
            println!("NATS containers: none");
        }
        for line in text.lines() {
            println!(
                "NATS container {}",
                line.replace("kept=1", "kept").replace(" kept=", "")
            );
        }
    }
    Ok(())
}

/// `arg` as a shell reads it back: bare when nothing in it is special to the shell (an
/// argument after the command's name), else quoted.
fn pasteable(arg: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "@%+=:,./_-".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        arg.to_owned()
    } else {
        shell_quote(arg)
    }
}

/// The arguments `ssh` logs in to `vm` with, from its run dir: the lab's key, and the host key
/// the harness pinned (its known_hosts, whose first field is the VM's address).
fn login_args(config: &HarnessConfig, vm: &str) -> Option<Vec<String>> {
    let known_hosts = reaper::run_dir_of(&config.runs_dir(), vm)?.join("known_hosts");
    let text = std::fs::read_to_string(&known_hosts).ok()?;
    let ip = text.split_whitespace().next()?;
    let mut args = vec![
        "-i".into(),
        client_key_path(&config.keys_dir()).display().to_string(),
        "-o".into(),
        format!("UserKnownHostsFile={}", known_hosts.display()),
    ];
    // A guest of a host reached over SSH is reached through that host (a URI that cannot be
    // gone through is refused first: see `ssh`).
    if let Ok(Some(host)) = remote::login_of(&config.libvirt_uri) {
        args.extend([
            "-o".into(),
            format!("ProxyCommand={}", host.proxy_command()),
        ]);
    }
    args.push(format!("{ADMIN_USER}@{ip}"));
    Some(args)
}

fn ssh(config: &HarnessConfig, vm: &str, command: &[String]) -> Result {
    let config = &host_of(config, vm);
    remote::login_of(&config.libvirt_uri).map_err(|e| e.to_string())?;
    let Some(login) = login_args(config, vm) else {
        return Err(format!(
            "no address recorded for {vm} under {}: `devicelab ls` lists the VMs you can log in to",
            config.runs_dir().display()
        ));
    };
    let err = Command::new("ssh")
        .args(["-o", "StrictHostKeyChecking=yes"])
        // A VM that is (re)booting refuses connections for a moment: try for ~10 s.
        .args(["-o", "ConnectionAttempts=10"])
        .args(login)
        .args(command)
        .exec();
    Err(format!(
        "cannot run ssh: {err} (install the OpenSSH client)"
    ))
}

/// The configuration of the host `vm` runs on, as its run dir's owner record says (the first
/// host's when it names none).
fn host_of(config: &HarnessConfig, vm: &str) -> HarnessConfig {
    let recorded = reaper::run_dir_of(&config.runs_dir(), vm)
        .and_then(|dir| OwnerRecord::read(&dir))
        .map(|owner| owner.host);
    config
        .host_configs()
        .into_iter()
        .find(|host| recorded.as_deref() == Some(host.libvirt_uri.as_str()))
        .unwrap_or_else(|| config.clone())
}

async fn clean(config: &HarnessConfig, warm: bool) -> Result {
    each_host(config, |host| clean_host(host, warm)).await
}

/// Removes what devicelab left on the host `config` names, kept VMs included, and with `warm`
/// then its saved VMs no clone is using (another host's volumes there too).
async fn clean_host(config: HarnessConfig, warm: bool) -> Result {
    let (reaped, saved) = tokio::task::spawn_blocking(move || -> Result<_> {
        let lv = Libvirt::open(&config.libvirt_uri).map_err(|e| e.to_string())?;
        // As `Lab::new` does: one process at a time sets up the pool and reaps.
        let _lock = devicelab::lab::pool_setup_lock(&config).map_err(|e| e.to_string())?;
        let pool = Pool::ensure(&lv, &config.pool_dir()).map_err(|e| e.to_string())?;
        let dirs = reaper::DataDirs::of(&config);
        let reaped = reaper::reap_including_kept(&lv, &pool, &dirs, &config.podman);
        // After the reap: a kept clone's disk is backed by its saved VM's. Another host's
        // (reached over SSH, as `Lab` reaches it) are volumes of its pool; a hop that cannot
        // be made fails here as it fails `Lab`, rather than removing records whose volumes
        // would stay on that host.
        let saved = warm.then(|| {
            let volumes = remote::ssh_hop(&config.libvirt_uri)
                .map_err(|e| e.to_string())?
                .is_some();
            devicelab::vm::warm::remove_unused(&config.warm_dir(), volumes.then_some(&pool))
                .map_err(|e| e.to_string())
        });
        Ok((reaped, saved))
    })
    .await
    .map_err(|e| e.to_string())??;
    println!("removed VMs: {}", list(&reaped.vms));
    println!("removed NATS containers: {}", list(&reaped.containers));
    println!(
        "removed unfinished uploads (pool volumes): {}",
        list(&reaped.uploads)
    );
    if let Some(saved) = saved {
        println!("removed saved VMs (warm starts): {}", list(&saved?));
    }
    Ok(())
}

/// `v` joined with commas, or "none".
fn list(v: &[String]) -> String {
    if v.is_empty() {
        "none".to_owned()
    } else {
        v.join(", ")
    }
}
