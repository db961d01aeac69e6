//! What VM to boot ("the request"): name, architecture, size and first-boot settings.

use crate::model::arch::VmArchitecture;
use crate::model::wait::Wait;

/// What VM to boot: its name, architecture, size, first-boot settings, and when it counts as
/// ready. [`VirtualMachineSpec::new`] gives the defaults; each `with_*` method changes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualMachineSpec {
    /// The VM's name, in logs and errors; a cold start names its libvirt domain after it, and
    /// it is the default hostname. 1–50 characters a-z, 0-9 and `-`, starting with a letter.
    pub name: String,
    /// The architecture the VM boots as.
    pub arch: VmArchitecture,
    /// Virtual CPUs (at least 1; 2 by default).
    pub vcpus: u32,
    /// Memory, in MiB (at least 512; 2048 by default).
    pub memory_mib: u64,
    /// The root disk's size, in GiB (at least 4; 8 by default).
    pub disk_gib: u64,
    /// What cloud-init sets up on the first boot.
    pub first_boot: FirstBootConfig,
    /// Whether the harness flushes the guest's filesystems (`sync`) once provisioning and
    /// onboarding are done, so a later power cut tests a device that was in service, not one
    /// whose provisioning was still in its page cache. On by default; turned off only to show
    /// what an unflushed provisioning does (the power-cut sweep).
    pub flush_provisioning: bool,
    /// When provisioning is done and the handle is returned.
    pub ready_when: Readiness,
    /// The guest's dirty-data writeback delay (`vm.dirty_expire_centisecs`), set at first boot
    /// before cloud-init writes anything; `None` keeps the image's (30 s on Debian and Ubuntu).
    /// For power-cut tests that need the window an unflushed write is lost in to be wide
    /// whatever the host's speed: the timing made explicit.
    pub writeback_delay: Option<std::time::Duration>,
    /// The test's own waits, applied after the harness's (see [`VirtualMachineSpec::waits`]).
    pub extra_waits: Vec<Wait>,
    /// Cold (a first boot) or warm (a restored, saved VM: see `warm`); `None` takes the
    /// configuration's choice (DEVICELAB_START).
    pub start: Option<Start>,
}

/// How a VM comes up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Start {
    /// A real first boot: firmware, bootloader, kernel, cloud-init. What the `e2e` trials prove.
    Cold,
    /// A clone of a VM of the same request saved at "cloud-init done" (built by one cold boot
    /// the first time), restored on a fresh overlay: seconds instead of a minute.
    Warm,
}

impl std::fmt::Display for Start {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Cold => "cold",
            Self::Warm => "warm",
        })
    }
}

/// The admin user the seed creates on every VM, unless a spec names another.
pub const ADMIN_USER: &str = "devicelab";

/// How far provisioning goes before the VM handle is returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// An SSH login works (cloud-init's init stage has written the host keys; its later
    /// stages may still be running): for tests of a device caught early in its first boot.
    SshLogin,
    /// `cloud-init status --wait` is done: the default.
    CloudInitDone,
}

impl std::fmt::Display for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::SshLogin => "SSH up",
            Self::CloudInitDone => "cloud-init done",
        })
    }
}

/// What cloud-init sets up on first boot. The harness's own SSH key is always authorized
/// for `admin_user`, in addition to `authorized_keys`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirstBootConfig {
    /// The guest's hostname (the VM's name by default).
    pub hostname: String,
    /// The user the harness logs in as over SSH, with passwordless sudo ([`ADMIN_USER`] by
    /// default).
    pub admin_user: String,
    /// More public keys for `admin_user` (`ssh-ed25519 AAAA… comment` lines), besides the
    /// harness's own.
    pub authorized_keys: Vec<String>,
    /// Shell commands cloud-init runs once, in its final stage of the first boot (`runcmd`); one that
    /// fails makes cloud-init, and so provisioning, fail.
    pub runcmd: Vec<String>,
}

/// A [`VirtualMachineSpec`] that cannot be booted, found before anything is created.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The VM's name (quoted) is not 1–50 characters a-z, 0-9 and `-`, starting with a letter.
    #[error(
        "VM name {0:?} is not valid: use 1-50 characters a-z, 0-9 and '-', starting with a letter"
    )]
    Name(String),
    /// The admin user's name (quoted) is not 1–32 characters a-z, 0-9, `_` and `-`, starting
    /// with a letter.
    #[error("user name {0:?} is not valid: use a-z, 0-9, '_' and '-', starting with a letter")]
    User(String),
    /// A size is below the least the harness boots: 1 vCPU, 512 MiB of memory, a 4 GiB disk.
    #[error("VM {name}: {what} must be at least {min}, got {got}")]
    TooSmall {
        /// The VM's name.
        name: String,
        /// The field that is too small: `vcpus`, `memory_mib` or `disk_gib`.
        what: &'static str,
        /// The least that field may be, in its unit.
        min: u64,
        /// What the spec asked for.
        got: u64,
    },
}

impl VirtualMachineSpec {
    /// A VM `name` of `arch` with the defaults: 2 vCPUs (measured faster than 1 even on a
    /// 2-core host), 2 GiB RAM, 8 GiB disk, the admin user [`ADMIN_USER`], provisioning
    /// flushed, ready when cloud-init is done.
    pub fn new(name: impl Into<String>, arch: VmArchitecture) -> Self {
        let name = name.into();
        Self {
            first_boot: FirstBootConfig {
                hostname: name.clone(),
                admin_user: ADMIN_USER.into(),
                authorized_keys: Vec::new(),
                runcmd: Vec::new(),
            },
            name,
            arch,
            vcpus: 2,
            memory_mib: 2048,
            disk_gib: 8,
            flush_provisioning: true,
            ready_when: Readiness::CloudInitDone,
            writeback_delay: None,
            extra_waits: Vec::new(),
            start: None,
        }
    }

    /// What provisioning waits for, in order: the lease, port 22, an SSH login, cloud-init
    /// done (unless `ready_when` is `SshLogin`), then the test's own waits.
    pub fn waits(&self) -> Vec<Wait> {
        let mut waits = vec![Wait::Lease, Wait::OpenPort(22), Wait::SshLogin];
        if self.ready_when == Readiness::CloudInitDone {
            waits.push(Wait::CloudInitDone);
        }
        waits.extend(self.extra_waits.iter().cloned());
        waits
    }

    /// One more thing provisioning waits for before the handle is returned (a unit active, a
    /// console line, a command that succeeds).
    pub fn with_wait(mut self, wait: Wait) -> Self {
        self.extra_waits.push(wait);
        self
    }

    /// Sets the number of virtual CPUs.
    pub fn with_vcpus(mut self, vcpus: u32) -> Self {
        self.vcpus = vcpus;
        self
    }
    /// Sets the memory, in MiB.
    pub fn with_memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }
    /// Sets the root disk's size, in GiB.
    pub fn with_disk_gib(mut self, gib: u64) -> Self {
        self.disk_gib = gib;
        self
    }
    /// `false`: never flush what provisioning and onboarding wrote (see `flush_provisioning`).
    pub fn with_provisioning_flush(mut self, flush: bool) -> Self {
        self.flush_provisioning = flush;
        self
    }
    /// Sets how far provisioning goes before the handle is returned.
    pub fn ready_when(mut self, readiness: Readiness) -> Self {
        self.ready_when = readiness;
        self
    }
    /// Sets the guest's dirty-data writeback delay (see
    /// [`VirtualMachineSpec::writeback_delay`]).
    pub fn with_writeback_delay(mut self, delay: std::time::Duration) -> Self {
        self.writeback_delay = Some(delay);
        self
    }
    /// Starts cold or warm, overriding DEVICELAB_START.
    pub fn with_start(mut self, start: Start) -> Self {
        self.start = Some(start);
        self
    }
    /// Replaces the first-boot settings (hostname, admin user, keys, `runcmd`).
    pub fn with_first_boot(mut self, first_boot: FirstBootConfig) -> Self {
        self.first_boot = first_boot;
        self
    }

    /// Checks that `name` can name a VM: 1–50 characters a-z, 0-9 and `-`, starting with a
    /// letter (a VM's name is a domain's, a volume's and a file's).
    pub fn check_name(name: &str) -> Result<(), SpecError> {
        let ok = (1..=50).contains(&name.len())
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if ok {
            Ok(())
        } else {
            Err(SpecError::Name(name.to_owned()))
        }
    }

    /// Checks the name, the admin user's name and the sizes; the lab does so before it
    /// creates anything.
    pub fn validate(&self) -> Result<(), SpecError> {
        Self::check_name(&self.name)?;
        let u = &self.first_boot.admin_user;
        let user_ok = !u.is_empty()
            && u.len() <= 32
            && u.starts_with(|c: char| c.is_ascii_lowercase())
            && u.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if !user_ok {
            return Err(SpecError::User(u.clone()));
        }
        for (what, min, got) in [
            ("vcpus", 1, self.vcpus as u64),
            ("memory_mib", 512, self.memory_mib),
            ("disk_gib", 4, self.disk_gib),
        ] {
            if got < min {
                return Err(SpecError::TooSmall {
                    name: self.name.clone(),
                    what,
                    min,
                    got,
                });
            }
        }
        Ok(())
    }
}
