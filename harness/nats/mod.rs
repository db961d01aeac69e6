//! The NATS server the agents report to, in two parts: [`server`] runs it (a podman container,
//! or a local nats-server process) and [`status`] reads what devices reported (a JetStream
//! stream captures every report, so a device's whole history can be read in order).

use std::time::Duration;

mod identity;
pub mod server;
pub mod status;

pub use server::NatsServer;
pub use status::{MessageLog, ReportLog, StatusLog, Stored, Verdict};

/// The run's JetStream stream: it stores every report on `devicelab.status.>` and on any
/// subject an agent's description adds ([`NatsServer::capture`]), in the order they arrived.
pub const STREAM_NAME: &str = "DEVICELAB_STATUS";

/// What can go wrong running the run's NATS server or reading what devices reported.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// The program that runs the server (podman, or nats-server in process mode) cannot be
    /// started; `fix` says what to install or set.
    #[error("cannot run {program}: {source} ({fix})")]
    Missing {
        /// The program, as configured.
        program: String,
        /// Why it could not be started.
        source: std::io::Error,
        /// What to install, or which setting to change.
        fix: &'static str,
    },
    /// podman could not start the NATS image: set DEVICELAB_NATS_IMAGE to an image this host
    /// has, or use DEVICELAB_NATS=process.
    #[error(
        "podman could not start the NATS image {image}: {stderr}\n  set DEVICELAB_NATS_IMAGE to an image this host \
         has (fixtures/nats/build-image.sh builds one from Debian's nats-server), or use DEVICELAB_NATS=process"
    )]
    ContainerStart {
        /// The image podman was asked to run.
        image: String,
        /// What podman printed.
        stderr: String,
    },
    /// The server is running but did not accept the harness's connection within its start
    /// budget.
    #[error("NATS at {url} did not accept connections within {budget:?}: {last}{logs}")]
    NotReady {
        /// Where the harness tried to connect.
        url: String,
        /// How long it tried (the host's `nats_start` budget).
        budget: Duration,
        /// The last connection error.
        last: String,
        /// The server's last output lines, indented (empty when it printed nothing).
        logs: String,
    },
    /// Restarting the server in place ([`NatsServer::restart`]) failed, or it came back on
    /// another port than the agents were given.
    #[error("could not restart the NATS server {server}: {stderr}")]
    Restart {
        /// The container's name, or the server program.
        server: String,
        /// What went wrong: podman's output, or the error.
        stderr: String,
    },
    /// A device cannot be given its own NATS user; `problem` says what to change.
    #[error("cannot give device {device} its own NATS user: {problem}")]
    Identity {
        /// The device's id.
        device: String,
        /// What is wrong.
        problem: String,
    },
    /// The server did not take its new configuration (the devices' users) on reload.
    #[error("the NATS server did not reload its configuration {config}: {stderr}")]
    Reload {
        /// The configuration file it was asked to read.
        config: std::path::PathBuf,
        /// What went wrong.
        stderr: String,
    },
    /// The server's private directory or its configuration file could not be created or
    /// written.
    #[error("cannot write the NATS server's configuration in {dir}: {source}")]
    Config {
        /// The directory it was to be written in.
        dir: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The server stopped before it was ready; its output says why.
    #[error(
        "the NATS server exited ({status}) before it was ready:{stderr}{}",
        if stderr.contains("address already in use") {
            "\n  its port is taken by another process (after a restart: taken while it was \
             down; its clients know only that port): stop what listens there (`ss -ltnp`)"
        } else {
            ""
        }
    )]
    Exited {
        /// The process's exit status, or that the container is no longer running.
        status: String,
        /// The server's last output lines, indented (empty when it printed nothing).
        stderr: String,
    },
    /// The server wrote no ports file within its start budget, so the port it chose is
    /// unknown.
    #[error(
        "the NATS server wrote no ports file in {dir} within {budget:?}, so its port is unknown{logs}"
    )]
    NoPort {
        /// Where the ports file was expected.
        dir: std::path::PathBuf,
        /// How long the harness waited (the host's `nats_start` budget).
        budget: Duration,
        /// The server's last output lines, indented (empty when it printed nothing).
        logs: String,
    },
    /// A device's raw report history could not be written (a failure artifact).
    #[error("cannot write the status history to {path}: {source}")]
    History {
        /// The file it was written to.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A JetStream request (looking up or changing a stream, creating a consumer, reading
    /// messages) failed.
    #[error("JetStream request failed while {doing}: {message}")]
    JetStream {
        /// What the harness was doing, e.g. "creating a consumer".
        doing: String,
        /// The JetStream error, with a hint where the harness has one.
        message: String,
    },
    /// No report matched within the budget: the device did not report, or not what the check
    /// waited for (the last reports read are quoted).
    #[error("no report on {subject} matched within {budget:?}; seen: {seen}")]
    StatusTimeout {
        /// The subject that was read.
        subject: String,
        /// How long the wait lasted.
        budget: Duration,
        /// The last reports read (at most 20, decoded or why not), or "nothing".
        seen: String,
    },
    /// A check rejected a report ([`Verdict::Reject`]): a report that must not exist arrived.
    #[error("report rejected: {reason} (stream sequence {seq}: {report})")]
    StatusRejected {
        /// Why the check rejected it.
        reason: String,
        /// The report's sequence number in the stream.
        seq: u64,
        /// The report as decoded, or why it could not be.
        report: String,
    },
}

pub(crate) fn js_err(doing: &str) -> impl FnOnce(String) -> NatsError + '_ {
    move |message| NatsError::JetStream {
        doing: doing.to_owned(),
        message,
    }
}

/// A NATS user and password: the run's own (the harness's), or one device's. Only the test and
/// the agents it configures can publish, so nothing else on the host can slip a status into a
/// trial. Its `Debug` leaves the password out.
#[derive(Clone, PartialEq, Eq)]
pub struct NatsCredentials {
    /// The user the harness and the agents log in as.
    pub user: String,
    /// Its password, random for each run.
    pub password: String,
}

impl std::fmt::Debug for NatsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsCredentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}
