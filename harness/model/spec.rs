//! What VM to boot ("the request"): name, architecture, size and first-boot settings.

use crate::model::arch::VmArchitecture;
use crate::model::wait::Wait;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualMachineSpec {
    pub name: String,
    pub arch: VmArchitecture,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
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
    pub hostname: String,
    pub admin_user: String,
    pub authorized_keys: Vec<String>,
    /// Shell commands cloud-init runs once, in its final stage of the first boot (`runcmd`); one that
    /// fails makes cloud-init, and so provisioning, fail.
    pub runcmd: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error(
        "VM name {0:?} is not valid: use 1-50 characters a-z, 0-9 and '-', starting with a letter"
    )]
    Name(String),
    #[error("user name {0:?} is not valid: use a-z, 0-9, '_' and '-', starting with a letter")]
    User(String),
    #[error("VM {name}: {what} must be at least {min}, got {got}")]
    TooSmall {
        name: String,
        what: &'static str,
        min: u64,
        got: u64,
    },
}

impl VirtualMachineSpec {
    /// 2 vCPUs (measured faster than 1 even on a 2-core host), 2 GiB RAM, 8 GiB disk.
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

    pub fn with_vcpus(mut self, vcpus: u32) -> Self {
        self.vcpus = vcpus;
        self
    }
    pub fn with_memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }
    pub fn with_disk_gib(mut self, gib: u64) -> Self {
        self.disk_gib = gib;
        self
    }
    /// `false`: never flush what provisioning and onboarding wrote (see `flush_provisioning`).
    pub fn with_provisioning_flush(mut self, flush: bool) -> Self {
        self.flush_provisioning = flush;
        self
    }
    pub fn ready_when(mut self, readiness: Readiness) -> Self {
        self.ready_when = readiness;
        self
    }
    pub fn with_writeback_delay(mut self, delay: std::time::Duration) -> Self {
        self.writeback_delay = Some(delay);
        self
    }
    /// Cold or warm, whatever DEVICELAB_START says.
    pub fn with_start(mut self, start: Start) -> Self {
        self.start = Some(start);
        self
    }
    pub fn with_first_boot(mut self, first_boot: FirstBootConfig) -> Self {
        self.first_boot = first_boot;
        self
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        let n = &self.name;
        let name_ok = (1..=50).contains(&n.len())
            && n.starts_with(|c: char| c.is_ascii_lowercase())
            && n.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !name_ok {
            return Err(SpecError::Name(n.clone()));
        }
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
                    name: n.clone(),
                    what,
                    min,
                    got,
                });
            }
        }
        Ok(())
    }
}
