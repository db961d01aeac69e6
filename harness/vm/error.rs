//! What can go wrong starting or driving a VM: [`VmError`], which carries the evidence (the
//! console's last lines, the command's output, where the artifacts are kept) and the fix, and
//! the warm-start cache's own [`WarmError`].

use super::seed::SeedError;
use super::teardown::TeardownError;
use crate::host::firewall::FirewallError;
use crate::host::libvirt::LibvirtError;
use crate::host::pool::PoolError;
use crate::host::slots::SlotError;
use crate::image::ImageError;
use crate::image::firmware::FirmwareError;
use crate::model::arch::VmArchitecture;
use crate::model::spec::SpecError;
use crate::ssh::SshError;
use crate::ssh::keys::KeyError;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// At most this many saved VMs of one key (clones running at once).
pub(crate) const MAX_CLONES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(
        "this host cannot boot {arch} VMs yet; every miss, with its fix:\n{misses}  \
         (`devicelab doctor --arch {arch}` shows every check)"
    )]
    HostNotReady {
        arch: VmArchitecture,
        misses: String,
    },
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
        phase: String,
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
    #[error("VM {vm}: cannot write {path}: {source}")]
    RunDir {
        vm: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "VM {vm}: `{command}` succeeded, but it was expected to fail{}",
        Quoted("stdout", stdout)
    )]
    UnexpectedSuccess {
        vm: String,
        command: String,
        stdout: String,
    },
    #[error("VM {vm}: no address yet (wait for its DHCP lease first: Wait::Lease)")]
    NoAddress { vm: String },
    #[error("{source}\n  provisioning VM {vm} failed; what explains it is kept in {}", artifacts.display())]
    Provision {
        vm: String,
        artifacts: PathBuf,
        source: Box<VmError>,
    },
    #[error(transparent)]
    Teardown(#[from] TeardownError),
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error(transparent)]
    Firewall(#[from] FirewallError),
    #[error(transparent)]
    Warm(#[from] WarmError),
    #[error("a harness task failed: {0}")]
    Task(String),
}

impl VmError {
    /// The error itself, past the provisioning wrapper that says where the artifacts are.
    pub fn root(&self) -> &VmError {
        match self {
            Self::Provision { source, .. } => source.root(),
            other => other,
        }
    }
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

#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    #[error("saved VM {dir}: cannot {what}: {source} (devicelab clean --warm empties the cache)")]
    Io {
        what: &'static str,
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the version of {emulator}: {message}")]
    QemuVersion { emulator: PathBuf, message: String },
    #[error(
        "all {MAX_CLONES} saved VMs of key {key} are in use by clones: a test runs more warm VMs of \
         one kind at once than devicelab supports"
    )]
    AllInUse { key: String },
    #[error(
        "VM {vm}: restoring the saved VM {dir} failed: {message}\n  it was deleted, so the next \
         warm start builds it again"
    )]
    Restore {
        vm: String,
        dir: PathBuf,
        message: String,
    },
    #[error(transparent)]
    Slot(#[from] SlotError),
}
