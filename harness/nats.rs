//! The NATS server the agents report to: a podman container (default) or a local nats-server
//! process, reachable by the test at 127.0.0.1 and by guests at the libvirt network's gateway.
//! Reports are captured by a JetStream stream so a device's whole history can be read in order.

use crate::config::{HarnessConfig, NatsMode};
use crate::domain_xml::RunOwner;
use crate::readiness;
use crate::reaper::{self, CleanupGuard};
use async_nats::jetstream::{self, consumer, stream};
use devicelab_agent::{DEFAULT_SUBJECT_PREFIX, Status, status_subject};
use futures_util::StreamExt;
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const STREAM_NAME: &str = "DEVICELAB_STATUS";
const START_BUDGET: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("cannot run {program}: {source} ({fix})")]
    Missing {
        program: String,
        source: std::io::Error,
        fix: &'static str,
    },
    #[error(
        "podman could not start the NATS image {image}: {stderr}\n  set DEVICELAB_NATS_IMAGE to an image this host \
         has (fixtures/nats/build-image.sh builds one from Debian's nats-server), or use DEVICELAB_NATS=process"
    )]
    ContainerStart { image: String, stderr: String },
    #[error("NATS at {url} did not accept connections within {START_BUDGET:?}: {last}{logs}")]
    NotReady {
        url: String,
        last: String,
        logs: String,
    },
    #[error("could not restart the NATS server {server}: {stderr}")]
    Restart { server: String, stderr: String },
    #[error("JetStream request failed while {doing}: {message}")]
    JetStream { doing: String, message: String },
    #[error("no status from {device_id} matched within {budget:?}; seen: {seen}")]
    StatusTimeout {
        device_id: String,
        budget: Duration,
        seen: String,
    },
    #[error("status rejected: {reason} (stream sequence {seq}: {status:?})")]
    StatusRejected {
        reason: String,
        seq: u64,
        status: Status,
    },
}

fn js_err(doing: &str) -> impl FnOnce(String) -> NatsError + '_ {
    move |message| NatsError::JetStream {
        doing: doing.to_owned(),
        message,
    }
}

/// Per-run credentials: only the test and the agents it configures can publish, so nothing
/// else on the host can slip a status into a trial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsCredentials {
    pub user: String,
    pub password: String,
}

enum Runner {
    Container {
        name: String,
        podman: std::path::PathBuf,
    },
    Process {
        child: Child,
        command: Vec<std::ffi::OsString>,
        _store: tempfile::TempDir,
    },
}

pub struct NatsServer {
    runner: Runner,
    pub port: u16,
    pub gateway: Ipv4Addr,
    client: Option<async_nats::Client>,
    credentials: NatsCredentials,
    keep: bool,
    _interrupt_guard: Option<CleanupGuard>,
}

impl NatsServer {
    pub async fn start(
        config: &HarnessConfig,
        gateway: Ipv4Addr,
        owner: &RunOwner,
    ) -> Result<Self, NatsError> {
        let port = free_port();
        let port_s = port.to_string();
        let credentials = NatsCredentials {
            user: "devicelab".into(),
            password: hex::encode(rand::random::<[u8; 16]>()),
        };
        let args = [
            "-js",
            "-a",
            "0.0.0.0",
            "-p",
            port_s.as_str(),
            "--user",
            credentials.user.as_str(),
            "--pass",
            credentials.password.as_str(),
        ];
        let runner = match &config.nats {
            NatsMode::Container { image } => {
                let name = format!("devicelab-nats-{}-{port}", owner.run_id);
                // Host networking: inside the sandbox namespace that is where the VMs' bridge is.
                let start = reaper::process_start_time(owner.pid).unwrap_or(0);
                let output = Command::new(&config.podman)
                    // No --rm: it would delete the container on restart(); drop removes it.
                    .args(["run", "-d", "--network", "host", "--name", &name])
                    .args(["--label", &format!("devicelab.run={}", owner.run_id)])
                    .args(["--label", &format!("devicelab.pid={}", owner.pid)])
                    .args(["--label", &format!("devicelab.start={start}")])
                    .arg(image)
                    .args(args)
                    .args(["-sd", "/tmp/nats-js"])
                    .output()
                    .map_err(|source| NatsError::Missing {
                        program: config.podman.display().to_string(),
                        source,
                        fix: "install podman (fixtures/host/setup.sh), or set DEVICELAB_NATS=process",
                    })?;
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
                let store = tempfile::tempdir().map_err(|source| NatsError::Missing {
                    program: "a temp dir for JetStream".into(),
                    source,
                    fix: "check TMPDIR",
                })?;
                let mut command: Vec<std::ffi::OsString> = vec![binary.into()];
                command.extend(args.iter().map(Into::into));
                command.extend(["-sd".into(), store.path().into()]);
                let child = spawn_server(&command).map_err(|source| NatsError::Missing {
                    program: binary.display().to_string(),
                    source,
                    fix: "install nats-server, or set DEVICELAB_NATS_SERVER to its path",
                })?;
                Runner::Process {
                    child,
                    command,
                    _store: store,
                }
            }
        };
        let interrupt_guard = interrupt_guard(&runner);
        // Constructed before waiting, so a start that never becomes ready is still cleaned up.
        let mut server = Self {
            runner,
            port,
            gateway,
            client: None,
            credentials,
            keep: config.keep,
            _interrupt_guard: Some(interrupt_guard),
        };
        server.client = Some(server.connect_when_ready().await?);
        server.ensure_stream().await?;
        tracing::info!(
            "NATS ready: test at {}, guests at {}",
            server.client_url(),
            server.guest_url()
        );
        Ok(server)
    }

    async fn connect_when_ready(&self) -> Result<async_nats::Client, NatsError> {
        let url = self.client_url();
        readiness::poll(START_BUDGET, || async {
            if let Runner::Container { name, podman } = &self.runner
                && !container_running(podman, name)
            {
                return Err("the container exited".to_owned());
            }
            async_nats::ConnectOptions::with_user_and_password(
                self.credentials.user.clone(),
                self.credentials.password.clone(),
            )
            .connect(&url)
            .await
            .map_err(|e| e.to_string())
        })
        .await
        .map_err(|last| NatsError::NotReady {
            url: url.clone(),
            last,
            logs: self.logs(),
        })
    }

    async fn ensure_stream(&self) -> Result<(), NatsError> {
        jetstream::new(self.client().clone())
            .get_or_create_stream(stream::Config {
                name: STREAM_NAME.into(),
                subjects: vec![format!("{DEFAULT_SUBJECT_PREFIX}.>")],
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| js_err("creating the status stream")(e.to_string()))?;
        Ok(())
    }

    fn logs(&self) -> String {
        match &self.runner {
            Runner::Container { name, podman } => Command::new(podman)
                .args(["logs", "--tail", "20", name])
                .output()
                .map(|o| {
                    format!(
                        "\n  container log:\n{}{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    )
                })
                .unwrap_or_default(),
            Runner::Process { .. } => String::new(),
        }
    }

    /// An outage: stops the server, keeps it down for `down_for`, and starts it again in
    /// place (same port, same credentials, JetStream storage kept); returns once it accepts
    /// connections. Agents must ride it out; the harness's own client reconnects by itself.
    pub async fn restart(&mut self, down_for: Duration) -> Result<(), NatsError> {
        let failed = |server: &str, stderr: String| NatsError::Restart {
            server: server.to_owned(),
            stderr,
        };
        match &mut self.runner {
            Runner::Container { name, podman } => {
                let run = |args: &[&str]| -> Result<(), NatsError> {
                    let output = Command::new(&*podman)
                        .args(args)
                        .output()
                        .map_err(|e| failed(name, e.to_string()))?;
                    if output.status.success() {
                        return Ok(());
                    }
                    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
                    Err(failed(name, format!("podman {}: {stderr}", args[0])))
                };
                run(&["stop", "--time", "0", name])?;
                tokio::time::sleep(down_for).await;
                run(&["start", name])?;
            }
            Runner::Process { child, command, .. } => {
                let _ = child.kill();
                let _ = child.wait();
                tokio::time::sleep(down_for).await;
                *child = spawn_server(command)
                    .map_err(|e| failed(&command[0].to_string_lossy(), e.to_string()))?;
                self._interrupt_guard = Some(interrupt_guard(&self.runner));
            }
        }
        self.connect_when_ready().await.map(drop)
    }

    /// Where the test process connects.
    pub fn client_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Where guests connect: the host's address on the libvirt network.
    pub fn guest_url(&self) -> String {
        format!("nats://{}:{}", self.gateway, self.port)
    }

    /// The user and password agents must present (set them in the agent's config).
    pub fn credentials(&self) -> Option<&NatsCredentials> {
        Some(&self.credentials)
    }

    pub fn client(&self) -> &async_nats::Client {
        self.client.as_ref().expect("connected in start()")
    }

    pub fn status_log(&self, device_id: &str) -> StatusLog {
        StatusLog {
            js: jetstream::new(self.client().clone()),
            device_id: device_id.to_owned(),
        }
    }
}

/// On SIGINT/SIGTERM the server goes too.
fn interrupt_guard(runner: &Runner) -> CleanupGuard {
    match runner {
        Runner::Container { name, podman } => {
            let (name, podman) = (name.clone(), podman.clone());
            reaper::on_interrupt(move || remove_container(&podman, &name))
        }
        Runner::Process { child, .. } => {
            let pid = child.id() as i32;
            reaper::on_interrupt(move || unsafe {
                libc::kill(pid, libc::SIGKILL);
            })
        }
    }
}

/// Starts `command` (program, then arguments); if the harness is killed, the kernel takes the
/// server with it.
fn spawn_server(command: &[std::ffi::OsString]) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(&command[0]);
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.args(&command[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

fn remove_container(podman: &std::path::Path, name: &str) {
    let _ = Command::new(podman)
        .args(["rm", "-f", "-t", "0", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn container_running(podman: &std::path::Path, name: &str) -> bool {
    Command::new(podman)
        .args([
            "container",
            "inspect",
            "--format",
            "{{.State.Running}}",
            name,
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "true")
        .unwrap_or(false)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind(("0.0.0.0", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("the OS hands out a free port")
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        match &mut self.runner {
            Runner::Container { name, .. } if self.keep => {
                eprintln!(
                    "devicelab: keeping NATS container {name} (remove it with: podman rm -f {name})"
                )
            }
            Runner::Container { name, podman } => remove_container(podman, name),
            Runner::Process { child, .. } => {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// What a status check decides about one report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// This is the report we were waiting for.
    Accept,
    /// Not this one; keep waiting.
    Skip,
    /// This report must not exist: fail now.
    Reject(String),
}

/// One device's reports, in the order NATS received them.
pub struct StatusLog {
    js: jetstream::Context,
    device_id: String,
}

impl StatusLog {
    pub fn subject(&self) -> String {
        status_subject(DEFAULT_SUBJECT_PREFIX, &self.device_id)
    }

    /// Writes every report of this device, in order, as JSON lines `{"seq": …, "status": …}`.
    pub async fn dump_history(&self, path: &std::path::Path) -> Result<usize, NatsError> {
        let last = self.last_sequence().await?;
        let mut lines = Vec::new();
        if last > 0 {
            let _ = self
                .wait_for(0, Duration::from_secs(5), |s| {
                    lines.push(serde_json::to_string(s).unwrap_or_default());
                    if lines.len() >= 100_000 {
                        Verdict::Accept
                    } else {
                        Verdict::Skip
                    }
                })
                .await;
        }
        let count = lines.len();
        std::fs::write(path, lines.join("\n") + "\n")
            .map_err(|e| js_err("writing the status history")(e.to_string()))?;
        Ok(count)
    }

    /// The stream's last sequence number: a gate, since later reports get higher numbers.
    pub async fn last_sequence(&self) -> Result<u64, NatsError> {
        let mut stream = self
            .js
            .get_stream(STREAM_NAME)
            .await
            .map_err(|e| js_err("looking up the status stream")(e.to_string()))?;
        let info = stream
            .info()
            .await
            .map_err(|e| js_err("reading the stream state")(e.to_string()))?;
        Ok(info.state.last_sequence)
    }

    /// Reads this device's reports after stream sequence `after`, in order, until `check`
    /// accepts one (returned with its sequence) or rejects one, or `budget` runs out.
    pub async fn wait_for(
        &self,
        after: u64,
        budget: Duration,
        mut check: impl FnMut(&Status) -> Verdict,
    ) -> Result<(u64, Status), NatsError> {
        let stream = self
            .js
            .get_stream(STREAM_NAME)
            .await
            .map_err(|e| js_err("looking up the status stream")(e.to_string()))?;
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: self.subject(),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: after + 1,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| js_err("creating a consumer")(e.to_string()))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| js_err("reading statuses")(e.to_string()))?;
        let deadline = Instant::now() + budget;
        let mut seen = Vec::new();
        loop {
            let next = tokio::time::timeout_at(deadline.into(), messages.next()).await;
            let msg = match next {
                Err(_) | Ok(None) => {
                    return Err(NatsError::StatusTimeout {
                        device_id: self.device_id.clone(),
                        budget,
                        seen: if seen.is_empty() {
                            "nothing".into()
                        } else {
                            seen.join("; ")
                        },
                    });
                }
                Ok(Some(Err(e))) => return Err(js_err("reading statuses")(e.to_string())),
                Ok(Some(Ok(msg))) => msg,
            };
            let seq = msg.info().map(|i| i.stream_sequence).unwrap_or_default();
            let status: Status = match serde_json::from_slice(&msg.payload) {
                Ok(s) => s,
                Err(e) => {
                    seen.push(format!("#{seq} unparsable ({e})"));
                    continue;
                }
            };
            match check(&status) {
                Verdict::Accept => return Ok((seq, status)),
                Verdict::Skip => {
                    if seen.len() < 20 {
                        seen.push(format!("#{seq} boot {} seq {}", status.boot_id, status.seq));
                    }
                }
                Verdict::Reject(reason) => {
                    return Err(NatsError::StatusRejected {
                        reason,
                        seq,
                        status,
                    });
                }
            }
        }
    }
}
