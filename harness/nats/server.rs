//! The NATS server's lifecycle: configuration (a 0600 file: credentials never on a command
//! line), start as a podman container or a local process, the port it chose, readiness,
//! restart in place, and removal (or keeping it, with DEVICELAB_KEEP).

use super::identity::{DeviceUser, Identities};
use super::{NatsCredentials, NatsError, ReportLog, STREAM_NAME, StatusLog, js_err};
use crate::agent::description::{Decoder, Permissions, ReportsOn};
use crate::config::{HarnessConfig, NatsMode};
use crate::host::domain_xml::RunOwner;
use crate::host::reaper::{self, CleanupGuard};
use crate::ssh::route::Forward;
use crate::support::probe;
use async_nats::jetstream::{self, stream};
use devicelab_agent::DEFAULT_SUBJECT_PREFIX;
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

enum Runner {
    Container {
        name: String,
        podman: std::path::PathBuf,
    },
    Process {
        child: Child,
        command: Vec<std::ffi::OsString>,
    },
}

/// Where the server's files live, and what the server calls that place (the container sees
/// the directory mounted at [`CONTAINER_DIR`]).
struct ServerDir {
    host: std::path::PathBuf,
    seen_by_server: String,
}

const CONTAINER_DIR: &str = "/devicelab";
const CONFIG_FILE: &str = "nats.conf";
const LOG_FILE: &str = "server.log";

/// The server's configuration: credentials and the listen address stay out of every command
/// line (`/proc/*/cmdline`, `podman inspect`); `port: -1` lets the server pick a free port
/// and report it in its ports file, so no port is chosen here and bound later.
/// `authorization` holds the run's user and every device's ([`Identities::authorization`]).
/// `extra` (the agent description's own server settings) is appended as given. The server is
/// named (`name`, unique per server), as MQTT, leaf nodes and clusters require, so an agent's
/// block that turns one of them on needs nothing more.
fn config_text(
    name: &str,
    dir: &str,
    host: Ipv4Addr,
    port: Option<u16>,
    authorization: &str,
    extra: &str,
) -> String {
    let q = |s: &str| serde_json::to_string(s).expect("a string serializes");
    let port = port.map_or(-1, i32::from);
    format!(
        r#"# written by devicelab: this run's NATS server
server_name: {name}
host: {host}
port: {port}
ports_file_dir: {ports_dir}
authorization: {authorization}
jetstream {{
  store_dir: {store}
}}
# the agent's own settings (its description's nats_config)
{extra}
"#,
        name = q(name),
        host = q(&host.to_string()),
        ports_dir = q(dir),
        store = q(&format!("{dir}/jetstream")),
    )
}

/// Writes the configuration, readable by its owner only (it holds the passwords).
fn write_config(
    dir: &ServerDir,
    host: Ipv4Addr,
    port: Option<u16>,
    authorization: &str,
    extra: &str,
) -> Result<(), NatsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.host.join(CONFIG_FILE);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        let name = dir.host.file_name().map_or_else(
            || "devicelab".to_owned(),
            |n| n.to_string_lossy().into_owned(),
        );
        let text = config_text(&name, &dir.seen_by_server, host, port, authorization, extra);
        f.write_all(text.as_bytes())
    };
    write().map_err(|source| NatsError::Config {
        dir: dir.host.clone(),
        source,
    })
}

/// What nats-server writes to `<ports_file_dir>/nats-server_<pid>.ports`: its client URLs
/// under `nats` (and other listeners under other keys).
#[derive(Debug, serde::Deserialize)]
struct PortsFile {
    nats: Vec<String>,
}

/// The client port from the first ports file in `dir`, if one is there yet.
fn read_port(dir: &std::path::Path) -> Option<u16> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".ports"))
        .find_map(|e| {
            let ports: PortsFile = serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
            ports.nats.first()?.rsplit(':').next()?.parse().ok()
        })
}

fn remove_ports_files(dir: &std::path::Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().ends_with(".ports") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The running server, without the harness's client: what `Drop` cleans up.
struct Server {
    runner: Runner,
    dir: ServerDir,
    /// Removed with the server (or left in place with DEVICELAB_KEEP).
    dir_guard: Option<tempfile::TempDir>,
    port: u16,
    gateway: Ipv4Addr,
    credentials: NatsCredentials,
    keep: bool,
    /// How long the server may take to write its port and accept connections (scaled by
    /// DEVICELAB_BUDGET_SCALE).
    start_budget: Duration,
    /// Extra server configuration (the agent description's).
    extra: String,
    /// The devices' own users, written into the configuration.
    identities: std::sync::Mutex<Identities>,
    /// Held while the configuration is rewritten and reloaded: one reload at a time.
    reloading: tokio::sync::Mutex<()>,
    _interrupt_guard: Option<CleanupGuard>,
}

impl Server {
    async fn start(
        config: &HarnessConfig,
        gateway: Ipv4Addr,
        owner: &RunOwner,
        extra: &str,
    ) -> Result<Self, NatsError> {
        let credentials = NatsCredentials {
            user: "devicelab".into(),
            password: hex::encode(rand::random::<[u8; 16]>()),
        };
        // Private (0700): it holds the configuration with the password, and the JetStream store.
        // Named for its owner, so the reaper can remove it if this process is killed.
        let tmp = tempfile::Builder::new()
            .prefix(&reaper::nats_dir_prefix(owner.pid))
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir()
            .map_err(|source| NatsError::Config {
                dir: std::env::temp_dir(),
                source,
            })?;
        let container = matches!(config.nats, NatsMode::Container { .. });
        let dir = ServerDir {
            host: tmp.path().to_owned(),
            seen_by_server: if container {
                CONTAINER_DIR.to_owned()
            } else {
                tmp.path().display().to_string()
            },
        };
        let identities = Identities {
            reload_password: hex::encode(rand::random::<[u8; 16]>()),
            ..Identities::default()
        };
        // Only where the test and the guests reach it: the libvirt network's gateway.
        write_config(
            &dir,
            gateway,
            None,
            &identities.authorization(&credentials),
            extra,
        )?;
        let server_config = format!("{}/{CONFIG_FILE}", dir.seen_by_server);
        let runner = match &config.nats {
            NatsMode::Container { image } => {
                let name = format!(
                    "devicelab-nats-{}-{}",
                    owner.run_id,
                    hex::encode(rand::random::<[u8; 3]>())
                );
                // Host networking: the host's own network namespace is where the VMs' bridge is.
                let start = reaper::process_start_time(owner.pid).unwrap_or(0);
                // No --rm: it would delete the container on restart(); drop removes it.
                let mut args: Vec<String> = ["run", "-d", "--network", "host", "--name", &name]
                    .map(str::to_owned)
                    .to_vec();
                for label in [
                    format!("devicelab.run={}", owner.run_id),
                    format!("devicelab.pid={}", owner.pid),
                    format!("devicelab.start={start}"),
                    format!("devicelab.kept={}", u8::from(config.keep)),
                ] {
                    args.extend(["--label".to_owned(), label]);
                }
                args.extend([
                    "-v".to_owned(),
                    format!("{}:{CONTAINER_DIR}", dir.host.display()),
                    image.clone(),
                    "-c".to_owned(),
                    server_config.clone(),
                ]);
                let output = match podman_output(&config.podman, &args).await {
                    Ok(output) => output,
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                        return Err(NatsError::ContainerStart {
                            image: image.clone(),
                            stderr: e.to_string(),
                        });
                    }
                    Err(source) => {
                        return Err(NatsError::Missing {
                            program: config.podman.display().to_string(),
                            source,
                            fix: "install podman (fixtures/host/setup.sh), or set DEVICELAB_NATS=process",
                        });
                    }
                };
                if !output.status.success() {
                    return Err(NatsError::ContainerStart {
                        image: image.clone(),
                        stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
                    });
                }
                Runner::Container {
                    name,
                    podman: config.podman.clone(),
                }
            }
            NatsMode::Process { binary } => {
                let command: Vec<std::ffi::OsString> =
                    vec![binary.into(), "-c".into(), server_config.into()];
                let child = spawn_server(&command, &dir.host, config.keep).map_err(|source| {
                    NatsError::Missing {
                        program: binary.display().to_string(),
                        source,
                        fix: "install nats-server, or set DEVICELAB_NATS_SERVER to its path",
                    }
                })?;
                Runner::Process { child, command }
            }
        };
        let interrupt_guard = interrupt_guard(&runner, tmp.path());
        // Constructed before waiting, so a start that never becomes ready is still cleaned up.
        let mut server = Self {
            runner,
            dir,
            dir_guard: Some(tmp),
            port: 0,
            gateway,
            credentials,
            keep: config.keep,
            start_budget: config.host_budgets().nats_start,
            extra: extra.to_owned(),
            identities: std::sync::Mutex::new(identities),
            reloading: tokio::sync::Mutex::new(()),
            _interrupt_guard: Some(interrupt_guard),
        };
        server.port = server.wait_for_port().await?;
        // A restart must come back on the same port: the agents were told this one.
        server.rewrite_config()?;
        Ok(server)
    }

    fn identities(&self) -> std::sync::MutexGuard<'_, Identities> {
        self.identities.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the configuration as it stands (port, users) for the next start or reload.
    fn rewrite_config(&self) -> Result<(), NatsError> {
        let authorization = self.identities().authorization(&self.credentials);
        write_config(
            &self.dir,
            self.gateway,
            Some(self.port),
            &authorization,
            &self.extra,
        )
    }

    /// Gives each device its own user, allowed what `permissions` say (a device already known
    /// keeps its password; its permissions are replaced), reloads the server's configuration,
    /// and returns once the server runs it; `true` with the credentials when it reloaded.
    /// Nothing changes unless every name is valid and the reload took: the users kept are
    /// always the ones the server runs. The caller holds `reloading`.
    async fn identify(
        &self,
        devices: Vec<(String, Permissions)>,
    ) -> Result<(Vec<NatsCredentials>, bool), NatsError> {
        if let Some((name, _)) = devices.iter().find(|(name, _)| {
            *name == self.credentials.user || name.starts_with(super::identity::RELOAD_USER_PREFIX)
        }) {
            return Err(NatsError::Identity {
                device: name.clone(),
                problem: format!(
                    "the name is the harness's own (its user {}, or its reload marker \
                     {}*): give the device another id",
                    self.credentials.user,
                    super::identity::RELOAD_USER_PREFIX
                ),
            });
        }
        let (next, credentials) = {
            let ids = self.identities();
            let mut next = ids.devices.clone();
            let mut credentials = Vec::with_capacity(devices.len());
            for (name, permissions) in devices {
                let user = next.entry(name.clone()).or_insert_with(|| DeviceUser {
                    password: hex::encode(rand::random::<[u8; 16]>()),
                    permissions: permissions.clone(),
                });
                user.permissions = permissions;
                credentials.push(NatsCredentials {
                    user: name,
                    password: user.password.clone(),
                });
            }
            (next, credentials)
        };
        if next == self.identities().devices {
            return Ok((credentials, false));
        }
        let before = {
            let mut ids = self.identities();
            ids.generation += 1;
            std::mem::replace(&mut ids.devices, next)
        };
        let reloaded = match self.rewrite_config() {
            Ok(()) => self.reload().await,
            Err(e) => Err(e),
        };
        if let Err(e) = reloaded {
            // The server may run the old users or the new: neither is promised to anyone.
            self.identities().devices = before;
            let _ = self.rewrite_config();
            return Err(e);
        }
        Ok((credentials, true))
    }

    /// Asks the server to reload its configuration (SIGHUP) and waits until the reload
    /// marker's user of this configuration can log in.
    async fn reload(&self) -> Result<(), NatsError> {
        let failed = |stderr: String| NatsError::Reload {
            config: self.dir.host.join(CONFIG_FILE),
            stderr,
        };
        match &self.runner {
            Runner::Container { name, podman } => {
                podman_run(podman, &["kill", "--signal", "HUP", name])
                    .await
                    .map_err(failed)?;
            }
            Runner::Process { child, .. } => {
                let pid = child
                    .id()
                    .and_then(|pid| rustix::process::Pid::from_raw(pid as i32))
                    .ok_or_else(|| failed("the server process has exited".into()))?;
                rustix::process::kill_process(pid, rustix::process::Signal::HUP)
                    .map_err(|e| failed(format!("cannot signal process {pid:?}: {e}")))?;
            }
        }
        let (user, password) = {
            let ids = self.identities();
            (ids.reload_user(), ids.reload_password.clone())
        };
        match self.log_in(&user, &password).await {
            Ok(_) => Ok(()),
            Err(last) => Err(failed(format!(
                "the new configuration was not in force within {:?} ({user} could not log in: {last}){}",
                self.start_budget,
                self.logs().await
            ))),
        }
    }

    /// Waits for the port the server chose (its ports file), failing at once with its
    /// output if it exits first.
    async fn wait_for_port(&mut self) -> Result<u16, NatsError> {
        let deadline = Instant::now() + self.start_budget;
        loop {
            if let Some(port) = read_port(&self.dir.host) {
                return Ok(port);
            }
            self.check_alive().await?;
            if Instant::now() >= deadline {
                return Err(NatsError::NoPort {
                    dir: self.dir.host.clone(),
                    budget: self.start_budget,
                    logs: self.logs().await,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// An error with the server's own output if it is no longer running.
    async fn check_alive(&mut self) -> Result<(), NatsError> {
        let status = match &mut self.runner {
            Runner::Process { child, .. } => match child.try_wait() {
                Ok(Some(status)) => status.to_string(),
                _ => return Ok(()),
            },
            Runner::Container { name, podman } => {
                if container_running(podman, name).await {
                    return Ok(());
                }
                "the container is not running".to_owned()
            }
        };
        Err(NatsError::Exited {
            status,
            stderr: self.logs().await,
        })
    }

    async fn connect_when_ready(&mut self) -> Result<async_nats::Client, NatsError> {
        self.check_alive().await?;
        let (user, password) = (&self.credentials.user, &self.credentials.password);
        match self.log_in(user, password).await {
            Ok(client) => Ok(client),
            Err(last) => Err(NatsError::NotReady {
                last,
                budget: self.start_budget,
                logs: self.logs().await,
                url: self.url(),
            }),
        }
    }

    /// Logs in as `user`, trying again until the server takes it or the start budget is
    /// spent (then the last error).
    async fn log_in(&self, user: &str, password: &str) -> Result<async_nats::Client, String> {
        let url = self.url();
        probe::poll(self.start_budget, || async {
            Box::pin(
                async_nats::ConnectOptions::with_user_and_password(
                    user.to_owned(),
                    password.to_owned(),
                )
                .connect(&url),
            )
            .await
            .map_err(|e| e.to_string())
        })
        .await
    }

    async fn ensure_stream(client: &async_nats::Client) -> Result<(), NatsError> {
        jetstream::new(client.clone())
            .get_or_create_stream(stream::Config {
                name: STREAM_NAME.into(),
                subjects: vec![format!("{DEFAULT_SUBJECT_PREFIX}.>")],
                storage: stream::StorageType::File,
                // A report re-sent after a lost ack is dropped as a duplicate only inside this
                // window: as long as the agent may keep a report before re-sending it.
                duplicate_window: devicelab_agent::longest_resend(Duration::from_millis(
                    devicelab_agent::DEFAULT_INTERVAL_MS,
                )),
                ..Default::default()
            })
            .await
            .map_err(|e| js_err("creating the status stream")(e.to_string()))?;
        Ok(())
    }

    /// The server's last output lines: the container's log, or the process's stderr file.
    async fn logs(&self) -> String {
        let text = match &self.runner {
            Runner::Container { name, podman } => {
                podman_output(podman, &args(&["logs", "--tail", "20", name]))
                    .await
                    .map(|o| {
                        format!(
                            "{}{}",
                            String::from_utf8_lossy(&o.stdout),
                            String::from_utf8_lossy(&o.stderr)
                        )
                    })
                    .unwrap_or_default()
            }
            Runner::Process { .. } => {
                let log = tokio::fs::read(self.dir.host.join(LOG_FILE)).await;
                let log = String::from_utf8_lossy(&log.unwrap_or_default()).into_owned();
                let lines: Vec<&str> = log.lines().collect();
                lines[lines.len().saturating_sub(20)..].join("\n")
            }
        };
        if text.trim().is_empty() {
            String::new()
        } else {
            format!("\n  server output:\n{}", text.trim_end())
        }
    }

    /// An outage: stops the server, keeps it down for `down_for`, and starts it again in
    /// place (same port, same credentials, JetStream storage kept); returns once it accepts
    /// connections. Agents must ride it out; the harness's own client reconnects by itself.
    async fn restart(&mut self, down_for: Duration) -> Result<(), NatsError> {
        let failed = |server: &str, stderr: String| NatsError::Restart {
            server: server.to_owned(),
            stderr,
        };
        match &mut self.runner {
            Runner::Container { name, podman } => {
                podman_run(podman, &["stop", "--time", "0", name])
                    .await
                    .map_err(|e| failed(name, e))?;
                remove_ports_files(&self.dir.host);
                tokio::time::sleep(down_for).await;
                podman_run(podman, &["start", name])
                    .await
                    .map_err(|e| failed(name, e))?;
            }
            Runner::Process { child, command } => {
                let _ = child.kill().await;
                remove_ports_files(&self.dir.host);
                tokio::time::sleep(down_for).await;
                *child = spawn_server(command, &self.dir.host, self.keep)
                    .map_err(|e| failed(&command[0].to_string_lossy(), e.to_string()))?;
                self._interrupt_guard = Some(interrupt_guard(&self.runner, &self.dir.host));
            }
        }
        let port = self.wait_for_port().await?;
        if port != self.port {
            return Err(failed(
                "nats-server",
                format!("it came back on port {port}, not {}", self.port),
            ));
        }
        self.connect_when_ready().await.map(drop)
    }

    /// Where it listens.
    fn url(&self) -> String {
        format!("nats://{}:{}", self.gateway, self.port)
    }
}

/// A NATS server for one run, and the harness's client connected to it. Dropping it removes
/// the server (container or process) and its directory, unless DEVICELAB_KEEP=1.
pub struct NatsServer {
    server: Server,
    client: async_nats::Client,
    /// The port the server listens on: chosen by the server at start, the same after a
    /// restart.
    pub port: u16,
    /// The address it listens on: the local host's on the libvirt network, or this machine's
    /// loopback when every host it serves is remote (their guests reach it through
    /// `for_guests`).
    pub gateway: Ipv4Addr,
    /// Where each remote host's guests reach it, by the host's libvirt URI: a port on their
    /// gateway that the host's sshd forwards back here. A local host's guests connect where it
    /// listens.
    pub for_guests: std::collections::BTreeMap<String, Forward>,
    /// The libvirt URI of the host it was started for, whose guests [`Self::guest_url`]
    /// names (empty for a server started on its own: where it listens).
    pub home: String,
    /// Held while [`Self::capture`] looks at the streams and changes them: a fleet's devices
    /// ask at once, and each look-then-change must see the last one's result.
    capturing: tokio::sync::Mutex<()>,
}

impl NatsServer {
    /// Starts the server (listening on `gateway` only), connects, and creates the status
    /// stream.
    pub async fn start(
        config: &HarnessConfig,
        gateway: Ipv4Addr,
        owner: &RunOwner,
    ) -> Result<Self, NatsError> {
        Self::start_with(config, gateway, owner, "").await
    }

    /// [`NatsServer::start`] with `extra` server configuration (an agent description's
    /// `nats_config`) appended to the run's.
    pub async fn start_with(
        config: &HarnessConfig,
        gateway: Ipv4Addr,
        owner: &RunOwner,
        extra: &str,
    ) -> Result<Self, NatsError> {
        // A server that never becomes ready is still cleaned up: `server` drops on error.
        let mut server = Server::start(config, gateway, owner, extra).await?;
        let client = server.connect_when_ready().await?;
        Server::ensure_stream(&client).await?;
        let this = Self {
            port: server.port,
            gateway,
            for_guests: Default::default(),
            home: String::new(),
            server,
            client,
            capturing: tokio::sync::Mutex::new(()),
        };
        tracing::info!("NATS ready at {}", this.client_url());
        Ok(this)
    }

    /// An outage: stops the server, keeps it down for `down_for`, and starts it again in
    /// place (same port, same credentials, JetStream storage kept); returns once it accepts
    /// connections. Agents must ride it out; the harness's own client reconnects by itself.
    pub async fn restart(&mut self, down_for: Duration) -> Result<(), NatsError> {
        self.server.restart(down_for).await
    }

    /// Where the test process connects: where the server listens (on a local host, the same
    /// address as the guests).
    pub fn client_url(&self) -> String {
        self.server.url()
    }

    /// Where the guests of the server's first host connect (the lab it was started for:
    /// [`Self::guest_url_on`] that host). A server offered to several hosts has a URL per
    /// host: ask [`Self::guest_url_on`].
    pub fn guest_url(&self) -> String {
        self.guest_url_on(&self.home)
    }

    /// Where the guests of the host `libvirt_uri` names connect: the forward on their gateway
    /// for a remote host, else where the server listens (the host's address on the libvirt
    /// network).
    pub fn guest_url_on(&self, libvirt_uri: &str) -> String {
        match self.for_guests.get(libvirt_uri) {
            Some(forward) => format!("nats://{}", forward.addr),
            None => self.server.url(),
        }
    }

    /// The server's process id in process mode (`None` for a container).
    pub fn process_id(&self) -> Option<u32> {
        match &self.server.runner {
            Runner::Process { child, .. } => child.id(),
            Runner::Container { .. } => None,
        }
    }

    /// The container's name in container mode (`None` for a process).
    pub fn container_name(&self) -> Option<&str> {
        match &self.server.runner {
            Runner::Container { name, .. } => Some(name),
            Runner::Process { .. } => None,
        }
    }

    /// The configuration file the server reads (0600: it holds the password).
    pub fn config_path(&self) -> std::path::PathBuf {
        self.server.dir.host.join(CONFIG_FILE)
    }

    /// The run's own user and password (the harness's: allowed everything). A device gets its
    /// own ([`Self::identify`]).
    pub fn credentials(&self) -> Option<&NatsCredentials> {
        Some(&self.server.credentials)
    }

    /// Gives each device (by its id) its own NATS user, allowed only what its permissions say
    /// (an agent description's: [`AgentDescription::permissions`](crate::description::AgentDescription::permissions)),
    /// and returns each one's credentials once the server enforces them. A device already
    /// known keeps its password; its permissions are replaced. One configuration reload for
    /// the whole list: give a fleet's devices in one call.
    pub async fn identify(
        &self,
        devices: Vec<(String, Permissions)>,
    ) -> Result<Vec<NatsCredentials>, NatsError> {
        let _one_at_a_time = self.server.reloading.lock().await;
        let (credentials, reloaded) = self.server.identify(devices).await?;
        if reloaded {
            // JetStream answers again before anyone is told the reload is over (it is briefly
            // unavailable while the server applies a new configuration).
            let js = jetstream::new(self.client.clone());
            probe::poll(self.server.start_budget, || async {
                js.get_stream(STREAM_NAME)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(|last| NatsError::Reload {
                config: self.config_path(),
                stderr: format!("JetStream did not answer after the reload: {last}"),
            })?;
        }
        Ok(credentials)
    }

    /// The harness's own client (connected as the run's user).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// One device's reports of the reference protocol.
    pub fn status_log(&self, device_id: &str) -> StatusLog {
        StatusLog::new(self.client.clone(), device_id)
    }

    /// The reports `on` (rendered for one device), decoded by `decode` (an agent description's).
    /// [`Self::capture`] them first.
    pub fn report_log(&self, on: &ReportsOn, decode: Decoder) -> ReportLog {
        ReportLog::new(self.client.clone(), on, decode)
    }

    /// Makes sure reports `on` are stored, in order, before any device sends one: the run's
    /// stream captures a subject elsewhere than `devicelab.status.>`; a KV bucket is created
    /// (with the most history JetStream keeps per key) unless it exists.
    pub async fn capture(&self, on: &ReportsOn) -> Result<(), NatsError> {
        let _one_at_a_time = self.capturing.lock().await;
        let js = jetstream::new(self.client.clone());
        let subject = match on {
            ReportsOn::Subject(subject) => subject,
            ReportsOn::KeyValue { bucket, .. } => {
                let name = on.stream(STREAM_NAME);
                if js.get_stream(&name).await.is_ok() {
                    return Ok(());
                }
                js.create_stream(kv_stream_config(name, bucket))
                    .await
                    .map_err(|e| {
                        js_err(&format!("creating the KV bucket {bucket}"))(e.to_string())
                    })?;
                return Ok(());
            }
        };
        let mut stream = js
            .get_stream(STREAM_NAME)
            .await
            .map_err(|e| js_err("looking up the status stream")(e.to_string()))?;
        let mut config = stream
            .info()
            .await
            .map_err(|e| js_err("reading the stream's configuration")(e.to_string()))?
            .config
            .clone();
        if config.subjects.iter().any(|p| subject_matches(p, subject)) {
            return Ok(());
        }
        // A stream's subjects must not overlap: the ones the new subject covers make way.
        config.subjects.retain(|p| !subject_matches(subject, p));
        config.subjects.push(subject.clone());
        let captured = config.subjects.join(", ");
        js.update_stream(config).await.map_err(|e| {
            js_err("adding a subject to the status stream")(format!(
                "{e} (the run's stream captures {captured}: subjects that partly overlap, like \
                 a.*.x and a.b.>, cannot share it; give each device's reports a subject of its own)"
            ))
        })?;
        Ok(())
    }
}

/// The stream behind a KV bucket, as the NATS clients' `create_key_value` makes it, keeping
/// JetStream's most revisions per key (64: a device reporting every 2 s keeps about two
/// minutes). Written out because async-nats's own `create_key_value` first queries the
/// account, and cannot read nats-server 2.9's answer.
fn kv_stream_config(name: String, bucket: &str) -> stream::Config {
    stream::Config {
        name,
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 64,
        discard: stream::DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    }
}

/// On SIGINT/SIGTERM the server goes too, and its directory with it.
fn interrupt_guard(runner: &Runner, dir: &std::path::Path) -> CleanupGuard {
    let dir = dir.to_owned();
    match runner {
        Runner::Container { name, podman } => {
            let (name, podman) = (name.clone(), podman.clone());
            reaper::on_interrupt(move || {
                remove_container(&podman, &name);
                let _ = std::fs::remove_dir_all(&dir);
            })
        }
        Runner::Process { child, .. } => {
            let pid = child.id();
            // Checked again before the kill: a pid the kernel gave to another process since
            // (the server exited and was reaped) must not be killed.
            let start = pid.and_then(reaper::process_start_time);
            reaper::on_interrupt(move || {
                if let Some(pid) = pid
                    && start.is_some_and(|s| reaper::process_start_time(pid) == Some(s))
                    && let Some(pid) = rustix::process::Pid::from_raw(pid as i32)
                {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
                let _ = std::fs::remove_dir_all(&dir);
            })
        }
    }
}

/// Starts `command` (program, then arguments), its output in `dir`'s log file. Unless the
/// server is to be kept, the kernel takes it with the harness if the harness is killed.
fn spawn_server(
    command: &[std::ffi::OsString],
    dir: &std::path::Path,
    keep: bool,
) -> std::io::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(LOG_FILE))?;
    let mut cmd = Command::new(&command[0]);
    if !keep {
        crate::support::process::dies_with_parent(&mut cmd);
    }
    cmd.args(&command[1..])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
}

/// `podman <args>`; its stderr as the error.
async fn podman_run(podman: &std::path::Path, args: &[&str]) -> Result<(), String> {
    let output = podman_output(podman, &self::args(args))
        .await
        .map_err(|e| e.to_string())?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "podman {}: {}",
        args[0],
        String::from_utf8_lossy(&output.stderr).trim()
    ))
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
}

/// `podman <args>`, killed past [`reaper::PODMAN_BUDGET`] (an error of kind `TimedOut` then).
async fn podman_output(
    podman: &std::path::Path,
    args: &[String],
) -> std::io::Result<std::process::Output> {
    let call = Command::new(podman).args(args).kill_on_drop(true).output();
    tokio::time::timeout(reaper::PODMAN_BUDGET, call)
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "`podman {}` gave no answer within {:?} (is podman hung?)",
                    args.first().map_or("", String::as_str),
                    reaper::PODMAN_BUDGET
                ),
            )
        })?
}

/// Blocking (the interrupt cleanup and the drop thread call it).
fn remove_container(podman: &std::path::Path, name: &str) {
    let _ = crate::support::process::output_within(
        std::process::Command::new(podman).args(["rm", "-f", "-t", "0", name]),
        reaper::PODMAN_BUDGET,
    );
}

async fn container_running(podman: &std::path::Path, name: &str) -> bool {
    podman_output(
        podman,
        &args(&[
            "container",
            "inspect",
            "--format",
            "{{.State.Running}}",
            name,
        ]),
    )
    .await
    .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "true")
    .unwrap_or(false)
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.keep {
            // DEVICELAB_KEEP: the server, its configuration and its store stay for a human.
            let dir = self
                .dir_guard
                .take()
                .map(|d| d.keep())
                .unwrap_or_else(|| self.dir.host.clone());
            let _ = std::fs::write(dir.join(reaper::KEPT_MARK), "DEVICELAB_KEEP\n");
            let how = match &self.runner {
                Runner::Container { name, .. } => format!(
                    "container {name} (remove it with: podman rm -f {name}; rm -r {})",
                    dir.display()
                ),
                Runner::Process { child, .. } => format!(
                    "process {pid} (stop it with: kill {pid}; rm -r {})",
                    dir.display(),
                    pid = child.id().map_or("?".into(), |p| p.to_string())
                ),
            };
            eprintln!(
                "devicelab: keeping NATS at {} as {how}; its configuration (with the password) is {}",
                self.url(),
                dir.join(CONFIG_FILE).display()
            );
            return;
        }
        // Never blocks a runtime worker: the container goes on a thread of its own (joined
        // before the process exits), the directory and the interrupt guard with it.
        let dir = self.dir_guard.take();
        let guard = self._interrupt_guard.take();
        match &mut self.runner {
            Runner::Container { name, podman } => {
                let (name, podman) = (name.clone(), podman.clone());
                crate::support::background::in_background(format!("NATS {name}"), move || {
                    remove_container(&podman, &name);
                    drop(dir);
                    drop(guard);
                });
            }
            Runner::Process { child, .. } => {
                // SIGKILL now; tokio reaps the exited child.
                let _ = child.start_kill();
            }
        }
    }
}

/// Whether NATS subject `pattern` (`*` one token, `>` the rest) covers `subject`, which may
/// have wildcards itself (then: every subject it matches).
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(t)) if t != ">" => {}
            (Some(a), Some(b)) if a == b && a != ">" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::subject_matches;

    #[test]
    fn nats_wildcards() {
        assert!(subject_matches(
            "devicelab.status.>",
            "devicelab.status.dev-1"
        ));
        assert!(subject_matches("a.*.c", "a.b.c"));
        assert!(!subject_matches("a.*.c", "a.b.d"));
        assert!(!subject_matches("devicelab.status.>", "devicelab.status"));
        assert!(!subject_matches("acme.heartbeat", "acme.heartbeat.x"));
        assert!(subject_matches("acme.heartbeat.x", "acme.heartbeat.x"));
        // Patterns covering patterns.
        assert!(subject_matches("acme.>", "acme.dev-1.>"));
        assert!(subject_matches("acme.*.*", "acme.*.beat"));
        assert!(!subject_matches("acme.*", "acme.>"));
        assert!(!subject_matches("acme.*.x", "acme.b.>"));
        assert!(!subject_matches("acme.b.>", "acme.*.x"));
    }
}
