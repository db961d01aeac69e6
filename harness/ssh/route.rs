//! How the harness reaches a guest's TCP ports: directly, when the guest's network routes from
//! here (a local libvirt host), or through the SSH login of the libvirt host it runs on, as a
//! `direct-tcpip` channel of one session to that host, kept and reopened when it closes. Guest
//! SSH sessions take the same way ([`SshTarget::via`]). The other way, a service here (the
//! NATS server) is offered to a remote host's guests on that host's side of their network, as
//! a port its sshd forwards back over SSH ([`Route::forward_here`]).

use super::session::{SshError, SshSession, SshTarget};
use crate::support::probe::CONNECT_TIMEOUT;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// The way to a guest's ports.
#[derive(Clone, Default)]
pub enum Route {
    /// The guest's address routes from here.
    #[default]
    Direct,
    /// Through the host this SSH login reaches.
    Through(Arc<Hop>),
}

/// Why a service here could not be offered to a remote host's guests.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The SSH session to the host, or its forward request, failed.
    #[error(transparent)]
    Ssh(#[from] SshError),
    /// The host's sshd took the forward but does not listen where the guests can reach it.
    #[error(
        "the sshd of {host} forwards ports on its loopback only, not on {bind} where its guests \
         reach it: set `GatewayPorts clientspecified` in its sshd_config and reload sshd"
    )]
    LoopbackOnly {
        /// The host.
        host: SocketAddr,
        /// The address asked for (the guests' gateway).
        bind: Ipv4Addr,
    },
    /// The forward's port did not answer at the guests' gateway for another reason.
    #[error(
        "the port the sshd of {host} forwards on {addr} does not answer there: {message} (its \
         sshd_config needs `AllowTcpForwarding yes` and `GatewayPorts clientspecified`)"
    )]
    NotAnswering {
        /// The host.
        host: SocketAddr,
        /// The forwarded port, on the guests' gateway.
        addr: SocketAddr,
        /// What the check got.
        message: String,
    },
}

/// A port on the guests' host that forwards to a service here, open as long as this lives.
pub struct Forward {
    _session: SshSession,
    /// Where the guests connect: their gateway, and the port the host's sshd picked.
    pub addr: SocketAddr,
}

/// An SSH login to a libvirt host, and the session to it the probes share (the lock is held
/// only to reconnect; a probe runs on its own channel).
pub struct Hop {
    target: SshTarget,
    session: tokio::sync::Mutex<Option<Arc<SshSession>>>,
    /// The `ssh -W` command a human's OpenSSH client reaches a guest through (its
    /// `ProxyCommand`), if known.
    proxy_command: Option<String>,
}

impl Route {
    /// Through `hop`, or direct when there is none.
    pub fn through(target: SshTarget, proxy_command: Option<String>) -> Self {
        Self::Through(Arc::new(Hop {
            target,
            session: tokio::sync::Mutex::new(None),
            proxy_command,
        }))
    }

    /// The options a human's OpenSSH client needs to reach a guest on this route: none when
    /// direct, its host's `ProxyCommand` through a host.
    pub fn ssh_options(&self) -> Vec<String> {
        match self {
            Self::Through(hop) => hop
                .proxy_command
                .iter()
                .flat_map(|c| ["-o".to_owned(), format!("ProxyCommand={c}")])
                .collect(),
            Self::Direct => Vec::new(),
        }
    }

    /// What a guest's [`SshTarget::via`] is on this route.
    pub fn via(&self) -> Option<Box<SshTarget>> {
        match self {
            Self::Direct => None,
            Self::Through(hop) => Some(Box::new(hop.target.clone())),
        }
    }

    /// Offers `to` (a service here) to the guests at `bind` (their gateway on their host):
    /// `None` on a direct route, where they reach it as it is; on a remote host, a port there
    /// its sshd forwards back over SSH, checked to answer at `bind`. Within `budget`.
    pub async fn forward_here(
        &self,
        bind: Ipv4Addr,
        to: SocketAddr,
        budget: std::time::Duration,
    ) -> Result<Option<Forward>, ForwardError> {
        let Self::Through(hop) = self else {
            return Ok(None);
        };
        let (session, port) =
            SshSession::connect_forwarding(&hop.target, budget, bind.into(), to).await?;
        let addr = SocketAddr::from((bind, port));
        // sshd takes the request even where it binds loopback only (GatewayPorts no): the
        // port is checked from the host, at the address asked for.
        let host = hop.target.addr;
        let not_answering = |message: String| ForwardError::NotAnswering {
            host,
            addr,
            message,
        };
        match tokio::time::timeout(budget, session.probe_port(addr)).await {
            Ok(Ok(())) => {}
            Ok(Err(russh::Error::ChannelOpenFailure(russh::ChannelOpenFailure::ConnectFailed))) => {
                return Err(ForwardError::LoopbackOnly { host, bind });
            }
            Ok(Err(e)) => return Err(not_answering(e.to_string())),
            Err(_) => return Err(not_answering(format!("no answer within {budget:?}"))),
        }
        Ok(Some(Forward {
            _session: session,
            addr,
        }))
    }

    /// Whether something accepts TCP connections at `addr`, seen from where the guest's network
    /// is: `Ok`, or an error of kind `ConnectionRefused` when nothing listens there. Through a
    /// host, that kind also covers an address the host cannot connect to for another reason
    /// (sshd answers every failed connect alike, and the error says so); a failure to reach
    /// the host itself is another kind, naming the host. One attempt, within
    /// [`CONNECT_TIMEOUT`] for each connection it makes.
    pub async fn probe(&self, addr: SocketAddr) -> io::Result<()> {
        self.probe_within(addr, CONNECT_TIMEOUT).await
    }

    /// [`Route::probe`], the connection to `addr` given up after `timeout` (a connection to
    /// the host, if one is needed first, gets [`CONNECT_TIMEOUT`]). A fresh attempt
    /// sees a port that opens sooner than the kernel's next SYN of a waiting one would.
    pub async fn probe_within(&self, addr: SocketAddr, timeout: Duration) -> io::Result<()> {
        match self {
            Self::Direct => {
                tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
                    .await
                    .map_err(|_| {
                        io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("no answer within {timeout:?}"),
                        )
                    })??;
                Ok(())
            }
            // Boxed: the SSH connect inside is a deep future for every wait that probes.
            Self::Through(hop) => Box::pin(hop.probe(addr, timeout)).await,
        }
    }
}

impl Hop {
    /// The shared session, connected (again) if there is none or it closed.
    async fn session(&self) -> io::Result<Arc<SshSession>> {
        let mut session = self.session.lock().await;
        if let Some(open) = session.as_ref().filter(|s| !s.is_closed()) {
            return Ok(open.clone());
        }
        *session = None;
        let connected = SshSession::connect(&self.target, CONNECT_TIMEOUT)
            .await
            .map_err(|e| io::Error::other(format!("through the libvirt host: {e}")))?;
        let connected = Arc::new(connected);
        *session = Some(connected.clone());
        Ok(connected)
    }

    async fn probe(&self, addr: SocketAddr, timeout: Duration) -> io::Result<()> {
        let host = self.target.addr;
        let session = self.session().await?;
        // On a task of its own: given up on, it runs on and closes the channel once the host
        // answers, so no channel to the guest is left open on the shared session.
        let probing = {
            let session = session.clone();
            tokio::spawn(async move { session.probe_port(addr).await })
        };
        use russh::ChannelOpenFailure::{AdministrativelyProhibited, ConnectFailed};
        let broken = match tokio::time::timeout(timeout, probing).await {
            Ok(Ok(Ok(()))) => return Ok(()),
            Ok(Ok(Err(russh::Error::ChannelOpenFailure(ConnectFailed)))) => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("refused (or unreachable), seen from the libvirt host {host}"),
                ));
            }
            Ok(Ok(Err(russh::Error::ChannelOpenFailure(AdministrativelyProhibited)))) => {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "the sshd of the libvirt host {host} forwards no TCP connections: set \
                         `AllowTcpForwarding yes` in its sshd_config"
                    ),
                ));
            }
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer through the libvirt host {host} within {timeout:?}"),
                ));
            }
            Ok(Ok(Err(e))) => e.to_string(),
            Ok(Err(task)) => task.to_string(),
        };
        // The session is broken: the next probe connects again.
        let mut shared = self.session.lock().await;
        if shared.as_ref().is_some_and(|s| Arc::ptr_eq(s, &session)) {
            *shared = None;
        }
        Err(io::Error::other(format!(
            "through the libvirt host {host}: {broken}"
        )))
    }
}
