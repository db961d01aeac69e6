//! The wait vocabulary: what a request waits for before its VM counts as ready (data only; the
//! `vm` layer carries each wait out).

use std::fmt;

/// One thing to wait for. Each has its budget in the architecture's budget table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wait {
    /// A DHCP lease for this instance's MAC: the guest's address. Only on a first boot: after
    /// a power cycle the old lease is listed at once and says nothing about the new boot.
    Lease,
    /// Something accepts TCP connections on this port of the guest.
    OpenPort(u16),
    /// An SSH login as the admin user works (the host key verified).
    SshLogin,
    /// `cloud-init status --wait` is done, cleanly.
    CloudInitDone,
    /// A systemd unit is active: a system unit, or with `user` that user's unit.
    UnitActive {
        /// The unit's name, e.g. `acme-agent.service`.
        unit: String,
        /// The user whose unit it is (`None`: a system unit).
        user: Option<String>,
    },
    /// This text appears on the serial console after the current boot began.
    ConsoleText(String),
    /// A shell command run as the admin user exits 0.
    CommandSucceeds(String),
}

impl fmt::Display for Wait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Lease => f.write_str("lease"),
            Self::OpenPort(p) => write!(f, "port {p}"),
            Self::SshLogin => f.write_str("ssh"),
            Self::CloudInitDone => f.write_str("cloud-init"),
            Self::UnitActive { unit, user: None } => write!(f, "unit {unit}"),
            Self::UnitActive {
                unit,
                user: Some(u),
            } => write!(f, "user unit {unit} of {u}"),
            Self::ConsoleText(t) => write!(f, "console text {t:?}"),
            Self::CommandSucceeds(c) => write!(f, "`{c}` succeeds"),
        }
    }
}
