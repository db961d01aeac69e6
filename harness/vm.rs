//! A running VM ("the handle"): provisioned from a spec, reachable over SSH, power-cyclable,
//! and cleaned up when dropped (also when the test panics).

use crate::arch::{Budgets, VmArchitecture};
use crate::console;
use crate::domain_xml::{self, DomainXmlParams, UefiPflash};
use crate::firmware::{self, FirmwareError};
use crate::image::ImageError;
use crate::keys::{HostKey, KeyError};
use crate::lab::Lab;
use crate::libvirt::{Libvirt, LibvirtError};
use crate::pool::{Pool, PoolError};
use crate::readiness;
use crate::reaper::{self, CleanupGuard, OwnerRecord};
use crate::seed::{Seed, SeedError};
use crate::spec::{Readiness, SpecError, VirtualMachineSpec};
use crate::ssh::{ExecOutput, SshError, SshSession, SshTarget, shell_quote};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error(transparent)]
    Seed(#[from] SeedError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Firmware(#[from] FirmwareError),
    #[error("VM {vm}: {source}")]
    Ssh { vm: String, source: SshError },
    #[error("VM {vm}: no {phase} within {budget:?} ({last}){console}", console = ConsoleTail(console_tail))]
    Timeout {
        vm: String,
        phase: &'static str,
        budget: Duration,
        last: String,
        console_tail: Vec<String>,
    },
    #[error(
        "VM {vm}: `{command}` failed ({status}){}{}",
        Quoted("stdout", stdout),
        Quoted("stderr", stderr)
    )]
    CommandFailed {
        vm: String,
        command: String,
        status: String,
        stdout: String,
        stderr: String,
    },
    #[error("VM {vm}: {meaning}, so the wait cannot succeed; console: {line}{cause}{console}", console = ConsoleTail(console_tail))]
    BootFailed {
        vm: String,
        meaning: &'static str,
        line: String,
        /// What the guest and the harness know about why (evidence lines, the last power cut).
        cause: String,
        console_tail: Vec<String>,
    },
    #[error("VM {vm}: no {phase}: {evidence}{cause}{console}", console = ConsoleTail(console_tail))]
    NothingListening {
        vm: String,
        phase: &'static str,
        evidence: String,
        cause: String,
        console_tail: Vec<String>,
    },
    #[error("VM {vm}: cloud-init did not finish cleanly:\n{output}")]
    CloudInit { vm: String, output: String },
}

struct ConsoleTail<'a>(&'a [String]);
impl fmt::Display for ConsoleTail<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.0.is_empty() {
            f.write_str("\n  last serial console lines:")?;
            for l in self.0 {
                write!(f, "\n  | {l}")?;
            }
        }
        Ok(())
    }
}
struct Quoted<'a>(&'static str, &'a str);
impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.1.trim();
        if !text.is_empty() {
            write!(f, "\n  {}: {}", self.0, text.replace('\n', "\n    "))?;
        }
        Ok(())
    }
}

/// How long each phase took, in order, for the trial report.
#[derive(Debug, Clone, Default)]
pub struct PhaseTimings(Arc<Mutex<Vec<(String, Duration)>>>);

impl PhaseTimings {
    pub fn record(&self, phase: &str, took: Duration) {
        tracing::info!("phase {phase}: {:.1} s", took.as_secs_f64());
        self.0.lock().unwrap().push((phase.to_owned(), took));
    }
    pub fn entries(&self) -> Vec<(String, Duration)> {
        self.0.lock().unwrap().clone()
    }
}

impl fmt::Display for PhaseTimings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .entries()
            .iter()
            .map(|(p, d)| format!("{p} {:.1}s", d.as_secs_f64()))
            .collect();
        f.write_str(&parts.join(", "))
    }
}

/// What the harness knows about the last hard power cut: how long after provisioning it came
/// and what had been flushed by then. A diagnosis rests on it.
#[derive(Debug, Clone)]
pub struct PowerCut {
    /// What provisioning waited for (the spec's readiness), and the time from then to the cut.
    pub ready: Readiness,
    pub after_provisioning: Duration,
    /// The last flush before the cut, what it made durable and how long before the cut it
    /// ran; `None`: nothing the guest wrote since boot was flushed by the harness.
    pub last_flush: Option<(String, Duration)>,
}

impl fmt::Display for PowerCut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the plug was pulled {:.0} s after provisioning ({}), ",
            self.after_provisioning.as_secs_f64(),
            self.ready
        )?;
        match &self.last_flush {
            Some((what, ago)) => write!(
                f,
                "{:.0} s after the harness flushed {what}",
                ago.as_secs_f64()
            ),
            None => f.write_str("with nothing flushed since the first boot"),
        }
    }
}

#[derive(Debug, Default)]
struct Durability {
    /// What provisioning waited for, and when it was done.
    provisioned: Option<(Readiness, Instant)>,
    last_flush: Option<(String, Instant)>,
    last_cut: Option<PowerCut>,
}

pub struct Vm {
    name: String,
    arch: VmArchitecture,
    libvirt: Libvirt,
    pool: Pool,
    _interrupt_guard: CleanupGuard,
    ip: Ipv4Addr,
    target: SshTarget,
    session: tokio::sync::Mutex<Option<SshSession>>,
    budgets: Budgets,
    serial_log: PathBuf,
    keep: bool,
    known_hosts: PathBuf,
    client_key_path: PathBuf,
    run_dir: PathBuf,
    /// Where the current boot's output starts in the serial log.
    boot_offset: AtomicU64,
    /// Set once failure artifacts were collected: the run dir then outlives the VM.
    keep_run_dir: AtomicBool,
    flush_provisioning: bool,
    durability: Mutex<Durability>,
    pub timings: PhaseTimings,
}

/// Cleans up whatever provisioning created if it fails before a `Vm` exists.
struct Partial {
    libvirt: Libvirt,
    pool: Pool,
    name: String,
    run_dir: PathBuf,
    armed: bool,
}

impl Drop for Partial {
    fn drop(&mut self) {
        if self.armed {
            teardown(&self.libvirt, &self.pool, &self.name, &self.run_dir);
        }
    }
}

/// Removes the VM's domain and volumes; its owner record goes once that succeeded.
fn teardown(libvirt: &Libvirt, pool: &Pool, name: &str, run_dir: &std::path::Path) {
    let errors = reaper::remove_vm(libvirt, pool, name);
    for e in &errors {
        eprintln!("devicelab: cleanup of VM {name}: {e}");
    }
    if errors.is_empty() {
        let _ = std::fs::remove_file(run_dir.join(reaper::OWNER_FILE));
    }
}

impl Vm {
    /// Provisions `spec` and waits until it is ready: lease, TCP 22, SSH, cloud-init done.
    pub async fn provision(lab: &Lab, spec: VirtualMachineSpec) -> Result<Vm, VmError> {
        spec.validate()?;
        let arch = spec.arch;
        let name = spec.name.clone();
        let accel = lab.accel(arch);
        let budgets = arch.budgets(accel.accel).scaled(lab.config.budget_scale);
        let timings = PhaseTimings::default();
        let base = lab.base_image(arch).await?;
        let host_key = HostKey::generate(&format!("devicelab-host@{name}"))?;
        let pool = lab.pool.clone();
        let run_dir = lab.run_dir(&name).map_err(|source| SeedError::Write {
            dir: lab.config.runs_dir(),
            source,
        })?;
        let serial_log = run_dir.join("serial.log");
        let _ = std::fs::remove_file(&serial_log); // a stale log from a reused name would mislead

        let [disk_vol, seed_vol, vars_vol] = reaper::volume_names(&name);
        // Recorded before anything exists, so a killed run leaves a trail for the reaper.
        OwnerRecord::current(&lab.owner.run_id)
            .write(&run_dir)
            .map_err(|source| SeedError::Write {
                dir: run_dir.clone(),
                source,
            })?;
        let mut partial = Partial {
            libvirt: lab.libvirt.clone(),
            pool: pool.clone(),
            name: name.clone(),
            run_dir: run_dir.clone(),
            armed: true,
        };
        let interrupt_guard = {
            let (lv, pool, name, run_dir) = (
                lab.libvirt.clone(),
                pool.clone(),
                name.clone(),
                run_dir.clone(),
            );
            // Interrupted: nobody will read this run's logs (DEVICELAB_KEEP is for that).
            reaper::on_interrupt(move || {
                teardown(&lv, &pool, &name, &run_dir);
                let _ = std::fs::remove_dir_all(&run_dir);
            })
        };
        let started = Instant::now();
        let uefi = match arch.firmware() {
            crate::arch::FirmwareKind::Bios => None,
            crate::arch::FirmwareKind::UefiPflash => {
                let fw = firmware::discover()?;
                Some(UefiPflash {
                    code: firmware::padded_code(&fw, &pool.dir)?,
                    vars: firmware::vars_copy(&fw, &pool.path_of(&vars_vol))?,
                })
            }
        };
        // Every instance gets its own identity, MAC included: a name reused within the DHCP
        // lease time (an hour) must not find the previous instance's lease under its MAC.
        let instance_id = format!(
            "{name}-{}-{}",
            lab.owner.run_id,
            hex::encode(rand::random::<[u8; 3]>())
        );
        let seed = Seed::new(&spec, &lab.client_key.public_line, &host_key, &instance_id);
        let seed_path = pool.path_of(&seed_vol);
        let disk_path = {
            let (pool, base, vol, gib, seed_path) = (
                pool.clone(),
                base.clone(),
                disk_vol.clone(),
                spec.disk_gib,
                seed_path.clone(),
            );
            lab.libvirt
                .run(move |_| -> Result<PathBuf, VmError> {
                    let disk = pool.create_overlay(&vol, &base, gib)?;
                    seed.write_iso(&seed_path)?;
                    pool.refresh()?;
                    Ok(disk)
                })
                .await?
        };
        let params = DomainXmlParams {
            name: name.clone(),
            arch,
            accel: accel.accel,
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            emulator: lab.emulator(arch),
            disk: disk_path,
            seed_iso: seed_path,
            network: lab.config.network.clone(),
            mac: domain_xml::mac_for(&instance_id),
            serial_log: serial_log.clone(),
            uefi,
            qemu_args: lab.qemu_args(arch, accel.accel),
            owner: lab.owner.clone(),
        };
        let rendered = domain_xml::render(&params);
        std::fs::write(run_dir.join("domain.xml"), &rendered.xml).ok();
        {
            let name = name.clone();
            lab.libvirt
                .run(move |lv| -> Result<(), LibvirtError> {
                    let dom = lv.define(&name, &rendered)?;
                    lv.start(&dom, &name)
                })
                .await?
        };
        tracing::info!(
            "VM {name}: {arch} under {} ({}), booting {}",
            accel.accel,
            accel.reason,
            base.path.display()
        );

        let timeout = |phase: &'static str, budget: Duration, last: String| VmError::Timeout {
            vm: name.clone(),
            phase,
            budget,
            last,
            console_tail: console::tail(&serial_log, 15),
        };
        let waits = async {
            let ip = {
                let n = name.clone();
                let lv = lab.libvirt.clone();
                readiness::poll(budgets.lease, move || {
                    let (n, lv) = (n.clone(), lv.clone());
                    async move {
                        match lv.run(move |lv| lv.lease_ipv4(&lv.domain(&n)?, &n)).await {
                            Ok(Some(ip)) => Ok(ip),
                            Ok(None) => Err("no lease yet".to_owned()),
                            Err(e) => Err(e.to_string()),
                        }
                    }
                })
                .await
                .map_err(|last| timeout("DHCP lease", budgets.lease, last))?
            };
            timings.record("lease", started.elapsed());
            let addr = SocketAddr::from((ip, 22));
            readiness::tcp_port(addr, budgets.ssh.saturating_sub(started.elapsed()))
                .await
                .map_err(|last| timeout("open port 22", budgets.ssh, last))?;
            timings.record("port 22", started.elapsed());
            let target = SshTarget {
                addr,
                user: spec.first_boot.admin_user.clone(),
                key: lab.client_key.private.clone(),
                host_key: host_key.public.clone(),
            };
            let session =
                readiness::ssh_login(&target, budgets.ssh.saturating_sub(started.elapsed()))
                    .await
                    .map_err(|source| VmError::Ssh {
                        vm: name.clone(),
                        source,
                    })?;
            Ok::<_, VmError>((ip, target, session))
        };
        let (ip, target, session) = tokio::select! {
            r = waits => r?,
            (line, meaning) = console::watch_for_fatal(serial_log.clone(), 0) => {
                return Err(VmError::BootFailed {
                    vm: name.clone(),
                    meaning,
                    line,
                    cause: diagnosis(&serial_log, 0, None),
                    console_tail: console::tail(&serial_log, 15),
                });
            }
        };
        timings.record("ssh", started.elapsed());
        let known_hosts = run_dir.join("known_hosts");
        std::fs::write(
            &known_hosts,
            format!("{}\n", host_key.known_hosts_line(&ip.to_string())),
        )
        .ok();

        partial.armed = false;
        let vm = Vm {
            name,
            arch,
            libvirt: lab.libvirt.clone(),
            pool,
            _interrupt_guard: interrupt_guard,
            ip,
            target,
            session: tokio::sync::Mutex::new(Some(session)),
            budgets,
            serial_log,
            keep: lab.config.keep,
            known_hosts,
            client_key_path: lab.client_key.path.clone(),
            run_dir,
            boot_offset: AtomicU64::new(0),
            keep_run_dir: AtomicBool::new(false),
            flush_provisioning: spec.flush_provisioning,
            durability: Mutex::default(),
            timings,
        };
        if spec.ready_when == Readiness::CloudInitDone {
            vm.wait_for_cloud_init().await?;
            vm.timings.record("cloud-init", started.elapsed());
        }
        vm.durability.lock().unwrap().provisioned = Some((spec.ready_when, Instant::now()));
        vm.flush_harness_writes("provisioning").await?;
        Ok(vm)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn arch(&self) -> VmArchitecture {
        self.arch
    }
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }
    pub fn budgets(&self) -> Budgets {
        self.budgets
    }
    pub fn serial_log(&self) -> &std::path::Path {
        &self.serial_log
    }

    /// The command a human can paste to log in (it verifies the host key too).
    pub fn ssh_command(&self) -> String {
        format!(
            "ssh -i {} -o UserKnownHostsFile={} {}@{}",
            self.client_key_path.display(),
            self.known_hosts.display(),
            self.target.user,
            self.ip
        )
    }

    /// Runs a shell command as the admin user and returns what it did, whatever its status.
    pub async fn exec(&self, command: &str) -> Result<ExecOutput, VmError> {
        self.exec_with_input(command, None).await
    }

    pub async fn exec_with_input(
        &self,
        command: &str,
        input: Option<&[u8]>,
    ) -> Result<ExecOutput, VmError> {
        self.exec_within(command, input, self.budgets.command).await
    }

    /// Runs a command and gives up after `timeout` (every other exec has the budget table's
    /// `command` budget). A command that timed out takes its session with it: the next call
    /// logs in afresh instead of queueing behind a channel that may never close.
    pub async fn exec_within(
        &self,
        command: &str,
        input: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<ExecOutput, VmError> {
        let mut guard = self.session.lock().await;
        if guard.as_ref().is_none_or(|s| s.is_closed()) {
            let session = SshSession::connect(&self.target, readiness::CONNECT_TIMEOUT)
                .await
                .map_err(|source| self.ssh_err(source))?;
            *guard = Some(session);
        }
        let session = guard.as_ref().expect("session just set");
        let result = session.exec_within(command, input, timeout).await;
        if matches!(result, Err(SshError::CommandTimeout { .. })) {
            guard.take();
        }
        result.map_err(|source| self.ssh_err(source))
    }

    /// Runs a command that must succeed; returns its stdout.
    pub async fn succeed(&self, command: &str) -> Result<String, VmError> {
        let out = self.exec(command).await?;
        self.check(command, out)
    }

    fn check(&self, command: &str, out: ExecOutput) -> Result<String, VmError> {
        if out.success() {
            return Ok(out.stdout);
        }
        Err(VmError::CommandFailed {
            vm: self.name.clone(),
            command: command.to_owned(),
            status: match (&out.exit_status, &out.signal) {
                (Some(s), _) => format!("exit status {s}"),
                (None, Some(sig)) => format!("killed by {sig}"),
                (None, None) => "no exit status".into(),
            },
            stdout: out.stdout,
            stderr: out.stderr,
        })
    }

    /// Writes a file on the guest (as root with `sudo`), atomically.
    pub async fn upload(
        &self,
        contents: &[u8],
        remote_path: &str,
        mode: u32,
        sudo: bool,
    ) -> Result<(), VmError> {
        let command = crate::ssh::upload_command(remote_path, mode, sudo);
        let out = self.exec_with_input(&command, Some(contents)).await?;
        self.check(&format!("upload {remote_path}"), out).map(drop)
    }

    fn ssh_err(&self, source: SshError) -> VmError {
        VmError::Ssh {
            vm: self.name.clone(),
            source,
        }
    }

    pub async fn boot_id(&self) -> Result<String, VmError> {
        Ok(self
            .succeed("cat /proc/sys/kernel/random/boot_id")
            .await?
            .trim()
            .to_owned())
    }

    /// `cloud-init status --wait`: 0 = done; 2 = done with recoverable errors (newer
    /// cloud-init); anything else, or a run without the NoCloud seed, is a failure.
    pub async fn wait_for_cloud_init(&self) -> Result<(), VmError> {
        let command = "sudo -n cloud-init status --wait --long";
        let out = self
            .guarded(async {
                match self
                    .exec_within(command, None, self.budgets.cloud_init)
                    .await
                {
                    Err(VmError::Ssh {
                        source: SshError::CommandTimeout { .. },
                        ..
                    }) => Err(self.timeout(
                        "cloud-init done",
                        self.budgets.cloud_init,
                        "still running".into(),
                    )),
                    other => other,
                }
            })
            .await?;
        let text = format!("{}{}", out.stdout, out.stderr);
        if !matches!(out.exit_status, Some(0) | Some(2)) {
            return Err(VmError::CloudInit {
                vm: self.name.clone(),
                output: text,
            });
        }
        if text.contains("DataSourceNone") {
            return Err(VmError::CloudInit {
                vm: self.name.clone(),
                output: format!(
                    "{text}\n(the NoCloud seed was not seen: the guest kernel lacks the driver for its cdrom)"
                ),
            });
        }
        Ok(())
    }

    /// Waits until a systemd unit is active: a system unit, or with `user` that user's unit.
    pub async fn wait_for_unit(&self, unit: &str, user: Option<&str>) -> Result<(), VmError> {
        let command = match user {
            None => format!("systemctl is-active {}", shell_quote(unit)),
            Some(u) => user_systemctl(u, &format!("is-active {}", shell_quote(unit))),
        };
        let budget = self.budgets.first_status;
        readiness::poll(budget, || async {
            match self.exec(&command).await {
                Ok(out) if out.stdout.trim() == "active" => Ok(()),
                Ok(out) => Err(format!("{unit} is {}", out.stdout.trim())),
                Err(e) => Err(e.to_string()),
            }
        })
        .await
        .map_err(|last| self.timeout("active unit", budget, last))
    }

    /// Hard power cycle (destroy + start: no shutdown, like pulling the plug), then waits for
    /// SSH again. Returns how long recovery took.
    pub async fn power_cycle(&self) -> Result<Duration, VmError> {
        let started = Instant::now();
        self.power_off().await?;
        self.power_on_and_wait().await?;
        let took = started.elapsed();
        self.timings.record("power-cycle recovery", took);
        Ok(took)
    }

    /// Makes everything the guest has written so far durable (`sync`): what a test calls
    /// before cutting power when its own writes must survive the cut.
    pub async fn flush(&self) -> Result<(), VmError> {
        self.sync_and_record("what the test wrote").await
    }

    /// Flushes what the harness itself wrote (provisioning, onboarding) unless the spec
    /// turned that off; either way it is logged, so a power cut's report says what was durable.
    pub(crate) async fn flush_harness_writes(&self, what: &str) -> Result<(), VmError> {
        if !self.flush_provisioning {
            tracing::info!(
                "VM {}: not flushing {what} (the spec turned provisioning flushes off)",
                self.name
            );
            return Ok(());
        }
        self.sync_and_record(what).await
    }

    async fn sync_and_record(&self, what: &str) -> Result<(), VmError> {
        let started = Instant::now();
        self.succeed("sudo -n sync").await?;
        tracing::info!(
            "VM {}: flushed {what} ({:.1} s)",
            self.name,
            started.elapsed().as_secs_f64()
        );
        self.durability.lock().unwrap().last_flush = Some((what.to_owned(), Instant::now()));
        Ok(())
    }

    /// The last hard power cut, with what had been flushed before it.
    pub fn last_power_cut(&self) -> Option<PowerCut> {
        self.durability.lock().unwrap().last_cut.clone()
    }

    /// Pulls the plug (libvirt destroy): whatever the guest has not flushed is lost, as on a
    /// real device. The SSH session goes with it.
    pub async fn power_off(&self) -> Result<(), VmError> {
        self.session.lock().await.take();
        let name = self.name.clone();
        self.libvirt
            .run(move |lv| lv.power_off(&lv.domain(&name)?, &name))
            .await?;
        let cut = {
            let mut d = self.durability.lock().unwrap();
            let now = Instant::now();
            let cut = PowerCut {
                ready: d.provisioned.map_or(Readiness::SshLogin, |(r, _)| r),
                after_provisioning: d
                    .provisioned
                    .map_or(Duration::ZERO, |(_, t)| now.duration_since(t)),
                last_flush: d
                    .last_flush
                    .as_ref()
                    .map(|(what, t)| (what.clone(), now.duration_since(*t))),
            };
            d.last_cut = Some(cut.clone());
            cut
        };
        tracing::info!("VM {}: power cut: {cut}", self.name);
        Ok(())
    }

    /// Powers the VM on again after [`Vm::power_off`]; returns at once (see `wait_for_ssh`).
    pub async fn power_on(&self) -> Result<(), VmError> {
        self.boot_offset
            .store(console::len(&self.serial_log), Ordering::SeqCst);
        let name = self.name.clone();
        Ok(self
            .libvirt
            .run(move |lv| lv.start(&lv.domain(&name)?, &name))
            .await?)
    }

    /// Waits for SSH to come back on this boot. Not for the lease: after a power cycle the old
    /// lease is listed at once, so it says nothing about the new boot. Fails at once on a
    /// fatal console line (sshd failing included) or a guest idle at its login prompt with
    /// nothing listening, with the evidence and the last power cut in the message.
    pub async fn wait_for_ssh(&self) -> Result<(), VmError> {
        let started = Instant::now();
        let budget = self.budgets.power_cycle_recovery;
        let session = self
            .guarded(async {
                readiness::tcp_port(self.target.addr, budget)
                    .await
                    .map_err(|last| self.timeout("port 22 after power cycle", budget, last))?;
                readiness::ssh_login(&self.target, budget.saturating_sub(started.elapsed()))
                    .await
                    .map_err(|source| self.ssh_err(source))
            })
            .await?;
        *self.session.lock().await = Some(session);
        Ok(())
    }

    /// [`Vm::power_on`], then [`Vm::wait_for_ssh`].
    pub async fn power_on_and_wait(&self) -> Result<(), VmError> {
        self.power_on().await?;
        self.wait_for_ssh().await
    }

    /// Runs `wait`, failing at once if the console shows this boot cannot succeed, or the
    /// guest sits idle at its login prompt with nothing listening on port 22.
    async fn guarded<T>(
        &self,
        wait: impl std::future::Future<Output = Result<T, VmError>>,
    ) -> Result<T, VmError> {
        let offset = self.boot_offset.load(Ordering::SeqCst);
        let cut = self.last_power_cut();
        tokio::select! {
            r = wait => r,
            (line, meaning) = console::watch_for_fatal(self.serial_log.clone(), offset) => Err(VmError::BootFailed {
                vm: self.name.clone(),
                meaning,
                line,
                cause: diagnosis(&self.serial_log, offset, cut.as_ref()),
                console_tail: console::tail(&self.serial_log, 15),
            }),
            evidence = readiness::nothing_listening(self.target.addr, self.serial_log.clone(), offset, self.budgets.idle_grace) => Err(VmError::NothingListening {
                vm: self.name.clone(),
                phase: "SSH",
                evidence,
                cause: diagnosis(&self.serial_log, offset, cut.as_ref()),
                console_tail: console::tail(&self.serial_log, 15),
            }),
        }
    }

    /// The directory that holds this VM's serial log, domain XML and known_hosts.
    pub fn run_dir(&self) -> &std::path::Path {
        &self.run_dir
    }

    /// Saves what explains a failure into the run dir (which then outlives the VM): the
    /// serial log and domain XML are there already; this adds cloud-init's logs and status and
    /// the boot's journal, plus `extra` (file name, command) pairs. Best effort, 30 s per item.
    pub async fn collect_artifacts(&self, extra: &[(&str, &str)]) -> PathBuf {
        self.keep_run_dir.store(true, Ordering::SeqCst);
        let mut items = vec![
            ("cloud-init-status.txt", "sudo -n cloud-init status --long"),
            ("cloud-init.log", "sudo -n cat /var/log/cloud-init.log"),
            (
                "cloud-init-output.log",
                "sudo -n cat /var/log/cloud-init-output.log",
            ),
            ("journal.txt", "sudo -n journalctl -b --no-pager -n 500"),
        ];
        items.extend_from_slice(extra);
        for (file, command) in items {
            let text = match tokio::time::timeout(Duration::from_secs(30), self.exec(command)).await
            {
                Ok(Ok(out)) => format!("{}{}", out.stdout, out.stderr),
                Ok(Err(e)) => format!("could not run `{command}`: {e}\n"),
                Err(_) => format!("`{command}` did not finish within 30 s\n"),
            };
            let _ = std::fs::write(self.run_dir.join(file), text);
        }
        self.run_dir.clone()
    }

    /// The last lines of the serial console.
    pub fn console_tail(&self, n: usize) -> Vec<String> {
        console::tail(&self.serial_log, n)
    }

    fn timeout(&self, phase: &'static str, budget: Duration, last: String) -> VmError {
        VmError::Timeout {
            vm: self.name.clone(),
            phase,
            budget,
            last,
            console_tail: console::tail(&self.serial_log, 15),
        }
    }
}

/// Why a boot went wrong, as far as the guest's own evidence (printed on the console by the
/// seed's `bootcmd`) and the last power cut tell: indented lines for an error message, empty
/// when there is nothing to say.
pub fn diagnosis(serial_log: &std::path::Path, offset: u64, cut: Option<&PowerCut>) -> String {
    let evidence = console::evidence_after(serial_log, offset);
    let mut out = String::new();
    for e in &evidence {
        out.push_str(&format!("\n  the guest reports: {e}"));
    }
    if let Some(cut) = cut {
        out.push_str(&format!("\n  {cut}"));
    }
    let empty_host_keys = evidence.iter().any(|e| e.contains("ssh_host_"));
    match cut {
        Some(cut) if empty_host_keys && cut.last_flush.is_none() => out.push_str(&format!(
            "\n  likely cause: host keys empty after a power cut within ~30 s of first boot: \
             provisioning not flushed (the cut came {:.0} s after provisioning ({}); ext4 \
             writes new file data back only after ~30 s). Keep the spec's provisioning flush on, \
             or call Vm::flush before cutting power",
            cut.after_provisioning.as_secs_f64(),
            cut.ready
        )),
        Some(_) if empty_host_keys => out.push_str(
            "\n  likely cause: files empty although the harness flushed them: something on the \
             device rewrote them after the flush and the cut came before its writeback",
        ),
        _ => {}
    }
    out
}

/// A `systemctl --user` command for `user`, with the runtime dir user units need.
pub fn user_systemctl(user: &str, args: &str) -> String {
    let u = shell_quote(user);
    format!("sudo -n -u {u} XDG_RUNTIME_DIR=/run/user/$(id -u {u}) systemctl --user {args}")
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.keep {
            if let Some(mut owner) = OwnerRecord::read(&self.run_dir) {
                owner.kept = true; // the reaper must not take it
                let _ = owner.write(&self.run_dir);
            }
            let uri = &self.libvirt.uri;
            let [disk, seed, _vars] = reaper::volume_names(&self.name);
            eprintln!(
                "devicelab: keeping VM {name} (DEVICELAB_KEEP=1). Log in with:\n  {ssh}\n  \
                 remove it with: virsh -c {uri} destroy {name}; virsh -c {uri} undefine --nvram {name}; \
                 virsh -c {uri} vol-delete --pool {pool} {disk}; virsh -c {uri} vol-delete --pool {pool} {seed}; \
                 rm -r {run_dir}",
                name = self.name,
                ssh = self.ssh_command(),
                pool = crate::pool::POOL_NAME,
                run_dir = self.run_dir.display(),
            );
            return;
        }
        teardown(&self.libvirt, &self.pool, &self.name, &self.run_dir);
        if !self.keep_run_dir.load(Ordering::SeqCst) {
            let _ = std::fs::remove_dir_all(&self.run_dir);
        }
    }
}
