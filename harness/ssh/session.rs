//! SSH to guests on russh: the host key is the one the harness generated for the guest and is
//! checked on every connection; exec drains the channel until it closes (some sshd send the
//! exit status after EOF); upload streams through stdin.

use russh::keys::{
    Algorithm, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate,
};
use russh::{ChannelMsg, client};
use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("cannot connect to {addr}: {message}")]
    Connect { addr: SocketAddr, message: String },
    #[error("connecting to {addr} timed out after {after:?}")]
    ConnectTimeout { addr: SocketAddr, after: Duration },
    #[error(
        "{addr} presented host key {got}, but the harness gave this guest {expected}: \
         something else answers at this address (or the guest was not provisioned by this run)"
    )]
    HostKeyMismatch {
        addr: SocketAddr,
        expected: String,
        got: String,
    },
    #[error("{addr} rejected the key for user {user:?} (is cloud-init done creating the user?)")]
    AuthRejected { addr: SocketAddr, user: String },
    #[error(
        "`{command}` on {addr} did not finish within {after:?} (the command may still run on the guest)"
    )]
    CommandTimeout {
        addr: SocketAddr,
        command: String,
        after: Duration,
    },
    #[error("ssh to {addr} failed while {doing}: {message}")]
    Session {
        addr: SocketAddr,
        doing: String,
        message: String,
    },
}

/// Where and as whom to connect, and which host key to accept.
#[derive(Clone)]
pub struct SshTarget {
    pub addr: SocketAddr,
    pub user: String,
    pub key: Arc<PrivateKey>,
    pub host_key: PublicKey,
    /// The host to go through when this one's address does not route from here (a guest on a
    /// libvirt host's network): the guest is reached over a `direct-tcpip` channel of an SSH
    /// connection to it, each hop's host key checked.
    pub via: Option<Box<SshTarget>>,
}

/// What a command run over SSH did: how it ended and what it printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// None when the command was killed by a signal (see `signal`) or the server sent none.
    pub exit_status: Option<u32>,
    /// The signal that killed the command (e.g. `KILL`), if one did.
    pub signal: Option<String>,
    /// Everything it printed on stdout.
    pub stdout: String,
    /// Everything it printed on stderr.
    pub stderr: String,
}

impl ExecOutput {
    pub fn success(&self) -> bool {
        self.exit_status == Some(0)
    }
}

struct Verifier {
    expected: PublicKey,
    presented: Arc<Mutex<Option<String>>>,
    /// Where connections the server forwards to this client go (a remote forward's target
    /// here); the server's forwarded channels are refused when there is none.
    forward_to: Option<SocketAddr>,
}

impl client::Handler for Verifier {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            return Ok(false);
        };
        let ok = key.key_data() == self.expected.key_data();
        if !ok {
            *self.presented.lock().unwrap() = Some(fingerprint(key));
        }
        Ok(ok)
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: russh::Channel<client::Msg>,
        _connected_address: &str,
        _connected_port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let Some(to) = self.forward_to else {
            return Ok(()); // dropping the reply refuses the channel
        };
        // Connected first, so a service that is down (a NATS outage) is refused, not accepted
        // and closed.
        tokio::spawn(async move {
            match tokio::net::TcpStream::connect(to).await {
                Ok(mut local) => {
                    reply.accept().await;
                    let mut remote = channel.into_stream();
                    let _ = tokio::io::copy_bidirectional(&mut remote, &mut local).await;
                }
                Err(e) => {
                    tracing::debug!("a forwarded connection to {to} failed: {e}");
                    reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
                }
            }
        });
        Ok(())
    }
}

pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(Default::default()).to_string()
}

pub struct SshSession {
    handle: client::Handle<Verifier>,
    addr: SocketAddr,
    /// The session to the host this one goes through, kept open as long as this one.
    jump_session: Option<Box<SshSession>>,
}

/// The client's settings: keepalives, and the host key type of the key pinned for the host
/// (for a guest, the one the harness injected), so that is the one verified (an RSA key with
/// SHA-2 signatures, which OpenSSH offers, not SHA-1's `ssh-rsa`).
fn config(host_key: Algorithm) -> Arc<client::Config> {
    let key = match host_key {
        Algorithm::Rsa { .. } => vec![
            Algorithm::Rsa {
                hash: Some(russh::keys::HashAlg::Sha512),
            },
            Algorithm::Rsa {
                hash: Some(russh::keys::HashAlg::Sha256),
            },
        ],
        other => vec![other],
    };
    Arc::new(client::Config {
        keepalive_interval: Some(Duration::from_secs(15)),
        keepalive_max: 4,
        preferred: russh::Preferred {
            key: Cow::Owned(key),
            ..Default::default()
        },
        ..Default::default()
    })
}

/// `steps`, given up on after `timeout` as a connection to `target` that timed out.
async fn within<T>(
    target: &SshTarget,
    timeout: Duration,
    steps: impl std::future::Future<Output = Result<T, SshError>>,
) -> Result<T, SshError> {
    tokio::time::timeout(timeout, steps)
        .await
        .map_err(|_| SshError::ConnectTimeout {
            addr: target.addr,
            after: timeout,
        })?
}

impl SshSession {
    /// One attempt: TCP connect (or a channel through the host `target.via` names, logged in to
    /// first), handshake (verifying the host key), public-key auth, all within `timeout`.
    pub async fn connect(target: &SshTarget, timeout: Duration) -> Result<Self, SshError> {
        within(target, timeout, Box::pin(Self::connect_steps(target, None))).await
    }

    /// [`SshSession::connect`], then asks the server to listen on `bind` (a port it picks)
    /// and forward each connection there back to `to` here: the session and that port. The
    /// forward lasts as long as the session.
    pub async fn connect_forwarding(
        target: &SshTarget,
        timeout: Duration,
        bind: std::net::IpAddr,
        to: SocketAddr,
    ) -> Result<(Self, u16), SshError> {
        let refused = |message: String| SshError::Session {
            addr: target.addr,
            doing: format!("asking it to forward {bind} to {to}"),
            message,
        };
        within(target, timeout, async {
            let session = Box::pin(Self::connect_steps(target, Some(to))).await?;
            let port = session
                .handle
                .tcpip_forward(bind.to_string(), 0)
                .await
                .map_err(|e| {
                    refused(match e {
                        russh::Error::RequestDenied => format!(
                            "{e} (its sshd_config needs `AllowTcpForwarding yes`, and {bind} must \
                             be one of its addresses)"
                        ),
                        e => e.to_string(),
                    })
                })?;
            let port = u16::try_from(port)
                .map_err(|_| refused(format!("it answered with port {port}")))?;
            Ok((session, port))
        })
        .await
    }

    async fn connect_steps(
        target: &SshTarget,
        forward_to: Option<SocketAddr>,
    ) -> Result<Self, SshError> {
        let jump = match &target.via {
            None => None,
            Some(host) => Some(Box::pin(Self::connect_steps(host, None)).await?),
        };
        let addr = target.addr;
        let presented = Arc::new(Mutex::new(None));
        let verifier = Verifier {
            expected: target.host_key.clone(),
            presented: presented.clone(),
            forward_to,
        };
        let connected = match &jump {
            None => client::connect(config(target.host_key.algorithm()), addr, verifier).await,
            Some(jump) => {
                let channel = jump.open_tcp(addr).await.map_err(|e| SshError::Connect {
                    addr,
                    message: format!("through {}: {e}", jump.addr),
                })?;
                client::connect_stream(
                    config(target.host_key.algorithm()),
                    channel.into_stream(),
                    verifier,
                )
                .await
            }
        };
        let mut handle = match connected {
            Err(e) => {
                if let Some(got) = presented.lock().unwrap().take() {
                    return Err(SshError::HostKeyMismatch {
                        addr,
                        expected: fingerprint(&target.host_key),
                        got,
                    });
                }
                return Err(SshError::Connect {
                    addr,
                    message: e.to_string(),
                });
            }
            Ok(handle) => handle,
        };
        // An RSA key signs with the best SHA-2 the server takes (OpenSSH refuses SHA-1).
        let hash = match target.key.algorithm() {
            // What the server lists, else SHA-256 when it lists nothing.
            Algorithm::Rsa { .. } => match handle.best_supported_rsa_hash().await {
                Ok(Some(listed)) => listed,
                Ok(None) | Err(_) => Some(russh::keys::HashAlg::Sha256),
            },
            _ => None,
        };
        let key = PrivateKeyWithHashAlg::new(target.key.clone(), hash);
        let auth = handle
            .authenticate_publickey(target.user.clone(), key)
            .await
            .map_err(|e| SshError::Session {
                addr,
                doing: "authenticating".into(),
                message: e.to_string(),
            })?;
        if !auth.success() {
            return Err(SshError::AuthRejected {
                addr,
                user: target.user.clone(),
            });
        }
        Ok(Self {
            handle,
            addr,
            jump_session: jump.map(Box::new),
        })
    }

    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    /// Asks the server to connect to `addr` (a `direct-tcpip` channel), then closes the
    /// channel: whether something accepts TCP connections there, seen from the server.
    pub async fn probe_port(&self, addr: SocketAddr) -> Result<(), russh::Error> {
        self.open_tcp(addr).await?.close().await
    }

    /// A `direct-tcpip` channel: the server connects to `addr` and relays it.
    async fn open_tcp(
        &self,
        addr: SocketAddr,
    ) -> Result<russh::Channel<client::Msg>, russh::Error> {
        self.handle
            .channel_open_direct_tcpip(
                addr.ip().to_string(),
                u32::from(addr.port()),
                "127.0.0.1",
                0,
            )
            .await
    }

    pub async fn exec(&self, command: &str) -> Result<ExecOutput, SshError> {
        self.exec_with_input(command, None).await
    }

    /// Like [`SshSession::exec_with_input`], but gives up after `timeout`: a hung command
    /// must not hold the session (and the test) until the test runner kills it.
    pub async fn exec_within(
        &self,
        command: &str,
        input: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<ExecOutput, SshError> {
        tokio::time::timeout(timeout, self.exec_with_input(command, input))
            .await
            .map_err(|_| SshError::CommandTimeout {
                addr: self.addr,
                command: command.to_owned(),
                after: timeout,
            })?
    }

    /// Runs `command`, feeding it `input` on stdin (then EOF), and collects everything until
    /// the server closes the channel.
    pub async fn exec_with_input(
        &self,
        command: &str,
        input: Option<&[u8]>,
    ) -> Result<ExecOutput, SshError> {
        let err = |doing: &str| {
            let doing = format!("{doing} `{command}`");
            let addr = self.addr;
            move |e: russh::Error| SshError::Session {
                addr,
                doing,
                message: e.to_string(),
            }
        };
        let mut channel = self
            .handle
            .channel_open_session()
            .await
            .map_err(err("opening a channel for"))?;
        channel.exec(true, command).await.map_err(err("starting"))?;
        if let Some(data) = input {
            channel.data(data).await.map_err(err("sending stdin to"))?;
        }
        // EOF even without input, so commands reading stdin finish.
        channel.eof().await.map_err(err("closing stdin of"))?;
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let (mut exit_status, mut signal) = (None, None);
        while let Some(msg) = channel.wait().await {
            match msg {
                ChannelMsg::Data { data } => stdout.extend_from_slice(&data),
                ChannelMsg::ExtendedData { data, ext: 1 } => stderr.extend_from_slice(&data),
                ChannelMsg::ExitStatus { exit_status: s } => exit_status = Some(s),
                ChannelMsg::ExitSignal { signal_name, .. } => {
                    signal = Some(format!("{signal_name:?}"))
                }
                ChannelMsg::Close => break,
                _ => {}
            }
        }
        Ok(ExecOutput {
            exit_status,
            signal,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        })
    }

    /// Writes `contents` to `remote_path` with `mode`, atomically (temp file + rename), as the
    /// login user or, with `sudo`, as root.
    pub async fn upload(
        &self,
        contents: &[u8],
        remote_path: &str,
        mode: u32,
        sudo: bool,
    ) -> Result<ExecOutput, SshError> {
        self.exec_with_input(&upload_command(remote_path, mode, sudo), Some(contents))
            .await
    }

    pub async fn close(self) {
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
        if let Some(jump) = self.jump_session {
            Box::pin(jump.close()).await;
        }
    }
}

/// The command that writes its stdin to `remote_path` with `mode`, atomically (temp file +
/// rename), as the login user or, with `sudo`, as root. Not flushed: see docs/power-cuts.md
/// "Power cuts".
pub fn upload_command(remote_path: &str, mode: u32, sudo: bool) -> String {
    let path = shell_quote(remote_path);
    let prefix = if sudo { "sudo -n " } else { "" };
    format!(
        "set -e; tmp=$({prefix}mktemp {path}.XXXXXX); {prefix}sh -c 'cat > \"$1\"' sh \"$tmp\"; \
         {prefix}chmod {mode:o} \"$tmp\"; {prefix}mv -f \"$tmp\" {path}"
    )
}

/// Quotes a string for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A `systemctl --user` command for `user`, with the runtime dir user units need.
pub fn user_systemctl(user: &str, args: &str) -> String {
    let u = shell_quote(user);
    format!("sudo -n -u {u} XDG_RUNTIME_DIR=/run/user/$(id -u {u}) systemctl --user {args}")
}
