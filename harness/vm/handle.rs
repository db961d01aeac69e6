//! A VM ("the handle"): reachable over SSH, power-cyclable, removed by `remove` or when
//! dropped (also when the test panics). [`super::start`] creates it; the wait verbs live in
//! [`super::waits`], the fault verbs in [`super::faults`].

use super::artifacts;
use super::console;
use super::error::VmError;
use super::teardown::Owned;
use crate::host::reaper::{self, CleanupGuard, OwnerRecord};
use crate::host::serial::{self, SETTLE_BUDGET};
use crate::model::arch::{Budgets, VmArchitecture};
use crate::model::spec::Readiness;
use crate::ssh::keys::HostKey;
use crate::ssh::{ExecOutput, Route, SshError, SshSession, SshTarget};
use crate::support::probe;
use russh::keys::PrivateKey;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long each phase took, in order, for the trial report.
#[derive(Debug, Clone, Default)]
pub struct PhaseTimings(Arc<Mutex<Vec<(String, Duration)>>>);

impl PhaseTimings {
    /// Appends `phase` and how long it took (and logs it).
    pub fn record(&self, phase: &str, took: Duration) {
        tracing::info!("phase {phase}: {:.1} s", took.as_secs_f64());
        self.0.lock().unwrap().push((phase.to_owned(), took));
    }
    /// Every phase recorded so far, in order, with how long it took.
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
    /// What provisioning waited for (the spec's readiness).
    pub ready: Readiness,
    /// The time from the end of provisioning to the cut (zero if provisioning never ended).
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

/// A VM ("the handle"): reachable over SSH, power-cyclable, removed by [`Vm::remove`] or,
/// failing that, when dropped. `vm::start` creates it; it knows nothing of the lab.
pub struct Vm {
    pub(crate) owned: Owned,
    arch: VmArchitecture,
    /// Taken by `Drop`/`remove`, which keep it registered until the teardown is done.
    interrupt_guard: Option<CleanupGuard>,
    /// Known once the DHCP lease wait found it.
    pub(crate) ip: OnceLock<Ipv4Addr>,
    pub(crate) login: Login,
    /// How the guest's ports are reached: directly, or through its libvirt host.
    pub(crate) route: Route,
    pub(crate) session: tokio::sync::Mutex<Option<SshSession>>,
    pub(crate) budgets: Budgets,
    pub(crate) serial_log: PathBuf,
    keep: bool,
    known_hosts: PathBuf,
    /// Where the current boot's output starts in the serial log.
    pub(crate) boot_offset: AtomicU64,
    /// An SSH login worked at least once: the guest can be asked for its own logs.
    pub(crate) ssh_reached: AtomicBool,
    /// Set once failure artifacts were kept: the run dir then outlives the VM.
    keep_run_dir: AtomicBool,
    flush_provisioning: bool,
    durability: Mutex<Durability>,
    /// Set by `remove`: `Drop` has nothing left to do.
    removed: bool,
    /// How long each phase took: the first boot's waits, then whatever the test or trial
    /// records (onboarding, the first status, a power cycle's recovery).
    pub timings: PhaseTimings,
    /// The faults injected (`faults`), with when each took effect.
    pub(crate) faults: Mutex<Vec<(String, std::time::SystemTime)>>,
}

impl fmt::Debug for Vm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vm")
            .field("name", &self.owned.name)
            .field("arch", &self.arch)
            .field("ip", &self.ip())
            .field("run_dir", &self.owned.run_dir)
            .finish_non_exhaustive()
    }
}

/// How the harness logs in: the admin user, the client key, and the host key it verifies.
pub(crate) struct Login {
    pub user: String,
    pub key: Arc<PrivateKey>,
    pub key_path: PathBuf,
    pub host_key: HostKey,
}

/// What a start hands a new handle.
pub(crate) struct VmParts {
    pub owned: Owned,
    pub arch: VmArchitecture,
    pub login: Login,
    pub route: Route,
    pub budgets: Budgets,
    pub serial_log: PathBuf,
    pub keep: bool,
    pub flush_provisioning: bool,
}

impl Vm {
    /// A handle for a VM whose run dir and owner record exist; from here on, dropping it
    /// removes whatever of the VM has been created.
    pub(crate) fn new(p: VmParts) -> Self {
        let interrupt_guard = Some(p.owned.on_interrupt());
        Self {
            known_hosts: p.owned.run_dir.join("known_hosts"),
            owned: p.owned,
            arch: p.arch,
            interrupt_guard,
            ip: OnceLock::new(),
            login: p.login,
            route: p.route,
            session: tokio::sync::Mutex::new(None),
            budgets: p.budgets,
            serial_log: p.serial_log,
            keep: p.keep,
            boot_offset: AtomicU64::new(0),
            ssh_reached: AtomicBool::new(false),
            keep_run_dir: AtomicBool::new(false),
            flush_provisioning: p.flush_provisioning,
            durability: Mutex::default(),
            removed: false,
            timings: PhaseTimings::default(),
            faults: Mutex::default(),
        }
    }

    /// Records the guest's address (the lease wait) and writes the known_hosts a human's ssh
    /// command uses.
    pub(crate) fn set_ip(&self, ip: Ipv4Addr) -> Result<(), VmError> {
        let _ = self.ip.set(ip);
        let line = format!(
            "{}\n",
            self.login.host_key.known_hosts_line(&ip.to_string())
        );
        std::fs::write(&self.known_hosts, line).map_err(|source| VmError::RunDir {
            vm: self.owned.name.clone(),
            path: self.known_hosts.clone(),
            source,
        })
    }

    /// Where SSH goes: an error before the lease gave the guest an address.
    pub(crate) fn target(&self) -> Result<SshTarget, VmError> {
        let ip = *self.ip.get().ok_or_else(|| VmError::NoAddress {
            vm: self.owned.name.clone(),
        })?;
        Ok(SshTarget {
            addr: SocketAddr::from((ip, 22)),
            user: self.login.user.clone(),
            key: self.login.key.clone(),
            host_key: self.login.host_key.public.clone(),
            via: self.route.via(),
        })
    }

    pub(crate) fn mark_provisioned(&self, ready: Readiness) {
        self.durability
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .provisioned = Some((ready, Instant::now()));
    }

    /// A provisioning failure once the domain has started: the run dir (serial log, domain
    /// XML) is kept, with the guest's own logs when SSH ever worked, and the error says where.
    pub(crate) async fn keep_artifacts_of(&self, error: VmError) -> VmError {
        self.keep_run_dir.store(true, Ordering::SeqCst);
        let unkept = if self.ssh_reached.load(Ordering::SeqCst) {
            self.collect_artifacts_checked(&[]).await
        } else {
            Vec::new()
        };
        VmError::Provision {
            vm: self.owned.name.clone(),
            artifacts: self.owned.run_dir.clone(),
            unkept,
            source: Box::new(error),
        }
    }

    /// The libvirt URI of the host the VM runs on.
    pub fn host_uri(&self) -> &str {
        &self.owned.libvirt.uri
    }

    /// The VM's libvirt domain name: the spec's name on a cold start, the saved VM's on a
    /// warm one.
    pub fn name(&self) -> &str {
        &self.owned.name
    }
    /// The architecture the VM boots as.
    pub fn arch(&self) -> VmArchitecture {
        self.arch
    }
    /// The guest's address; `None` only before the DHCP lease wait found it.
    pub fn ip(&self) -> Option<Ipv4Addr> {
        self.ip.get().copied()
    }
    /// The budgets its waits and commands get: its architecture's and accelerator's, scaled
    /// by DEVICELAB_BUDGET_SCALE.
    pub fn budgets(&self) -> Budgets {
        self.budgets
    }
    /// The file the guest's serial console is logged to, every boot of it in order.
    pub fn serial_log(&self) -> &std::path::Path {
        &self.serial_log
    }

    /// The command a human can paste to log in (it verifies the host key too).
    pub fn ssh_command(&self) -> String {
        let ip = self
            .ip()
            .map_or_else(|| "<no address yet>".to_owned(), |ip| ip.to_string());
        let through: String = self
            .route
            .ssh_options()
            .iter()
            .map(|o| format!("{} ", crate::ssh::shell_quote(o)))
            .collect();
        format!(
            "ssh -i {} -o UserKnownHostsFile={} {through}{}@{ip}",
            self.login.key_path.display(),
            self.known_hosts.display(),
            self.login.user,
        )
    }

    /// Runs a shell command as the admin user and returns what it did, whatever its status.
    pub async fn exec(&self, command: &str) -> Result<ExecOutput, VmError> {
        self.exec_with_input(command, None).await
    }

    /// [`Vm::exec`] with `input` (if any) written to the command's stdin.
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
        let session = match guard.take() {
            Some(s) if !s.is_closed() => s,
            _ => SshSession::connect(&self.target()?, probe::CONNECT_TIMEOUT)
                .await
                .map_err(|source| self.ssh_err(source))?,
        };
        let result = session.exec_within(command, input, timeout).await;
        // A timed-out command keeps its channel: the session goes with it.
        if !matches!(result, Err(SshError::CommandTimeout { .. })) {
            *guard = Some(session);
        }
        result.map_err(|source| self.ssh_err(source))
    }

    /// Runs a command that must succeed; returns its stdout.
    pub async fn succeed(&self, command: &str) -> Result<String, VmError> {
        let out = self.exec(command).await?;
        self.check(command, out)
    }

    /// Runs a command that must fail (a non-zero exit); returns what it printed (stdout, then
    /// stderr), for asserting on the refusal.
    pub async fn fail(&self, command: &str) -> Result<String, VmError> {
        let out = self.exec(command).await?;
        if out.success() {
            return Err(VmError::UnexpectedSuccess {
                vm: self.owned.name.clone(),
                command: command.to_owned(),
                stdout: out.stdout,
            });
        }
        Ok(format!("{}{}", out.stdout, out.stderr))
    }

    fn check(&self, command: &str, out: ExecOutput) -> Result<String, VmError> {
        if out.success() {
            return Ok(out.stdout);
        }
        Err(VmError::CommandFailed {
            vm: self.owned.name.clone(),
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

    /// Writes `contents` to `remote_path` on the guest with permission bits `mode`, atomically
    /// (a temporary file renamed into place), as the admin user or, with `sudo`, as root. Not
    /// flushed: call [`Vm::flush`] if it must survive a power cut.
    pub async fn upload(
        &self,
        contents: &[u8],
        remote_path: &str,
        mode: u32,
        sudo: bool,
    ) -> Result<(), VmError> {
        let command = crate::ssh::session::upload_command(remote_path, mode, sudo);
        let out = self.exec_with_input(&command, Some(contents)).await?;
        self.check(&format!("upload {remote_path}"), out).map(drop)
    }

    pub(crate) fn ssh_err(&self, source: SshError) -> VmError {
        VmError::Ssh {
            vm: self.owned.name.clone(),
            source,
        }
    }

    /// The guest kernel's boot id (`/proc/sys/kernel/random/boot_id`): a new one on every boot.
    pub async fn boot_id(&self) -> Result<String, VmError> {
        Ok(self
            .succeed("cat /proc/sys/kernel/random/boot_id")
            .await?
            .trim()
            .to_owned())
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

    /// Whether the harness flushes what it writes while provisioning (the spec's switch).
    pub(crate) fn flushes_provisioning(&self) -> bool {
        self.flush_provisioning
    }

    /// Flushes what the harness itself wrote (provisioning; onboarding flushes in its own
    /// script) unless the spec turned that off; either way it is logged, so a power cut's
    /// report says what was durable.
    pub(crate) async fn flush_harness_writes(&self, what: &str) -> Result<(), VmError> {
        if !self.flush_provisioning {
            tracing::info!(
                "VM {}: not flushing {what} (the spec turned provisioning flushes off)",
                self.owned.name
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
            self.owned.name,
            started.elapsed().as_secs_f64()
        );
        self.flushed(what);
        Ok(())
    }

    /// Records that `what` is durable now (a power cut's report says so).
    pub(crate) fn flushed(&self, what: &str) {
        self.durability
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_flush = Some((what.to_owned(), Instant::now()));
    }

    /// The last hard power cut, with what had been flushed before it.
    pub fn last_power_cut(&self) -> Option<PowerCut> {
        self.durability
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_cut
            .clone()
    }

    /// Pulls the plug (libvirt destroy): whatever the guest has not flushed is lost, as on a
    /// real device. The SSH session goes with it.
    pub async fn power_off(&self) -> Result<(), VmError> {
        self.session.lock().await.take();
        let name = self.owned.name.clone();
        self.owned
            .libvirt
            .run(move |lv| lv.power_off(&lv.domain(&name)?, &name))
            .await?;
        let cut = {
            let mut d = self.durability.lock().unwrap_or_else(|p| p.into_inner());
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
        tracing::info!("VM {}: power cut: {cut}", self.owned.name);
        Ok(())
    }

    /// Powers the VM on again after [`Vm::power_off`]; returns at once (see `wait_for_ssh`).
    pub async fn power_on(&self) -> Result<(), VmError> {
        // The last boot's console all in the log first: what follows is the new boot's.
        let log = self.serial_log.clone();
        self.owned
            .libvirt
            .run(move |_| serial::settle(&log, SETTLE_BUDGET))
            .await;
        self.boot_offset
            .store(console::len(&self.serial_log), Ordering::SeqCst);
        let (owned, serial_log) = (self.owned.clone(), self.serial_log.clone());
        Ok(self
            .owned
            .libvirt
            .run(move |lv| {
                let _held = owned.lifecycle.lock().unwrap_or_else(|p| p.into_inner());
                lv.start(&lv.domain(&owned.name)?, &owned.name, &serial_log)
            })
            .await?)
    }

    /// The directory that holds this VM's serial log, domain XML and known_hosts.
    pub fn run_dir(&self) -> &std::path::Path {
        &self.owned.run_dir
    }

    /// Saves what explains a failure into the run dir (which then outlives the VM): the
    /// serial log and domain XML are there already; this adds cloud-init's logs and status and
    /// the boot's journal, plus `extra` (file name, command) pairs. Best effort, each item
    /// within the budget table's `artifact_item`.
    pub async fn collect_artifacts(&self, extra: &[(&str, &str)]) -> PathBuf {
        self.collect_artifacts_checked(extra).await;
        self.owned.run_dir.clone()
    }

    /// [`Vm::collect_artifacts`], returning the files that could not be written, with why.
    pub(crate) async fn collect_artifacts_checked(&self, extra: &[(&str, &str)]) -> Vec<String> {
        self.keep_run_dir.store(true, Ordering::SeqCst);
        let target = self.target().ok();
        let dir = &self.owned.run_dir;
        artifacts::collect(target.as_ref(), dir, extra, self.budgets.artifact_item).await
    }

    /// The last lines of the serial console.
    pub fn console_tail(&self, n: usize) -> Vec<String> {
        console::tail(&self.serial_log, n)
    }

    pub(crate) fn timeout(&self, phase: &str, budget: Duration, last: String) -> VmError {
        VmError::Timeout {
            vm: self.owned.name.clone(),
            phase: phase.to_owned(),
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

impl Vm {
    /// Removes the VM whatever DEVICELAB_KEEP says: one whose domain never ran has nothing
    /// to look at.
    pub(crate) async fn discard(mut self) -> Result<(), VmError> {
        self.keep = false;
        self.remove().await
    }

    /// Removes the VM now (domain, NVRAM, volumes; the run dir unless failure artifacts were
    /// kept) and says whether that worked. With DEVICELAB_KEEP=1 the VM is kept instead, as
    /// on drop. Dropping a handle does the same in the background and only logs errors.
    pub async fn remove(mut self) -> Result<(), VmError> {
        self.removed = true;
        if self.keep {
            self.announce_kept();
            return Ok(());
        }
        self.session.lock().await.take();
        let owned = self.owned.clone();
        let keep_dir = self.keep_run_dir.load(Ordering::SeqCst);
        let guard = self.interrupt_guard.take();
        tokio::task::spawn_blocking(move || {
            let result = owned.remove(keep_dir);
            drop(guard);
            result
        })
        .await
        .map_err(|e| VmError::Task(e.to_string()))??;
        Ok(())
    }

    /// DEVICELAB_KEEP: the owner record says "kept" (the reaper leaves it), and the user gets
    /// the commands to log in and to remove it.
    fn announce_kept(&self) {
        self.owned.hold_until_exit();
        let run_dir = &self.owned.run_dir;
        if let Some(mut owner) = OwnerRecord::read(run_dir) {
            owner.kept = true;
            if let Err(e) = owner.write(run_dir) {
                eprintln!("devicelab: cannot mark {} as kept: {e}", run_dir.display());
            }
        }
        let uri = &self.owned.libvirt.uri;
        let [disk, seed, _vars] = reaper::volume_names(&self.owned.name);
        eprintln!(
            "devicelab: keeping VM {name} (DEVICELAB_KEEP=1). Log in with:\n  {ssh}\n  \
             remove it with: virsh -c {uri} destroy {name}; virsh -c {uri} undefine --nvram {name}; \
             virsh -c {uri} vol-delete --pool {pool} {disk}; virsh -c {uri} vol-delete --pool {pool} {seed}; \
             rm -r {run_dir}",
            name = self.owned.name,
            ssh = self.ssh_command(),
            pool = crate::host::pool::POOL_NAME,
            run_dir = run_dir.display(),
        );
    }
}

impl Drop for Vm {
    /// The fallback when `remove` was not awaited: never blocks a runtime worker on libvirt
    /// (the teardown gets a thread of its own, joined before the process exits).
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        if self.keep {
            self.announce_kept();
            return;
        }
        // A test that panics with its VM up keeps the evidence, as a failed trial does: the
        // guest's logs are read before the VM goes (on the teardown's own thread).
        let panicking = std::thread::panicking();
        let collect = panicking
            && !self.keep_run_dir.load(Ordering::SeqCst)
            && self.ssh_reached.load(Ordering::SeqCst);
        let keep_dir = self.keep_run_dir.load(Ordering::SeqCst) || panicking;
        if panicking {
            eprintln!(
                "devicelab: the test failed with VM {} up; what explains it is kept in {}",
                self.owned.name,
                self.owned.run_dir.display()
            );
        }
        let Some(guard) = self.interrupt_guard.take() else {
            return;
        };
        let collect = collect.then(|| (self.target().ok(), self.budgets.artifact_item));
        let owned = self.owned.clone();
        let teardown = move || {
            if let Some((target, budget)) = collect {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => {
                        let unkept = rt.block_on(artifacts::collect(
                            target.as_ref(),
                            &owned.run_dir,
                            &[],
                            budget,
                        ));
                        if !unkept.is_empty() {
                            eprintln!(
                                "devicelab: this evidence could not be kept in {} (is its disk full?): {}",
                                owned.run_dir.display(),
                                unkept.join("; ")
                            );
                        }
                    }
                    Err(e) => eprintln!("devicelab: no runtime to collect the artifacts: {e}"),
                }
            }
            if let Err(e) = owned.remove(keep_dir) {
                eprintln!("devicelab: {e}");
            }
            // Registered until the teardown is done: an interrupt meanwhile still cleans up.
            drop(guard);
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            crate::support::background::in_background(self.owned.claimed_name(), teardown);
        } else {
            teardown();
        }
    }
}
