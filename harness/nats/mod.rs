//! The NATS server the agents report to, in two parts: [`server`] runs it (a podman container,
//! or a local nats-server process) and [`status`] reads what devices reported (a JetStream
//! stream captures every report, so a device's whole history can be read in order).

use std::time::Duration;

pub mod server;
pub mod status;

pub use server::NatsServer;
pub use status::{MessageLog, ReportLog, StatusLog, Stored, Verdict};

pub const STREAM_NAME: &str = "DEVICELAB_STATUS";

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
    #[error("NATS at {url} did not accept connections within {budget:?}: {last}{logs}")]
    NotReady {
        url: String,
        budget: Duration,
        last: String,
        logs: String,
    },
    #[error("could not restart the NATS server {server}: {stderr}")]
    Restart { server: String, stderr: String },
    #[error("cannot write the NATS server's configuration in {dir}: {source}")]
    Config {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the NATS server exited ({status}) before it was ready:{stderr}")]
    Exited { status: String, stderr: String },
    #[error(
        "the NATS server wrote no ports file in {dir} within {budget:?}, so its port is unknown{logs}"
    )]
    NoPort {
        dir: std::path::PathBuf,
        budget: Duration,
        logs: String,
    },
    #[error("the harness's NATS client is not connected yet (the server is still starting)")]
    NotConnected,
    #[error("cannot write the status history to {path}: {source}")]
    History {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("JetStream request failed while {doing}: {message}")]
    JetStream { doing: String, message: String },
    #[error("no report on {subject} matched within {budget:?}; seen: {seen}")]
    StatusTimeout {
        subject: String,
        budget: Duration,
        seen: String,
    },
    #[error("report rejected: {reason} (stream sequence {seq}: {report})")]
    StatusRejected {
        reason: String,
        seq: u64,
        report: String,
    },
}

pub(crate) fn js_err(doing: &str) -> impl FnOnce(String) -> NatsError + '_ {
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
