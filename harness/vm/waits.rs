//! Wait strategies: what "ready" means, as a list a start applies in order with the console
//! guard around it (a fatal console line or an idle guest ends any wait at once). Provisioning
//! applies the spec's list (lease, port 22, SSH login, cloud-init done, then the test's own);
//! a power-on applies the same strategies minus the lease. The probes below poll tightly with a
//! short backoff; none sleeps a fixed time.

use super::console;
use super::error::VmError;
use super::handle::{Vm, diagnosis};
use crate::model::wait::Wait;
use crate::ssh::login::ssh_login;
use crate::ssh::{Route, SshError, shell_quote, user_systemctl};
use crate::support::probe::{BACKOFF, poll, poll_every};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How often a port wait tries, and how long one try may take.
const PORT_POLL: Duration = Duration::from_millis(200);
const PORT_ATTEMPT: Duration = Duration::from_secs(1);

/// Why a boot cannot succeed, as the console guard saw it.
pub enum BootTrouble {
    /// A fatal console line (kernel panic, emergency shell, a failed sshd, ...) and its meaning.
    Fatal(String, &'static str),
    /// The guest sat idle (its login prompt, or cloud-init's final message, on the console) for
    /// the idle grace while port 22 refused connections.
    Idle(String),
}

/// Watches this boot's console (after byte `offset`), reading the log once a second, and
/// resolves on the first sign the boot cannot succeed: a fatal line, or the guest idle (its boot
/// finished, [`console::idle_marker_in`]) for `grace` while `ssh` (once the address is known)
/// refuses connections (seen along `route`). Raced against every wait, so a dead boot fails at
/// once instead of burning the budget.
pub async fn watch_boot(
    serial_log: PathBuf,
    offset: u64,
    route: &Route,
    ssh: impl Fn() -> Option<SocketAddr>,
    grace: Duration,
) -> BootTrouble {
    let mut idle_since: Option<Instant> = None;
    loop {
        let log = serial_log.clone();
        let text = tokio::task::spawn_blocking(move || console::boot_text(&log, offset))
            .await
            .unwrap_or_default();
        if let Some((line, meaning)) = console::fatal_line_in(&text) {
            return BootTrouble::Fatal(line, meaning);
        }
        let marker = console::idle_marker_in(&text);
        let refused = match (ssh(), marker) {
            (Some(addr), Some(_)) => matches!(
                route.probe(addr).await,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
            ),
            _ => false,
        };
        if let (true, Some(marker)) = (refused, marker) {
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= grace {
                return BootTrouble::Idle(format!(
                    "the guest has finished booting ({marker} is on the console) and port 22 has \
                     refused connections for {:.0} s",
                    since.elapsed().as_secs_f64()
                ));
            }
        } else {
            idle_since = None;
        }
        tokio::time::sleep(BACKOFF).await;
    }
}

/// Whether the VM is on its first boot (provisioning) or was powered on again: budgets differ,
/// and only a first boot has a lease worth waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boot {
    First,
    Again,
}

impl Vm {
    fn boot(&self) -> Boot {
        if self.boot_offset.load(Ordering::SeqCst) == 0 {
            Boot::First
        } else {
            Boot::Again
        }
    }

    /// The budget table's entry for `wait` on this boot.
    fn budget_for(&self, wait: &Wait) -> Duration {
        let b = &self.budgets;
        let boot = match self.boot() {
            Boot::First => b.ssh,
            Boot::Again => b.power_cycle_recovery,
        };
        match wait {
            Wait::Lease => b.lease,
            Wait::OpenPort(_) | Wait::SshLogin | Wait::ConsoleText(_) => boot,
            Wait::CloudInitDone => b.cloud_init,
            Wait::UnitActive { .. } => b.first_status,
            Wait::CommandSucceeds(_) => b.command,
        }
    }

    /// Waits for one strategy, within its budget, with the console guard around it; returns
    /// what it found (the console line, the command's stdout), if anything.
    pub async fn wait_for(&self, wait: &Wait) -> Result<Option<String>, VmError> {
        let deadline = Instant::now() + self.budget_for(wait);
        self.guarded(self.wait_until(wait, deadline, self.budget_for(wait)))
            .await
    }

    /// Applies `waits` in order; each one's budget counts from `started` (the define, or the
    /// power on), as a user's stopwatch would. First-boot phases go into the trial's timings.
    pub(crate) async fn wait_all(&self, waits: &[Wait], started: Instant) -> Result<(), VmError> {
        let first = self.boot() == Boot::First;
        self.guarded(async {
            for wait in waits {
                let budget = self.budget_for(wait);
                self.wait_until(wait, started + budget, budget).await?;
                if first {
                    self.timings.record(&wait.to_string(), started.elapsed());
                }
            }
            Ok(())
        })
        .await
    }

    /// A restored clone's waits: port 22, then an SSH login, both within the restore budget
    /// from `started` (not the first boot's: a saved VM that does not come back in seconds is
    /// broken, and the request is better off booting cold). Each one's own time goes into the
    /// timings (`warm restore: port 22`, `warm restore: ssh`).
    pub(crate) async fn wait_restored(&self, started: Instant) -> Result<(), VmError> {
        let budget = self.budgets.restore;
        self.guarded(async {
            for wait in [Wait::OpenPort(22), Wait::SshLogin] {
                let part = Instant::now();
                self.wait_until(&wait, started + budget, budget).await?;
                self.timings
                    .record(&format!("warm restore: {wait}"), part.elapsed());
            }
            Ok(())
        })
        .await
    }

    async fn wait_until(
        &self,
        wait: &Wait,
        deadline: Instant,
        budget: Duration,
    ) -> Result<Option<String>, VmError> {
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout = |last: String| self.timeout(&wait.to_string(), budget, last);
        match wait {
            Wait::Lease => {
                if let Some(ip) = self.ip() {
                    return Ok(Some(ip.to_string()));
                }
                let ip = self.lease(left).await.map_err(timeout)?;
                self.set_ip(ip)?;
                Ok(Some(ip.to_string()))
            }
            Wait::OpenPort(port) => {
                let addr = SocketAddr::new(self.target()?.addr.ip(), *port);
                let route = &self.route;
                // Short attempts, often: the port is seen within a fraction of a second of
                // opening, not at the kernel's next retransmitted SYN (1, 3, 7 s).
                poll_every(left, PORT_POLL, || async move {
                    route
                        .probe_within(addr, PORT_ATTEMPT)
                        .await
                        .map_err(|e| format!("connect {addr}: {e}"))
                })
                .await
                .map_err(timeout)
                .map(|()| None)
            }
            Wait::SshLogin => self.log_in(left).await.map(|()| None),
            Wait::CloudInitDone => self.cloud_init_done(left).await.map(|()| None),
            Wait::UnitActive { unit, user } => self
                .unit_active(unit, user.as_deref(), left)
                .await
                .map_err(timeout)
                .map(|()| None),
            Wait::ConsoleText(text) => self
                .console_text(text, left)
                .await
                .map_err(timeout)
                .map(Some),
            Wait::CommandSucceeds(command) => self
                .command_succeeds(command, left)
                .await
                .map_err(timeout)
                .map(Some),
        }
    }

    /// [`Wait::Lease`]: this instance's DHCP lease, by its MAC.
    async fn lease(&self, left: Duration) -> Result<Ipv4Addr, String> {
        poll(left, || async {
            let name = self.name().to_owned();
            match self
                .owned
                .libvirt
                .run(move |lv| lv.lease_ipv4(&lv.domain(&name)?, &name))
                .await
            {
                Ok(Some(ip)) => Ok(ip),
                Ok(None) => Err("no lease yet".to_owned()),
                Err(e) => Err(e.to_string()),
            }
        })
        .await
    }

    /// [`Wait::SshLogin`]: a verified login; the session is kept for the verbs.
    async fn log_in(&self, left: Duration) -> Result<(), VmError> {
        let session = ssh_login(&self.target()?, left)
            .await
            .map_err(|source| self.ssh_err(source))?;
        *self.session.lock().await = Some(session);
        self.ssh_reached.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// [`Wait::UnitActive`]: a system unit, or with `user` that user's unit, is active.
    async fn unit_active(
        &self,
        unit: &str,
        user: Option<&str>,
        left: Duration,
    ) -> Result<(), String> {
        let command = match user {
            None => format!("systemctl is-active {}", shell_quote(unit)),
            Some(u) => user_systemctl(u, &format!("is-active {}", shell_quote(unit))),
        };
        poll(left, || async {
            match self.exec(&command).await {
                Ok(out) if out.stdout.trim() == "active" => Ok(()),
                Ok(out) => Err(format!("{unit} is {}", out.stdout.trim())),
                Err(e) => Err(e.to_string()),
            }
        })
        .await
    }

    /// [`Wait::ConsoleText`]: the console line with `text`, printed after this boot began.
    async fn console_text(&self, text: &str, left: Duration) -> Result<String, String> {
        let offset = self.boot_offset.load(Ordering::SeqCst);
        poll(left, || async {
            let (log, wanted) = (self.serial_log.clone(), text.to_owned());
            tokio::task::spawn_blocking(move || console::line_with_after(&log, offset, &wanted))
                .await
                .ok()
                .flatten()
                .ok_or_else(|| format!("{text:?} not on the console yet"))
        })
        .await
    }

    /// [`Wait::CommandSucceeds`]: `command` exits 0; its stdout.
    async fn command_succeeds(&self, command: &str, left: Duration) -> Result<String, String> {
        poll(left, || async {
            match self.exec(command).await {
                Ok(out) if out.success() => Ok(out.stdout),
                Ok(out) => Err(format!(
                    "exit {}: {}",
                    out.exit_status.map_or("?".into(), |s| s.to_string()),
                    out.stderr.trim()
                )),
                Err(e) => Err(e.to_string()),
            }
        })
        .await
    }

    /// `cloud-init status --wait`: 0 = done; 2 = done with recoverable errors (newer
    /// cloud-init); anything else, or a run without the NoCloud seed, is a failure.
    async fn cloud_init_done(&self, budget: Duration) -> Result<(), VmError> {
        let command = "sudo -n cloud-init status --wait --long";
        let out = match self.exec_within(command, None, budget).await {
            Err(VmError::Ssh {
                source: SshError::CommandTimeout { .. },
                ..
            }) => {
                return Err(self.timeout(
                    "cloud-init done",
                    self.budgets.cloud_init,
                    "still running".into(),
                ));
            }
            other => other?,
        };
        let text = format!("{}{}", out.stdout, out.stderr);
        if !matches!(out.exit_status, Some(0) | Some(2)) {
            return Err(VmError::CloudInit {
                vm: self.name().to_owned(),
                output: text,
            });
        }
        if text.contains("DataSourceNone") {
            return Err(VmError::CloudInit {
                vm: self.name().to_owned(),
                output: format!(
                    "{text}\n(the NoCloud seed was not seen: the guest kernel lacks the driver for its cdrom)"
                ),
            });
        }
        Ok(())
    }

    /// Waits until cloud-init is done ([`Wait::CloudInitDone`]).
    pub async fn wait_for_cloud_init(&self) -> Result<(), VmError> {
        self.wait_for(&Wait::CloudInitDone).await.map(drop)
    }

    /// Waits until a systemd unit is active: a system unit, or with `user` that user's unit.
    pub async fn wait_for_unit(&self, unit: &str, user: Option<&str>) -> Result<(), VmError> {
        let wait = Wait::UnitActive {
            unit: unit.to_owned(),
            user: user.map(str::to_owned),
        };
        self.wait_for(&wait).await.map(drop)
    }

    /// Waits until something listens on `port` of the guest.
    pub async fn wait_for_open_port(&self, port: u16) -> Result<(), VmError> {
        self.wait_for(&Wait::OpenPort(port)).await.map(drop)
    }

    /// Waits until `text` appears on this boot's console; returns the line.
    pub async fn wait_for_console_text(&self, text: &str) -> Result<String, VmError> {
        let line = self.wait_for(&Wait::ConsoleText(text.to_owned())).await?;
        Ok(line.unwrap_or_default())
    }

    /// Runs `command` until it exits 0 (within the command budget); returns its stdout.
    pub async fn wait_until_succeeds(&self, command: &str) -> Result<String, VmError> {
        let out = self
            .wait_for(&Wait::CommandSucceeds(command.to_owned()))
            .await?;
        Ok(out.unwrap_or_default())
    }

    /// Waits for SSH to come back on this boot: [`Wait::OpenPort`] 22, then
    /// [`Wait::SshLogin`]. Not for the lease: after a power cycle the old lease is listed at
    /// once, so it says nothing about the new boot. Fails at once on a fatal console line
    /// (sshd failing included) or a guest idle with nothing listening,
    /// with the evidence and the last power cut in the message.
    pub async fn wait_for_ssh(&self) -> Result<(), VmError> {
        self.wait_all(&[Wait::OpenPort(22), Wait::SshLogin], Instant::now())
            .await
    }

    /// [`Vm::power_on`], then [`Vm::wait_for_ssh`].
    pub async fn power_on_and_wait(&self) -> Result<(), VmError> {
        self.power_on().await?;
        self.wait_for_ssh().await
    }

    /// Runs `wait`, failing at once if the console shows this boot cannot succeed, or the
    /// guest sits idle (its boot finished) with nothing listening on port 22.
    async fn guarded<T>(
        &self,
        wait: impl std::future::Future<Output = Result<T, VmError>>,
    ) -> Result<T, VmError> {
        let offset = self.boot_offset.load(Ordering::SeqCst);
        let cut = self.last_power_cut();
        let serial_log = &self.serial_log;
        let ssh_addr = || self.ip().map(|ip| SocketAddr::from((ip, 22)));
        tokio::select! {
            r = wait => r,
            trouble = watch_boot(serial_log.clone(), offset, &self.route, ssh_addr, self.budgets.idle_grace) => Err(match trouble {
                BootTrouble::Fatal(line, meaning) => VmError::BootFailed {
                    vm: self.name().to_owned(),
                    meaning,
                    line,
                    cause: diagnosis(serial_log, offset, cut.as_ref()),
                    console_tail: console::tail(serial_log, 15),
                },
                BootTrouble::Idle(evidence) => VmError::NothingListening {
                    vm: self.name().to_owned(),
                    phase: "SSH",
                    evidence,
                    cause: diagnosis(serial_log, offset, cut.as_ref()),
                    console_tail: console::tail(serial_log, 15),
                },
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port nothing listens on: bound, then closed.
    fn refusing_port() -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    }

    /// The console guard gives up on a guest whose boot finished (either marker) while port 22
    /// refuses, after the grace and not before; a boot that shows neither is left to its wait.
    #[tokio::test]
    async fn a_finished_boot_with_port_22_refusing_is_idle_after_the_grace() {
        let port = refusing_port();
        let grace = Duration::from_secs(2);
        for (console, marker) in [
            ("debian login: ", Some("its login prompt")),
            (
                "[ 62.1] cloud-init[512]: Cloud-init v. 22.4.2 finished at Mon, 30 Nov 2026 \
                 15:55:01 +0000. Datasource DataSourceNoCloud.  Up 62.10 seconds\r\n",
                Some("cloud-init's final message"),
            ),
            (
                "[ 41.8] cloud-init[338]: Cloud-init v. 22.4.2 running 'modules:final'\r\n",
                None,
            ),
        ] {
            let log = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(log.path(), console).unwrap();
            let started = Instant::now();
            let watched = tokio::time::timeout(
                grace + Duration::from_secs(3),
                watch_boot(
                    log.path().to_owned(),
                    0,
                    &Route::Direct,
                    || Some(port),
                    grace,
                ),
            )
            .await;
            match (watched, marker) {
                (Ok(BootTrouble::Idle(evidence)), Some(marker)) => {
                    assert!(evidence.contains(marker), "{evidence}");
                    assert!(started.elapsed() >= grace, "{:?}", started.elapsed());
                }
                (Err(_), None) => {}
                (Ok(BootTrouble::Fatal(line, _)), _) => panic!("{console:?}: fatal {line}"),
                (Ok(BootTrouble::Idle(evidence)), None) => panic!("{console:?}: idle {evidence}"),
                (Err(_), Some(_)) => panic!("{console:?}: not seen as idle"),
            }
        }
    }
}
