//! Every per-architecture fact, in one place: what differs between an x86_64 and an aarch64
//! device is decided here and nowhere else.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// A device's CPU architecture, which its VM is booted as: with KVM when it is the host's own
/// and KVM is usable, else emulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VmArchitecture {
    /// 64-bit x86 (`amd64` in Debian's naming).
    X86_64,
    /// 64-bit ARM (`arm64` in Debian's naming).
    Aarch64,
}

/// An architecture name the harness does not know.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    /// `value` is none of x86_64, aarch64 and their other names (amd64, x86-64, arm64).
    #[error(
        "unknown architecture {value:?} in {source_name}: use one of x86_64, aarch64 (or amd64, arm64)"
    )]
    Unknown {
        /// The name as given.
        value: String,
        /// Where it was given (e.g. the `ARCH` variable), for the message.
        source_name: String,
    },
}

/// How long each readiness phase may take before the harness gives up. While a VM starts,
/// each phase's budget counts from its start (the define, or the power-on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budgets {
    /// The guest's DHCP lease on its first boot.
    pub lease: Duration,
    /// On the first boot: port 22 open and an SSH login working (and any console-text wait).
    pub ssh: Duration,
    /// Provisioning finishing: `cloud-init status --wait` returning.
    pub cloud_init: Duration,
    /// A unit becoming active (a unit wait), and the agent's first report after onboarding.
    pub first_status: Duration,
    /// After a power-on: port 22 open and an SSH login working again (and any console-text
    /// wait); the trials also give the agent this long for its first report after a power cut
    /// or an outage.
    pub power_cycle_recovery: Duration,
    /// How long a guest may sit idle, its boot finished (a login prompt, or cloud-init's final
    /// message, on the console), with nothing listening on port 22 before a wait for SSH gives
    /// up on it (sshd normally listens within seconds of either).
    pub idle_grace: Duration,
    /// How long one command over SSH may run (`Vm::exec`, `succeed`, `upload`).
    pub command: Duration,
    /// A wait inside one guest command (onboarding waiting for the user's systemd manager).
    pub guest_step: Duration,
    /// Collecting one failure artifact (a log read over SSH).
    pub artifact_item: Duration,
    /// A warm start: from the restore to an SSH login working (measured in seconds; a clone
    /// that misses it marks its saved VM bad, and the request boots cold instead).
    pub restore: Duration,
}

/// How the guest firmware is provided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirmwareKind {
    /// The machine's built-in BIOS (SeaBIOS on q35): nothing to configure.
    Bios,
    /// UEFI from a CODE+VARS pflash pair (see the `firmware` module).
    UefiPflash,
}

impl VmArchitecture {
    /// Every architecture the harness boots.
    pub const ALL: [VmArchitecture; 2] = [VmArchitecture::X86_64, VmArchitecture::Aarch64];

    /// The name used in trial names, `ARCH` and libvirt's `<type arch=…>`.
    pub fn name(self) -> &'static str {
        match self {
            Self::X86_64 => "x86_64",
            Self::Aarch64 => "aarch64",
        }
    }

    /// Debian/Ubuntu's name for it (image file names, `dpkg --print-architecture`).
    pub fn debian_name(self) -> &'static str {
        match self {
            Self::X86_64 => "amd64",
            Self::Aarch64 => "arm64",
        }
    }

    /// Upper-case token for per-arch environment variables, e.g. `DEVICELAB_IMAGE_X86_64`.
    pub fn env_token(self) -> &'static str {
        match self {
            Self::X86_64 => "X86_64",
            Self::Aarch64 => "AARCH64",
        }
    }

    /// Reads an architecture's name, Linux's (`x86_64`, `aarch64`) or Debian's (`amd64`,
    /// `arm64`); `source_name` says where `value` came from, for the error.
    pub fn parse(value: &str, source_name: &str) -> Result<Self, ArchError> {
        match value.trim() {
            "x86_64" | "amd64" | "x86-64" => Ok(Self::X86_64),
            "aarch64" | "arm64" => Ok(Self::Aarch64),
            _ => Err(ArchError::Unknown {
                value: value.to_owned(),
                source_name: source_name.to_owned(),
            }),
        }
    }

    /// The host's own architecture (`None`: one the harness does not boot).
    pub fn host() -> Option<Self> {
        Self::parse(std::env::consts::ARCH, "the host").ok()
    }

    /// The QEMU machine type its VMs use (`q35`, `virt`).
    pub fn machine(self) -> &'static str {
        match self {
            Self::X86_64 => "q35",
            Self::Aarch64 => "virt",
        }
    }

    /// The file name of its QEMU system emulator, e.g. `qemu-system-aarch64`.
    pub fn emulator_binary(self) -> &'static str {
        match self {
            Self::X86_64 => "qemu-system-x86_64",
            Self::Aarch64 => "qemu-system-aarch64",
        }
    }

    /// How its VMs get their firmware: the built-in BIOS for x86_64, UEFI pflash for aarch64.
    pub fn firmware(self) -> FirmwareKind {
        match self {
            Self::X86_64 => FirmwareKind::Bios,
            Self::Aarch64 => FirmwareKind::UefiPflash,
        }
    }

    /// ELF `e_machine` of binaries that run on this architecture.
    pub fn elf_machine(self) -> u16 {
        match self {
            Self::X86_64 => 62,
            Self::Aarch64 => 183,
        }
    }

    /// The Rust target the agent is built for by default.
    pub fn rust_target(self) -> &'static str {
        match self {
            Self::X86_64 => "x86_64-unknown-linux-gnu",
            Self::Aarch64 => "aarch64-unknown-linux-gnu",
        }
    }

    /// Linker for cross-building the agent from another host architecture (Debian names).
    pub fn cross_linker(self) -> &'static str {
        match self {
            Self::X86_64 => "x86_64-linux-gnu-gcc",
            Self::Aarch64 => "aarch64-linux-gnu-gcc",
        }
    }

    /// Readiness budgets. KVM boots in well under a minute; emulated x86_64 takes a few
    /// minutes; emulated aarch64 (firmware, GRUB and kernel all under TCG) tens of minutes
    /// on a loaded host. Measured: x86_64 TCG define→SSH 130 s, aarch64 TCG 86–250 s.
    pub fn budgets(self, accel: Accelerator) -> Budgets {
        let minutes = |m: u64| Duration::from_secs(m * 60);
        match (self, accel) {
            (_, Accelerator::Kvm) => Budgets {
                lease: minutes(3),
                ssh: minutes(5),
                cloud_init: minutes(5),
                first_status: minutes(2),
                power_cycle_recovery: minutes(5),
                idle_grace: Duration::from_secs(30),
                command: minutes(5),
                guest_step: minutes(1),
                artifact_item: Duration::from_secs(30),
                restore: minutes(1),
            },
            (Self::X86_64, Accelerator::Tcg) => Budgets {
                lease: minutes(10),
                ssh: minutes(15),
                cloud_init: minutes(15),
                first_status: minutes(5),
                power_cycle_recovery: minutes(15),
                idle_grace: Duration::from_secs(60),
                command: minutes(10),
                guest_step: minutes(1),
                artifact_item: Duration::from_secs(30),
                restore: minutes(3),
            },
            (Self::Aarch64, Accelerator::Tcg) => Budgets {
                lease: minutes(30),
                ssh: minutes(30),
                cloud_init: minutes(30),
                first_status: minutes(10),
                power_cycle_recovery: minutes(30),
                idle_grace: Duration::from_secs(90),
                command: minutes(15),
                guest_step: minutes(2),
                artifact_item: Duration::from_secs(60),
                restore: minutes(5),
            },
        }
    }
}

impl Budgets {
    /// Multiplies every budget (DEVICELAB_BUDGET_SCALE), for slower or faster hosts.
    pub fn scaled(self, factor: f64) -> Self {
        let s = |d: Duration| d.mul_f64(factor);
        Self {
            lease: s(self.lease),
            ssh: s(self.ssh),
            cloud_init: s(self.cloud_init),
            first_status: s(self.first_status),
            power_cycle_recovery: s(self.power_cycle_recovery),
            idle_grace: s(self.idle_grace),
            command: s(self.command),
            guest_step: s(self.guest_step),
            artifact_item: s(self.artifact_item),
            restore: s(self.restore),
        }
    }
}

/// Waits on the host's side, the same for every architecture; scaled like the rest.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostBudgets {
    /// A NATS server writing its port and accepting connections.
    pub nats_start: Duration,
    /// A VM slot coming free while other tests' VMs hold every one (see `slots`).
    pub vm_slot: Duration,
}

impl HostBudgets {
    /// The host's budgets (60 s for the NATS server, 45 min for a VM slot), multiplied by
    /// `factor` (DEVICELAB_BUDGET_SCALE).
    pub fn scaled(factor: f64) -> Self {
        Self {
            nats_start: Duration::from_secs(60).mul_f64(factor),
            vm_slot: Duration::from_secs(45 * 60).mul_f64(factor),
        }
    }
}

impl fmt::Display for VmArchitecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How QEMU runs the guest's CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Accelerator {
    /// Hardware virtualization through `/dev/kvm`: for a guest of the host's own architecture.
    Kvm,
    /// QEMU's software emulation: any architecture, many times slower (hence its budgets).
    Tcg,
}

/// What the user asked for through DEVICELAB_ACCEL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    /// KVM where it can boot a stock guest, TCG otherwise (`auto`, the default).
    Auto,
    /// This accelerator, whatever the host offers (`kvm`, `tcg`).
    Force(Accelerator),
}

impl Accelerator {
    /// libvirt's `<domain type=…>`.
    pub fn domain_type(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "qemu",
        }
    }
}

impl fmt::Display for Accelerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        })
    }
}

/// The UEFI firmware an aarch64 VM boots from: a CODE and VARS pflash pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirmwarePair {
    /// The firmware's code image (read-only).
    pub code: PathBuf,
    /// The template of its variable store; each VM gets a writable copy.
    pub vars: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_naming_schemes_and_rejects_others() {
        assert_eq!(
            VmArchitecture::parse("arm64", "ARCH").unwrap(),
            VmArchitecture::Aarch64
        );
        assert_eq!(
            VmArchitecture::parse("x86_64", "ARCH").unwrap(),
            VmArchitecture::X86_64
        );
        let err = VmArchitecture::parse("riscv64", "ARCH")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("riscv64") && err.contains("ARCH") && err.contains("aarch64"),
            "{err}"
        );
    }

    /// DEVICELAB_BUDGET_SCALE reaches every wait: the destructuring names every field, so a
    /// budget added to the table without being scaled does not compile.
    #[test]
    fn scaling_scales_every_budget() {
        let base = VmArchitecture::X86_64.budgets(Accelerator::Tcg);
        let Budgets {
            lease,
            ssh,
            cloud_init,
            first_status,
            power_cycle_recovery,
            idle_grace,
            command,
            guest_step,
            artifact_item,
            restore,
        } = base.scaled(2.0);
        for (scaled, original) in [
            (lease, base.lease),
            (ssh, base.ssh),
            (cloud_init, base.cloud_init),
            (first_status, base.first_status),
            (power_cycle_recovery, base.power_cycle_recovery),
            (idle_grace, base.idle_grace),
            (command, base.command),
            (guest_step, base.guest_step),
            (artifact_item, base.artifact_item),
            (restore, base.restore),
        ] {
            assert_eq!(scaled, original * 2);
        }
        let HostBudgets {
            nats_start,
            vm_slot,
        } = HostBudgets::scaled(2.0);
        assert_eq!(nats_start, HostBudgets::scaled(1.0).nats_start * 2);
        assert_eq!(vm_slot, HostBudgets::scaled(1.0).vm_slot * 2);
    }

    #[test]
    fn aarch64_budgets_are_tens_of_minutes() {
        let b = VmArchitecture::Aarch64.budgets(Accelerator::Tcg);
        assert!(b.ssh >= Duration::from_secs(1800));
        assert!(VmArchitecture::X86_64.budgets(Accelerator::Kvm).ssh < b.ssh);
    }
}
