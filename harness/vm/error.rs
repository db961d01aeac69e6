//! What can go wrong starting or driving a VM: [`VmError`], which carries the evidence (the
//! console's last lines, the command's output, where the artifacts are kept) and the fix, and
//! the warm-start cache's own [`WarmError`].

use super::seed::SeedError;
use super::teardown::TeardownError;
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

/// What can go wrong starting or driving a VM. The message carries the evidence (the
/// console's last lines, a command's output, where the artifacts are kept) and, where the
/// harness knows it, the fix.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The spec cannot be booted (its name, its admin user's name, a size): fix the spec.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The host lacks something `arch`'s VMs need (QEMU, firmware, ...): install what
    /// `misses` names (`devicelab doctor --arch <arch>` shows every check).
    #[error(
        "this host cannot boot {arch} VMs yet; every miss, with its fix:\n{misses}  \
         (`devicelab doctor --arch {arch}` shows every check)"
    )]
    HostNotReady {
        /// The architecture the host cannot boot.
        arch: VmArchitecture,
        /// Every failed check, one a line, with its fix.
        misses: String,
    },
    /// The base image could not be found, downloaded or checked.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The libvirt storage pool or one of its volumes could not be prepared.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// A libvirt call (define, start, power off, ...) failed.
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    /// The cloud-init seed could not be written.
    #[error(transparent)]
    Seed(#[from] SeedError),
    /// An SSH key (the harness's client key, the guest's host key) could not be made or read.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The UEFI firmware an aarch64 VM boots from could not be found or prepared.
    #[error(transparent)]
    Firmware(#[from] FirmwareError),
    /// SSH to the guest failed: connecting, the host key, the login, or a command that did
    /// not finish within its budget.
    #[error("VM {vm}: {source}")]
    Ssh {
        /// The VM's name.
        vm: String,
        /// What SSH reported.
        source: SshError,
    },
    /// A guest command printed something the harness cannot read (a number it needs, say):
    /// the guest's tools differ from what the harness expects.
    #[error("VM {vm}: `{command}` printed {output:?}, not {expected}")]
    UnexpectedOutput {
        /// The VM's name.
        vm: String,
        /// The command.
        command: String,
        /// What it printed.
        output: String,
        /// What the harness expected.
        expected: &'static str,
    },
    /// Another VM instance has this name now (a live test, a kept VM, a teardown that failed):
    /// nothing of it was touched.
    #[error("VM {vm}: the name is taken by {owner}, so nothing of it was touched: {fix}")]
    NameInUse {
        /// The name asked for.
        vm: String,
        /// Who holds it, as its records say.
        owner: String,
        /// What to do.
        fix: &'static str,
    },
    /// A wait did not succeed within its budget.
    #[error("VM {vm}: no {phase} within {budget:?} ({last}){console}", console = ConsoleTail(console_tail))]
    Timeout {
        /// The VM's name.
        vm: String,
        /// What was waited for, e.g. `ssh`, `cloud-init done`, `unit acme.service`.
        phase: String,
        /// The budget the wait had.
        budget: Duration,
        /// What the last attempt saw: its error, or the state it found.
        last: String,
        /// The serial console's last lines.
        console_tail: Vec<String>,
    },
    /// A command that had to succeed (`Vm::succeed`, an upload) exited non-zero or was killed.
    #[error(
        "VM {vm}: `{command}` failed ({status}){}{}",
        Quoted("stdout", stdout),
        Quoted("stderr", stderr)
    )]
    CommandFailed {
        /// The VM's name.
        vm: String,
        /// The command, as run (an upload: `upload <path>`).
        command: String,
        /// How it ended: `exit status <n>`, `killed by <signal>`, or `no exit status`.
        status: String,
        /// What it printed on stdout.
        stdout: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// The console shows that this boot cannot succeed (a kernel panic, an emergency shell,
    /// sshd failing, ...), so the wait ended at once instead of at its budget.
    #[error("VM {vm}: {meaning}, so the wait cannot succeed; console: {line}{cause}{console}", console = ConsoleTail(console_tail))]
    BootFailed {
        /// The VM's name.
        vm: String,
        /// What the fatal console line means.
        meaning: &'static str,
        /// The fatal console line.
        line: String,
        /// What the guest and the harness know about why (evidence lines, the last power cut).
        cause: String,
        /// The serial console's last lines.
        console_tail: Vec<String>,
    },
    /// The guest sat idle (its login prompt, or cloud-init's final message, on the console) for
    /// the idle grace (`Budgets::idle_grace`) while port 22 refused connections, so the wait
    /// ended early.
    #[error("VM {vm}: no {phase}: {evidence}{cause}{console}", console = ConsoleTail(console_tail))]
    NothingListening {
        /// The VM's name.
        vm: String,
        /// What could not come up: `SSH`.
        phase: &'static str,
        /// What the harness saw: what said the boot finished, and how long port 22 refused.
        evidence: String,
        /// What the guest and the harness know about why (evidence lines, the last power cut).
        cause: String,
        /// The serial console's last lines.
        console_tail: Vec<String>,
    },
    /// cloud-init finished with errors, or never saw the NoCloud seed (the guest kernel lacks
    /// the driver for its cdrom).
    #[error("VM {vm}: cloud-init did not finish cleanly:\n{output}")]
    CloudInit {
        /// The VM's name.
        vm: String,
        /// What `cloud-init status --wait --long` printed, with the harness's note if any.
        output: String,
    },
    /// A file in the VM's run dir (its known_hosts, ...) could not be written.
    #[error("VM {vm}: cannot write {path}: {source}")]
    RunDir {
        /// The VM's name.
        vm: String,
        /// The file, or the run dir itself.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A command that had to fail (`Vm::fail`) exited 0.
    #[error(
        "VM {vm}: `{command}` succeeded, but it was expected to fail{}",
        Quoted("stdout", stdout)
    )]
    UnexpectedSuccess {
        /// The VM's name.
        vm: String,
        /// The command.
        command: String,
        /// What it printed on stdout.
        stdout: String,
    },
    /// The guest has no address yet: wait for its DHCP lease first (`Wait::Lease`).
    #[error("VM {vm}: no address yet (wait for its DHCP lease first: Wait::Lease)")]
    NoAddress {
        /// The VM's name.
        vm: String,
    },
    /// Provisioning failed after the domain started; what explains it is kept.
    /// [`VmError::root`] is the failure itself.
    #[error(
        "{source}\n  provisioning VM {vm} failed; what explains it is kept in {}{}",
        artifacts.display(),
        if unkept.is_empty() { String::new() } else {
            format!("\n  but this evidence could not be written there (is its disk full?): {}", unkept.join("; "))
        }
    )]
    Provision {
        /// The VM's name.
        vm: String,
        /// The directory that keeps the artifacts: serial log, domain XML, and the guest's
        /// own logs if SSH ever worked.
        artifacts: PathBuf,
        /// The artifacts that could not be written, and why.
        unkept: Vec<String>,
        /// The failure itself.
        source: Box<VmError>,
    },
    /// A cold boot failed, and the cached image it booted from no longer matches the digest it
    /// was downloaded against (its bytes changed on disk): the likely cause. Its record was
    /// removed, so the next run downloads a good copy. [`VmError::root`] is the failure itself.
    #[error(
        "{source}\n  the cached image {} no longer matches its sha256 (expected {}, now {}): its \
         bytes changed on disk, the likely cause of this failure; the next run downloads a good \
         copy over it",
        image.display(),
        rotted.expected,
        rotted.got
    )]
    ImageRotted {
        /// The cached image.
        image: PathBuf,
        /// Its digests.
        rotted: crate::image::download::Rotted,
        /// The failure itself.
        source: Box<VmError>,
    },
    /// Removing the VM failed; the message lists what is left.
    #[error(transparent)]
    Teardown(#[from] TeardownError),
    /// No VM slot came free in time (or its lock could not be used).
    #[error(transparent)]
    Slot(#[from] SlotError),
    /// A warm start failed.
    #[error(transparent)]
    Warm(#[from] WarmError),
    /// A harness task on a blocking thread panicked or was cancelled.
    #[error("a harness task failed: {0}")]
    Task(String),
}

impl VmError {
    /// The error itself, past the provisioning wrapper that says where the artifacts are.
    pub fn root(&self) -> &VmError {
        match self {
            Self::Provision { source, .. } | Self::ImageRotted { source, .. } => source.root(),
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

/// What can go wrong with the warm-start cache of saved VMs.
#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    /// A saved VM's files could not be read, written or moved (`devicelab clean --warm`
    /// empties the cache).
    #[error("saved VM {dir}: cannot {what}: {source} (devicelab clean --warm empties the cache)")]
    Io {
        /// What the harness was doing, e.g. "copy out".
        what: &'static str,
        /// The saved VM's directory, or the file concerned.
        dir: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `<emulator> --version` failed: the QEMU version is part of a saved VM's key.
    #[error("cannot read the version of {emulator}: {message}")]
    QemuVersion {
        /// The QEMU system emulator.
        emulator: PathBuf,
        /// Why: the error, or its exit status and stderr.
        message: String,
    },
    /// Every saved VM of one key (16) is held by a running clone, or by a kept one: run fewer
    /// warm VMs of one kind at once, or remove the kept ones.
    #[error(
        "all {MAX_CLONES} saved VMs of key {key} are in use by clones (running, or kept): run fewer \
         warm VMs of one kind at once, or remove the kept ones with `devicelab clean`"
    )]
    AllInUse {
        /// The saved VMs' key (a hash of everything they depend on).
        key: String,
    },
    /// libvirt could not restore the saved VM; it was deleted, so the next warm start builds
    /// it again.
    #[error(
        "VM {vm}: restoring the saved VM {dir} failed: {message}\n  it was deleted, so the next \
         warm start builds it again"
    )]
    Restore {
        /// The name of the VM being restored (the saved VM's).
        vm: String,
        /// The saved VM's directory.
        dir: PathBuf,
        /// libvirt's error.
        message: String,
    },
    /// A clone restored but did not work within the restore budget (`Budgets::restore`):
    /// its saved VM was deleted, and the request boots cold instead.
    #[error(
        "the saved VM {dir} restored but its clone was not usable within {budget:?}: {cause}\n  \
         it was deleted, so the next warm start builds it again; the clone's evidence is in {}",
        evidence.display()
    )]
    Broken {
        /// The saved VM's directory.
        dir: PathBuf,
        /// The restore budget.
        budget: Duration,
        /// What the clone's wait found.
        cause: String,
        /// Where the clone's evidence was moved (out of the way of the cold boot).
        evidence: PathBuf,
    },
    /// A saved VM's lock file could not be used.
    #[error(transparent)]
    Slot(#[from] SlotError),
}
