//! What a host needs to run devicelab, checked piece by piece, each miss with the install line
//! for this host's distribution: `devicelab doctor` prints the whole list, and [`crate::Lab`]
//! runs the same checks before its first VM so a run fails once, naming every miss.

use crate::config::{HarnessConfig, NatsMode};
use crate::host::accel;
use crate::host::libvirt::Libvirt;
use crate::host::remote;
use crate::model::arch::Accelerator;
use crate::model::arch::VmArchitecture;
use crate::ssh::shell_quote;
use crate::support::which::{resolve, which};
use crate::{host::qemu_probe, image::firmware};
use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// There and working.
    Ok,
    /// Works, at a cost the line names (TCG instead of KVM, a QEMU knob missing).
    Warn,
    /// A run that needs it fails.
    Fail,
}

/// One piece of the host, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub what: String,
    pub status: Status,
    pub detail: String,
    /// What to run or set (for this host's package manager), when it is not `Ok`.
    pub fix: Option<String>,
}

impl Check {
    fn ok(what: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }
    fn miss(what: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            status: Status::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
    fn warn(what: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            status: Status::Warn,
            ..Self::miss(what, detail, fix)
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = match self.status {
            Status::Ok => "✓",
            Status::Warn => "!",
            Status::Fail => "✗",
        };
        write!(f, "{mark} {}: {}", self.what, self.detail)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n    fix: {fix}")?;
        }
        Ok(())
    }
}

/// Every check, in order.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.status == Status::Fail)
    }
    pub fn passed(&self) -> bool {
        self.failures().next().is_none()
    }
    /// The failures, one after the other, each with its fix.
    pub fn misses(&self) -> String {
        self.failures().map(|c| format!("  {c}\n")).collect()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.checks {
            writeln!(f, "{c}")?;
        }
        Ok(())
    }
}

/// The host's package manager, for the install lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Distro {
    Apt,
    Pacman,
    Dnf,
    Unknown,
}

impl Distro {
    /// From `/etc/os-release` (`ID`, `ID_LIKE`).
    pub fn detect() -> Self {
        Self::from_os_release(&std::fs::read_to_string("/etc/os-release").unwrap_or_default())
    }

    pub fn from_os_release(text: &str) -> Self {
        let ids: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("ID=").or_else(|| l.strip_prefix("ID_LIKE=")))
            .flat_map(|v| {
                v.trim_matches('"')
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect();
        let has = |names: &[&str]| ids.iter().any(|i| names.contains(&i.as_str()));
        if has(&["debian", "ubuntu"]) {
            Self::Apt
        } else if has(&["arch", "manjaro"]) {
            Self::Pacman
        } else if has(&["fedora", "rhel", "centos"]) {
            Self::Dnf
        } else {
            Self::Unknown
        }
    }

    /// The install line for `piece`.
    pub fn install(self, piece: Piece) -> String {
        let (apt, pacman, dnf) = piece.packages();
        let line = match self {
            Self::Apt => format!("sudo apt install {apt}"),
            Self::Pacman => format!("sudo pacman -S {pacman}"),
            Self::Dnf => format!("sudo dnf install {dnf}"),
            Self::Unknown => {
                format!("install {apt} (Debian's names; Arch: {pacman}; Fedora: {dnf})")
            }
        };
        line + " (or: sudo fixtures/host/setup.sh, which installs all of it)"
    }
}

/// A host piece that comes from a package.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    Libvirt,
    Qemu(VmArchitecture),
    Aarch64Firmware,
    Podman,
    NatsServer,
    CrossLinker(VmArchitecture),
}

impl Piece {
    /// Package names: (apt, pacman, dnf).
    fn packages(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Self::Libvirt => (
                "libvirt-daemon-system libvirt-clients",
                "libvirt dnsmasq",
                "libvirt-daemon-kvm libvirt-client",
            ),
            Self::Qemu(VmArchitecture::X86_64) => ("qemu-system-x86", "qemu-base", "qemu-kvm"),
            Self::Qemu(VmArchitecture::Aarch64) => (
                "qemu-system-arm",
                "qemu-system-aarch64",
                "qemu-system-aarch64",
            ),
            Self::Aarch64Firmware => ("qemu-efi-aarch64", "edk2-aarch64", "edk2-aarch64"),
            Self::Podman => ("podman", "podman", "podman"),
            Self::NatsServer => ("nats-server", "nats-server", "nats-server"),
            Self::CrossLinker(VmArchitecture::Aarch64) => (
                "gcc-aarch64-linux-gnu libc6-dev-arm64-cross",
                "aarch64-linux-gnu-gcc",
                "gcc-aarch64-linux-gnu",
            ),
            Self::CrossLinker(VmArchitecture::X86_64) => (
                "gcc-x86-64-linux-gnu libc6-dev-amd64-cross",
                "gcc",
                "gcc-x86_64-linux-gnu",
            ),
        }
    }
}

/// What to check.
#[derive(Debug, Clone)]
pub struct Scope {
    /// libvirt, the network, the data dir, free disk, NATS.
    pub host_wide: bool,
    /// The architectures a run boots: QEMU, firmware, accelerator.
    pub archs: Vec<VmArchitecture>,
    /// Probe QEMU's optional arguments (a second or so each; the lab probes them anyway when
    /// it plans a VM).
    pub qemu_knobs: bool,
    /// Building a cargo agent for each architecture (the reference agent is one).
    pub cargo_agent: bool,
}

impl Scope {
    /// Everything, for `archs`: what `devicelab doctor` checks.
    pub fn everything(archs: Vec<VmArchitecture>) -> Self {
        Self {
            host_wide: true,
            archs,
            qemu_knobs: true,
            cargo_agent: true,
        }
    }
}

/// Runs every check `scope` needs. Blocking (libvirt, QEMU probes, file system): call it from
/// a blocking task in async code.
pub fn check(config: &HarnessConfig, scope: &Scope) -> Report {
    let distro = Distro::detect();
    let mut checks = Vec::new();
    if scope.host_wide {
        checks.extend(libvirt(config, distro));
        checks.push(data_dir(config));
        checks.push(free_disk(config, scope.archs.len()));
        checks.push(nats(config, distro));
    }
    // Another host, asked once for every architecture checked.
    let remote = crate::config::uri_host(&config.libvirt_uri)
        .filter(|_| !scope.archs.is_empty())
        .map(|host| RemoteHost::ask(host, &config.libvirt_uri));
    for &arch in &scope.archs {
        checks.extend(for_arch(config, arch, distro, scope, remote.as_ref()));
    }
    Report { checks }
}

/// Another libvirt host as its libvirt describes itself: its accelerator's grounds, or why it
/// did not answer, and its size.
struct RemoteHost {
    host: String,
    facts: Result<accel::HostFacts, String>,
    size: Option<(usize, u64)>,
    /// The connection, asked again per architecture (its QEMU).
    libvirt: Result<Libvirt, String>,
}

impl RemoteHost {
    /// One connection to `uri` (`host`). Blocking.
    fn ask(host: String, uri: &str) -> Self {
        let libvirt = Libvirt::open(uri).map_err(|e| first_line(&e.to_string()));
        let facts = libvirt
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|lv| lv.host_facts().map_err(|e| first_line(&e.to_string())));
        let size = libvirt.as_ref().ok().and_then(|lv| lv.node_size().ok());
        Self {
            host,
            facts,
            size,
            libvirt,
        }
    }

    /// The host's QEMU for `arch`, as its libvirt names it. Blocking.
    fn qemu(
        &self,
        arch: VmArchitecture,
        accel: Accelerator,
    ) -> Result<crate::host::libvirt::HostQemu, String> {
        self.libvirt
            .as_ref()
            .map_err(Clone::clone)?
            .host_qemu(arch, accel)
            .map_err(|e| first_line(&e.to_string()))
    }
}

/// For a remote host, how the guests are reached: through its SSH login, read from the URI
/// (user, key, the host key `known_hosts` pins); nothing for a local one.
fn guest_route(uri: &str) -> Option<Check> {
    match remote::ssh_hop(uri) {
        Ok(None) => None,
        Ok(Some(host)) => Some(Check::ok(
            "guest route",
            format!(
                "through {}@{} (host key {} pinned); the host's sshd needs `GatewayPorts \
                 clientspecified` for the guests to reach NATS",
                host.target.user,
                host.target.addr,
                crate::ssh::session::fingerprint(&host.target.host_key)
            ),
        )),
        Err(e) => Some(Check::miss(
            "guest route",
            e.to_string(),
            "change the URI (DEVICELAB_LIBVIRT_URI or DEVICELAB_HOSTS) or the files it names, as \
             the line above says",
        )),
    }
}

/// libvirtd reachable, and the network active (the connection failing for a non-root user is
/// usually the group).
fn libvirt(config: &HarnessConfig, distro: Distro) -> Vec<Check> {
    let uri = &config.libvirt_uri;
    let route = guest_route(uri);
    let lv = match Libvirt::open(uri) {
        Ok(lv) => lv,
        // Refused before connecting: the route's miss says why and what to use instead.
        Err(crate::host::libvirt::LibvirtError::Refused(_)) => {
            return route
                .into_iter()
                .chain([Check::miss(
                    format!("network {}", config.network),
                    "not checked: no libvirt connection",
                    "fix the URI first",
                )])
                .collect();
        }
        Err(e) => {
            let root = rustix::process::geteuid().is_root();
            let fix = if !root && e.to_string().contains("ermission denied") {
                "add yourself to the libvirt group (sudo usermod -aG libvirt $USER), then log in again".to_owned()
            } else if which("libvirtd").is_none() {
                distro.install(Piece::Libvirt)
            } else {
                "start it: sudo systemctl enable --now libvirtd (where systemd is not PID 1: virtlogd -d; libvirtd -d)".to_owned()
            };
            return vec![
                Check::miss(
                    "libvirt",
                    format!("cannot connect to {uri}: {}", first_line(&e.to_string())),
                    fix,
                ),
                Check::miss(
                    format!("network {}", config.network),
                    "not checked: no libvirt connection",
                    "fix libvirt first",
                ),
            ]
            .into_iter()
            .chain(route)
            .collect();
        }
    };
    let who = if rustix::process::geteuid().is_root() {
        "as root"
    } else {
        "as this user"
    };
    let mut out = vec![Check::ok("libvirt", format!("{uri} answers {who}"))];
    out.extend(route);
    out.push(match lv.network_gateway(&config.network) {
        Ok(gw) => Check::ok(
            format!("network {}", config.network),
            format!("active; the host is {gw} on it"),
        ),
        Err(e) => Check::miss(
            format!("network {}", config.network),
            first_line(&e.to_string()),
            format!(
                "virsh -c {uri} net-start {n} (and net-autostart {n}); or set DEVICELAB_NETWORK",
                uri = shell_quote(uri),
                n = shell_quote(&config.network)
            ),
        ),
    });
    // Each host's bridge: every warm restore there waits it out.
    if let Ok(Some(stp)) = lv.network_stp(&config.network) {
        out.push(bridge_stp(uri, &config.network, stp));
    }
    out.push(match lv.network_filters() {
        Ok(n) => Check::ok(
            "network filters",
            format!("libvirt's nwfilter driver answers ({n} filters): partitions work"),
        ),
        Err(e) => Check::warn(
            "network filters",
            format!(
                "{} (a partition is a libvirt network filter)",
                first_line(&e.to_string())
            ),
            "install and start libvirt's nwfilter driver (virtnwfilterd, or a libvirtd built with \
             it) and ebtables; only partitions need it",
        ),
    });
    out
}

/// The network's bridge: with STP on, a VM's interface passes no traffic for its first ~4 s,
/// which a warm restore waits out.
fn bridge_stp(uri: &str, network: &str, stp: bool) -> Check {
    let what = format!("network {network}: bridge");
    if !stp {
        return Check::ok(
            what,
            "STP off: a VM's interface passes traffic once plugged",
        );
    }
    Check::warn(
        what,
        "STP on: the kernel holds each newly plugged VM interface for twice the forward delay \
         (2 s at least, whatever delay='0' says) before it passes traffic; every warm restore \
         waits ~4 s for it",
        format!(
            "with no VM on it: virsh -c {uri} net-dumpxml {network} | sed \"s/stp='on'/stp='off'/\" \
             > {xml} && virsh -c {uri} net-define {xml} && virsh -c {uri} \
             net-destroy {network} && virsh -c {uri} net-start {network}",
            uri = shell_quote(uri),
            xml = shell_quote(&format!("{network}.xml")),
            network = shell_quote(network),
        ),
    )
}

/// The data dir: writable by us, and every directory above it traversable by libvirt's QEMU
/// user (it opens the images and the seed there), unless QEMU runs as root.
fn data_dir(config: &HarnessConfig) -> Check {
    let dir = &config.data_dir;
    let what = "data dir";
    let existing = nearest_existing(dir);
    let probe = tempfile::tempfile_in(&existing);
    if let Err(e) = probe {
        return Check::miss(
            what,
            format!("{} is not writable here ({e})", existing.display()),
            "set DEVICELAB_DATA_DIR to a directory you can write",
        );
    }
    if !qemu_runs_as_root() {
        use std::os::unix::fs::PermissionsExt;
        let closed = existing
            .ancestors()
            .find(|d| std::fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 == 0));
        if let Some(closed) = closed {
            return Check::miss(
                what,
                format!(
                    "{} is not traversable by others, so libvirt's QEMU user cannot reach {}",
                    closed.display(),
                    dir.display()
                ),
                format!(
                    "chmod o+x {}, or set DEVICELAB_DATA_DIR under a directory others can traverse (/var/lib, /var/tmp)",
                    closed.display()
                ),
            );
        }
    }
    Check::ok(
        what,
        format!("{} (reachable by libvirt's QEMU)", dir.display()),
    )
}

/// Room for the images (about 2 GiB per architecture, with overlays) and the runs.
fn free_disk(config: &HarnessConfig, archs: usize) -> Check {
    let need_gib = 2 * archs.max(1) as u64 + 1;
    let dir = nearest_existing(&config.data_dir);
    let what = "free disk";
    match free_bytes(&dir) {
        Some(free) if free >= need_gib << 30 => Check::ok(
            what,
            format!("{} GiB free under {}", free >> 30, dir.display()),
        ),
        Some(free) => Check::miss(
            what,
            format!(
                "{} GiB free under {}, {need_gib} GiB needed for the images and runs",
                free >> 30,
                dir.display()
            ),
            "free some space, or set DEVICELAB_DATA_DIR to a larger file system",
        ),
        None => Check::warn(
            what,
            format!("cannot read the free space of {}", dir.display()),
            "check it by hand (df)",
        ),
    }
}

fn nats(config: &HarnessConfig, distro: Distro) -> Check {
    match &config.nats {
        NatsMode::Process { binary } => match resolve(binary) {
            Some(p) => Check::ok("NATS", format!("nats-server process ({})", p.display())),
            None => Check::miss(
                "NATS",
                format!(
                    "DEVICELAB_NATS=process, but {} is not there",
                    binary.display()
                ),
                distro.install(Piece::NatsServer) + "; or set DEVICELAB_NATS_SERVER to its path",
            ),
        },
        NatsMode::Container { image } => {
            let Some(podman) = resolve(&config.podman) else {
                return Check::miss(
                    "NATS",
                    "podman is not installed (the NATS server runs in a container)",
                    distro.install(Piece::Podman) + "; or DEVICELAB_NATS=process with nats-server",
                );
            };
            let present = std::process::Command::new(&podman)
                .args(["image", "exists", image])
                .status()
                .is_ok_and(|s| s.success());
            if present {
                Check::ok("NATS", format!("container image {image} (podman)"))
            } else {
                Check::warn(
                    "NATS",
                    format!(
                        "the image {image} is not on this host yet: podman pulls it on first use, which needs a route to its registry"
                    ),
                    format!(
                        "devicelab fetch (pulls it), or podman pull {image}; offline: fixtures/nats/build-image.sh and DEVICELAB_NATS_IMAGE"
                    ),
                )
            }
        }
    }
}

fn for_arch(
    config: &HarnessConfig,
    arch: VmArchitecture,
    distro: Distro,
    scope: &Scope,
    remote: Option<&RemoteHost>,
) -> Vec<Check> {
    let mut out = Vec::new();
    let decision = match remote {
        None => accel::decide(arch, config.accel),
        Some(r) => accel::decide_from_libvirt(arch, config.accel, &r.host, &r.facts),
    };
    // Another host's QEMU is the one its libvirt names; nothing of this machine's counts.
    let emulator = match remote {
        None => {
            let found = find_emulator(arch);
            out.push(match &found {
                Some(p) => Check::ok(format!("{arch}: QEMU"), p.display().to_string()),
                None => Check::miss(
                    format!("{arch}: QEMU"),
                    format!("no {}", arch.emulator_binary()),
                    distro.install(Piece::Qemu(arch)),
                ),
            });
            found
        }
        Some(r) => match r.qemu(arch, decision.accel) {
            Ok(q) => {
                out.push(Check::ok(
                    format!("{arch}: QEMU"),
                    format!(
                        "{} on {}, machine {}",
                        q.emulator.display(),
                        r.host,
                        q.machine
                    ),
                ));
                Some(q.emulator)
            }
            Err(e) => {
                out.push(Check::miss(
                    format!("{arch}: QEMU"),
                    format!("not read from {}'s libvirt: {e}", r.host),
                    format!(
                        "on {}: install {} (its package for {arch} guests), then restart \
                         libvirtd; or, if its libvirt did not answer, the fix above",
                        r.host,
                        arch.emulator_binary()
                    ),
                ));
                None
            }
        },
    };
    if arch == VmArchitecture::Aarch64 {
        out.push(match firmware::discover(config.uefi.as_ref()) {
            Ok(fw) => Check::ok(
                "aarch64: UEFI firmware",
                format!("{} + {}", fw.code.display(), fw.vars.display()),
            ),
            Err(e @ firmware::FirmwareError::ConfiguredMissing { .. }) => Check::miss(
                "aarch64: UEFI firmware",
                first_line(&e.to_string()),
                "fix DEVICELAB_UEFI_CODE/DEVICELAB_UEFI_VARS, or unset both",
            ),
            Err(e) => Check::miss(
                "aarch64: UEFI firmware",
                format!("no CODE + VARS pair found ({})", first_line(&e.to_string())),
                distro.install(Piece::Aarch64Firmware)
                    + "; or set DEVICELAB_UEFI_CODE and DEVICELAB_UEFI_VARS",
            ),
        });
    }
    out.push(match decision.accel {
        Accelerator::Kvm => Check::ok(
            format!("{arch}: accelerator"),
            format!("KVM ({})", decision.reason),
        ),
        Accelerator::Tcg => Check::warn(
            format!("{arch}: accelerator"),
            format!(
                "TCG ({}): works, with the slower TCG budgets (boot in minutes, not seconds)",
                decision.reason
            ),
            match (remote, VmArchitecture::host() == Some(arch)) {
                (Some(_), _) => {
                    "a libvirt host of the guest's architecture whose /dev/kvm works (bare \
                     metal or nested virtualisation), or accept TCG"
                }
                (None, true) => {
                    "a host where /dev/kvm works (bare metal or nested virtualisation), or accept TCG"
                }
                (None, false) => "nothing to do: another architecture is always emulated",
            },
        ),
    });
    // A remote host's own size, as its libvirt reports it (this machine's for a local one).
    let size = remote.and_then(|r| r.size);
    let slots =
        crate::host::slots::SlotCount::for_size(config.slots_set(), size, decision.accel, 2, 2048);
    out.push(Check::ok(
        format!("{arch}: VM slots"),
        format!(
            "{} default-size VMs at once ({}); the nextest `vm` group's max-threads can match it",
            slots.count, slots.reason
        ),
    ));
    if scope.qemu_knobs
        && decision.accel == Accelerator::Tcg
        && arch == VmArchitecture::Aarch64
        && let Some(emulator) = &emulator
    {
        for knob in qemu_probe::AARCH64_TCG_KNOBS {
            let shown = knob.args.join(" ");
            let probed = match remote.map(|r| &r.libvirt) {
                None => qemu_probe::probe(emulator, &knob.args),
                Some(Ok(lv)) => lv.qemu_accepts(arch, emulator, &knob.args),
                Some(Err(e)) => Err(e.clone()),
            };
            let accepts = format!("aarch64: QEMU accepts {shown}");
            out.push(match (probed, knob.without) {
                (Ok(()), _) => Check::ok(accepts, knob.why),
                (Err(why), Some(cost)) => Check::warn(
                    accepts,
                    format!("no ({}); without it: {cost}", first_line(&why)),
                    "a newer QEMU (7.0 or later)",
                ),
                (Err(why), None) => Check::ok(
                    format!("aarch64: QEMU refuses {shown}"),
                    format!(
                        "{}; nothing measured is lost: {}",
                        first_line(&why),
                        knob.why
                    ),
                ),
            });
        }
    }
    if scope.cargo_agent && VmArchitecture::host() != Some(arch) {
        out.push(cross_build(arch, distro));
    }
    out
}

/// Building a cargo agent for `arch` from this host: the Rust target, and a linker for it.
fn cross_build(arch: VmArchitecture, distro: Distro) -> Check {
    let target = arch.rust_target();
    let what = format!("{arch}: building a cargo agent");
    let sysroot = std::process::Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let has_target =
        sysroot.is_some_and(|s| s.join("lib/rustlib").join(target).join("lib").is_dir());
    if !has_target {
        return Check::miss(
            what,
            format!(
                "the Rust target {target} is not installed (only agents built by cargo need it)"
            ),
            format!("rustup target add {target}"),
        );
    }
    let var = format!(
        "CARGO_TARGET_{}_LINKER",
        target.to_uppercase().replace('-', "_")
    );
    let linker = std::env::var_os(&var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(arch.cross_linker()));
    match resolve(&linker) {
        Some(p) => Check::ok(what, format!("{target}, linker {}", p.display())),
        None => Check::miss(
            what,
            format!("no linker {} for {target}", linker.display()),
            distro.install(Piece::CrossLinker(arch)) + &format!("; or set {var}"),
        ),
    }
}

/// The QEMU system emulator for `arch`, from the usual install locations.
pub fn find_emulator(arch: VmArchitecture) -> Option<PathBuf> {
    let bin = arch.emulator_binary();
    ["/usr/bin", "/usr/local/bin", "/usr/libexec"]
        .iter()
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.exists())
        .or_else(|| which(bin))
}

fn nearest_existing(dir: &Path) -> PathBuf {
    dir.ancestors()
        .find(|d| d.exists())
        .unwrap_or(Path::new("/"))
        .to_owned()
}

fn free_bytes(dir: &Path) -> Option<u64> {
    let st = rustix::fs::statvfs(dir).ok()?;
    Some(st.f_bavail * st.f_frsize)
}

/// Whether libvirt's QEMU runs as root (`user = "root"` in qemu.conf): then any directory will do.
fn qemu_runs_as_root() -> bool {
    std::fs::read_to_string("/etc/libvirt/qemu.conf")
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .any(|l| l.replace(' ', "") == "user=\"root\"")
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_distribution_comes_from_os_release() {
        assert_eq!(Distro::from_os_release("ID=debian\n"), Distro::Apt);
        assert_eq!(
            Distro::from_os_release("ID=pop\nID_LIKE=\"ubuntu debian\"\n"),
            Distro::Apt
        );
        assert_eq!(Distro::from_os_release("ID=arch\n"), Distro::Pacman);
        assert_eq!(
            Distro::from_os_release("ID=\"rocky\"\nID_LIKE=\"rhel centos fedora\"\n"),
            Distro::Dnf
        );
        assert_eq!(Distro::from_os_release(""), Distro::Unknown);
        assert!(
            Distro::Pacman
                .install(Piece::Aarch64Firmware)
                .contains("pacman -S edk2-aarch64")
        );
        assert!(
            Distro::Dnf
                .install(Piece::Qemu(VmArchitecture::Aarch64))
                .contains("dnf install qemu-system-aarch64")
        );
    }
}
