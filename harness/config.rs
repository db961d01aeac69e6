//! The harness's configuration: every setting comes from an environment variable, read once
//! and validated here so a typo fails with the variable's name and the accepted values.

use crate::model::arch::{AccelChoice, Accelerator, ArchError, VmArchitecture};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Every variable the harness reads, with its meaning: the one source of the
/// configuration table in docs/configuration.md (a test renders this list and compares it with its rows
/// between the `variables` markers). `<ARCH>` stands for `X86_64` or `AARCH64`.
pub const VARIABLES: &[(&str, &str)] = &[
    (
        "ARCH",
        "run only this architecture's VM trials (`x86_64`/`amd64`, `aarch64`/`arm64`); setting it opts in to booting VMs",
    ),
    (
        "DEVICELAB_DATA_DIR",
        "cache, keys, storage pool, run logs. Default `/var/lib/devicelab` as root, else `/var/tmp/devicelab-$UID` (not `$HOME`: libvirt's qemu user must reach the images). It must be yours, writable and have room (3 GiB free; `devicelab doctor`, checking both architectures, wants 5), or `Lab::new` refuses it naming the fix",
    ),
    (
        "DEVICELAB_LIBVIRT_URI",
        "libvirt connection, default `qemu:///system`; another host's: [remote-hosts.md](remote-hosts.md)",
    ),
    (
        "DEVICELAB_HOSTS",
        "several libvirt hosts for a fleet, as libvirt URIs separated by blanks, each with `#slots=N` to set its VM slots (else derived from that host), e.g. `qemu:///system qemu+ssh://lab@kvm1/system#slots=4`; the first is where a single VM runs (instead of `DEVICELAB_LIBVIRT_URI`): [remote-hosts.md](remote-hosts.md)",
    ),
    (
        "DEVICELAB_NETWORK",
        "libvirt network the VMs join, default `default`; guests reach host services at its gateway",
    ),
    (
        "DEVICELAB_ACCEL",
        "`auto` (default), `kvm` or `tcg`. auto uses KVM only where it really works (see below)",
    ),
    (
        "DEVICELAB_BUDGET_SCALE",
        "multiply every budget of the budget table (VM phases, in-guest waits, the NATS server's start), e.g. `2` on a slow host; from `0.1` to `100`",
    ),
    (
        "DEVICELAB_KEEP",
        "`1`: leave VMs and NATS running after a test and print the exact `ssh` command",
    ),
    (
        "DEVICELAB_START",
        "`cold` (default) or `warm`: how the `vm` and `onboarded` fixtures (and any spec that does not choose) start a VM; warm restores a saved, cloud-init-done VM (see \"Warm starts\"). The `e2e` and `power_cycle` trials always boot cold",
    ),
    (
        "DEVICELAB_VM_SLOTS",
        "how many VMs may run at once on a host, across every test process (default: derived from the host's cores and memory, see \"Parallel VMs\"; a host of `DEVICELAB_HOSTS` may set its own)",
    ),
    (
        "DEVICELAB_UEFI_CODE",
        "the aarch64 UEFI CODE file to boot, instead of the usual places (with `DEVICELAB_UEFI_VARS`: both or neither)",
    ),
    (
        "DEVICELAB_UEFI_VARS",
        "the aarch64 UEFI VARS template each VM's NVRAM volume is sent from (with `DEVICELAB_UEFI_CODE`)",
    ),
    (
        "DEVICELAB_IMAGE_<ARCH>",
        "a local qcow2/raw image (absolute path) to boot instead of the pinned download",
    ),
    (
        "DEVICELAB_IMAGE_URL_<ARCH>",
        "download this image instead of the pin (needs `DEVICELAB_IMAGE_SHA256_<ARCH>`)",
    ),
    (
        "DEVICELAB_IMAGE_SHA256_<ARCH>",
        "the SHA-256 of `DEVICELAB_IMAGE_URL_<ARCH>` (64 hex digits)",
    ),
    (
        "DEVICELAB_AGENT_BIN_<ARCH>",
        "a prebuilt agent binary (its ELF machine is checked) instead of building `fixtures/agent`",
    ),
    (
        "DEVICELAB_AGENT_TARGET_<ARCH>",
        "Rust target for building the agent (default `x86_64-unknown-linux-gnu` / `aarch64-unknown-linux-gnu`)",
    ),
    (
        "DEVICELAB_NATS",
        "`container` (default: podman) or `process` (a local `nats-server`)",
    ),
    (
        "DEVICELAB_NATS_IMAGE",
        "container image, default `docker.io/library/nats:2.10`",
    ),
    (
        "DEVICELAB_NATS_SERVER",
        "`nats-server` binary for `DEVICELAB_NATS=process` (default: from `PATH`, else `/usr/sbin`)",
    ),
    (
        "DEVICELAB_PODMAN",
        "the podman binary for the NATS container and the reaper (default `podman` from `PATH`)",
    ),
    ("RUST_LOG", "log filter (default `devicelab=info`)"),
];

/// The configuration table of docs/configuration.md, rendered from [`VARIABLES`].
pub fn variables_table() -> String {
    let mut out = String::from("| variable | meaning |\n| --- | --- |\n");
    for (name, meaning) in VARIABLES {
        out.push_str(&format!("| `{name}` | {meaning} |\n"));
    }
    out
}

/// Whether `var` is one of [`VARIABLES`] (a `<ARCH>` entry matches either architecture).
pub fn is_known(var: &str) -> bool {
    VARIABLES
        .iter()
        .any(|(name, _)| match name.strip_suffix("<ARCH>") {
            Some(prefix) => var
                .strip_prefix(prefix)
                .is_some_and(|token| VmArchitecture::ALL.iter().any(|a| a.env_token() == token)),
            None => *name == var,
        })
}

/// Per-architecture overrides, parsed and checked when the configuration is read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchOverrides {
    /// `DEVICELAB_IMAGE_<ARCH>`: (variable, absolute path).
    pub image: Option<(String, PathBuf)>,
    /// `DEVICELAB_IMAGE_URL_<ARCH>` with its SHA-256 (64 hex digits).
    pub image_url: Option<(String, String)>,
    /// `DEVICELAB_AGENT_BIN_<ARCH>`: (variable, path).
    pub agent_bin: Option<(String, PathBuf)>,
    /// `DEVICELAB_AGENT_TARGET_<ARCH>`.
    pub agent_target: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Arch(#[from] ArchError),
    #[error("{var}={value:?} is not valid: {expected}")]
    Invalid {
        var: String,
        value: String,
        expected: String,
    },
    #[error("{var} is set but {missing} is not: set both, or neither")]
    Incomplete { var: String, missing: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsMode {
    Container { image: String },
    Process { binary: PathBuf },
}

#[derive(Debug, Clone)]
pub struct HarnessConfig {
    pub data_dir: PathBuf,
    pub libvirt_uri: String,
    pub network: String,
    pub accel: AccelChoice,
    pub budget_scale: f64,
    pub keep: bool,
    pub nats: NatsMode,
    pub podman: PathBuf,
    /// ARCH: restricts the trials to one architecture and opts in to running them.
    pub arch_filter: Option<VmArchitecture>,
    /// `DEVICELAB_*_<ARCH>` settings, per architecture.
    pub overrides: BTreeMap<VmArchitecture, ArchOverrides>,
    /// DEVICELAB_UEFI_CODE + DEVICELAB_UEFI_VARS: the aarch64 firmware, where it is not in
    /// the usual places.
    pub uefi: Option<crate::model::arch::FirmwarePair>,
    /// DEVICELAB_START: how a spec that does not choose starts its VM.
    pub start: crate::model::spec::Start,
    /// DEVICELAB_VM_SLOTS: VMs at once on a host (one of DEVICELAB_HOSTS may set its own);
    /// `None` derives it (see `slots`).
    pub vm_slots: Option<usize>,
    /// DEVICELAB_HOSTS: every host a fleet spreads across (empty: `libvirt_uri` only).
    pub hosts: Vec<HostEntry>,
}

/// One of the hosts DEVICELAB_HOSTS lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEntry {
    /// Its libvirt URI.
    pub uri: String,
    /// Its VM slots (`#slots=N`); `None` derives them from the host.
    pub slots: Option<usize>,
}

/// The host a libvirt URI names (`host`, or `host:port`); `None` for this machine's
/// (`qemu:///system`).
pub fn uri_host(uri: &str) -> Option<String> {
    let uri = url::Url::parse(uri).ok()?;
    let host = uri.host_str().filter(|h| !h.is_empty())?;
    Some(match uri.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    })
}

/// The accepted VM slot counts.
const SLOTS_RANGE: std::ops::RangeInclusive<usize> = 1..=256;

/// A slot count from `value`, if it is one of [`SLOTS_RANGE`].
fn slot_count(value: &str) -> Option<usize> {
    value.parse().ok().filter(|n| SLOTS_RANGE.contains(n))
}

/// DEVICELAB_HOSTS: blank-separated libvirt URIs, each with an optional `#slots=N`.
fn host_entries(value: &str) -> Result<Vec<HostEntry>, ConfigError> {
    let mut entries: Vec<HostEntry> = Vec::new();
    for word in value.split_whitespace() {
        let (uri, slots) = match word.split_once('#') {
            None => (word, None),
            Some((uri, fragment)) => match fragment.strip_prefix("slots=").and_then(slot_count) {
                Some(n) => (uri, Some(n)),
                None => {
                    return Err(ConfigError::Invalid {
                        var: "DEVICELAB_HOSTS".into(),
                        value: word.into(),
                        expected: "a libvirt URI, optionally followed by `#slots=N` with N from 1 \
                                   to 256, e.g. `qemu+ssh://lab@kvm1/system#slots=4`"
                            .into(),
                    });
                }
            },
        };
        if !uri.contains(':') || entries.iter().any(|e| e.uri == uri) {
            return Err(ConfigError::Invalid {
                var: "DEVICELAB_HOSTS".into(),
                value: word.into(),
                expected: "libvirt URIs (`qemu:///system`, `qemu+ssh://user@host/system`), \
                           each host once"
                    .into(),
            });
        }
        entries.push(HostEntry {
            uri: uri.to_owned(),
            slots,
        });
    }
    Ok(entries)
}

/// The smallest DEVICELAB_BUDGET_SCALE: below a tenth, waits end before a guest could answer
/// and every failure reads as a timeout.
pub const MIN_BUDGET_SCALE: f64 = 0.1;
/// The largest DEVICELAB_BUDGET_SCALE.
pub const MAX_BUDGET_SCALE: f64 = 100.0;

pub const DEFAULT_NATS_IMAGE: &str = "docker.io/library/nats:2.10";

impl HarnessConfig {
    /// The host-side budgets, scaled by DEVICELAB_BUDGET_SCALE.
    pub fn host_budgets(&self) -> crate::model::arch::HostBudgets {
        crate::model::arch::HostBudgets::scaled(self.budget_scale)
    }

    pub fn from_env() -> Result<Self, ConfigError> {
        let env: BTreeMap<String, String> = std::env::vars()
            .filter(|(k, _)| k == "ARCH" || k.starts_with("DEVICELAB_"))
            .collect();
        // A typo is never silently ignored (warned once per process: fixtures read this often).
        static WARNED: std::sync::Once = std::sync::Once::new();
        let unknown: Vec<&String> = env.keys().filter(|k| !is_known(k)).collect();
        if !unknown.is_empty() {
            WARNED.call_once(|| {
                tracing::warn!(
                    "devicelab does not read {unknown:?} (a typo? the variables are listed in docs/configuration.md)"
                )
            });
        }
        Self::from_vars(env)
    }

    pub fn from_vars(env: BTreeMap<String, String>) -> Result<Self, ConfigError> {
        let get = |k: &str| {
            env.get(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let invalid = |var: &str, value: &str, expected: &str| ConfigError::Invalid {
            var: var.into(),
            value: value.into(),
            expected: expected.into(),
        };
        let arch_filter = get("ARCH")
            .map(|v| VmArchitecture::parse(&v, "ARCH"))
            .transpose()?;
        let accel = match get("DEVICELAB_ACCEL").as_deref() {
            None | Some("auto") => AccelChoice::Auto,
            Some("kvm") => AccelChoice::Force(Accelerator::Kvm),
            Some("tcg") | Some("qemu") => AccelChoice::Force(Accelerator::Tcg),
            Some(other) => return Err(invalid("DEVICELAB_ACCEL", other, "use auto, kvm or tcg")),
        };
        let budget_scale = match get("DEVICELAB_BUDGET_SCALE") {
            None => 1.0,
            Some(v) => match v.parse::<f64>() {
                Ok(f) if (MIN_BUDGET_SCALE..=MAX_BUDGET_SCALE).contains(&f) => f,
                _ => {
                    return Err(invalid(
                        "DEVICELAB_BUDGET_SCALE",
                        &v,
                        &format!(
                            "use a number from {MIN_BUDGET_SCALE} to {MAX_BUDGET_SCALE}, e.g. 2 \
                             or 0.5"
                        ),
                    ));
                }
            },
        };
        let keep = match get("DEVICELAB_KEEP").as_deref() {
            None | Some("0") | Some("false") | Some("no") => false,
            Some("1") | Some("true") | Some("yes") => true,
            Some(other) => return Err(invalid("DEVICELAB_KEEP", other, "use 1 or 0")),
        };
        let one_word = |var: &str, value: String, what: &str| {
            if value.contains(char::is_whitespace) {
                Err(invalid(
                    var,
                    &value,
                    &format!("use one {what}, without spaces"),
                ))
            } else {
                Ok(value)
            }
        };
        let nats = match get("DEVICELAB_NATS").as_deref() {
            None | Some("container") => NatsMode::Container {
                image: one_word(
                    "DEVICELAB_NATS_IMAGE",
                    get("DEVICELAB_NATS_IMAGE").unwrap_or_else(|| DEFAULT_NATS_IMAGE.into()),
                    "image reference",
                )?,
            },
            Some("process") => NatsMode::Process {
                binary: get("DEVICELAB_NATS_SERVER")
                    .map(PathBuf::from)
                    .unwrap_or_else(default_nats_server),
            },
            Some(other) => {
                return Err(invalid("DEVICELAB_NATS", other, "use container or process"));
            }
        };
        let data_dir = get("DEVICELAB_DATA_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(default_data_dir);
        if data_dir.is_relative() {
            return Err(invalid(
                "DEVICELAB_DATA_DIR",
                &data_dir.display().to_string(),
                "use an absolute path (libvirt resolves paths on its own side)",
            ));
        }
        let network = one_word(
            "DEVICELAB_NETWORK",
            get("DEVICELAB_NETWORK").unwrap_or_else(|| "default".into()),
            "libvirt network name",
        )?;
        let hosts = host_entries(&get("DEVICELAB_HOSTS").unwrap_or_default())?;
        let libvirt_uri = match (get("DEVICELAB_LIBVIRT_URI"), hosts.first()) {
            (Some(uri), Some(_)) => {
                return Err(invalid(
                    "DEVICELAB_LIBVIRT_URI",
                    &uri,
                    "unset it: DEVICELAB_HOSTS is set, and its first host is where a single VM \
                     runs",
                ));
            }
            (None, Some(first)) => first.uri.clone(),
            (uri, None) => one_word(
                "DEVICELAB_LIBVIRT_URI",
                uri.unwrap_or_else(|| "qemu:///system".into()),
                "libvirt URI",
            )?,
        };
        let uefi = match (get("DEVICELAB_UEFI_CODE"), get("DEVICELAB_UEFI_VARS")) {
            (None, None) => None,
            (Some(code), Some(vars)) => Some(crate::model::arch::FirmwarePair {
                code: code.into(),
                vars: vars.into(),
            }),
            (Some(one), None) | (None, Some(one)) => {
                return Err(invalid(
                    "DEVICELAB_UEFI_CODE/DEVICELAB_UEFI_VARS",
                    &one,
                    "set both (the CODE file and the VARS template), or neither",
                ));
            }
        };
        let start = match get("DEVICELAB_START").as_deref() {
            None | Some("cold") => crate::model::spec::Start::Cold,
            Some("warm") => crate::model::spec::Start::Warm,
            Some(other) => return Err(invalid("DEVICELAB_START", other, "use cold or warm")),
        };
        let vm_slots = match get("DEVICELAB_VM_SLOTS") {
            None => None,
            Some(v) => match slot_count(&v) {
                Some(n) => Some(n),
                None => {
                    return Err(invalid(
                        "DEVICELAB_VM_SLOTS",
                        &v,
                        "use a whole number from 1 to 256, or unset it to derive it from the host",
                    ));
                }
            },
        };
        Ok(Self {
            start,
            vm_slots,
            hosts,
            data_dir,
            libvirt_uri,
            network,
            accel,
            budget_scale,
            keep,
            nats,
            podman: get("DEVICELAB_PODMAN")
                .unwrap_or_else(|| "podman".into())
                .into(),
            arch_filter,
            overrides: VmArchitecture::ALL
                .iter()
                .map(|&arch| Ok((arch, arch_overrides(&get, arch)?)))
                .collect::<Result<_, ConfigError>>()?,
            uefi,
        })
    }

    /// The VM slots set for the host `libvirt_uri` names: its `#slots=N` in DEVICELAB_HOSTS,
    /// else DEVICELAB_VM_SLOTS; `None` derives them from the host.
    pub fn slots_set(&self) -> Option<usize> {
        self.hosts
            .iter()
            .find(|h| h.uri == self.libvirt_uri)
            .and_then(|h| h.slots)
            .or(self.vm_slots)
    }

    /// One configuration per host of DEVICELAB_HOSTS (the first is this one's), each naming
    /// its host in `libvirt_uri`; this one alone without DEVICELAB_HOSTS.
    pub fn host_configs(&self) -> Vec<HarnessConfig> {
        if self.hosts.is_empty() {
            return vec![self.clone()];
        }
        self.hosts
            .iter()
            .map(|h| HarnessConfig {
                libvirt_uri: h.uri.clone(),
                ..self.clone()
            })
            .collect()
    }

    /// The DEVICELAB_*_<ARCH> settings for `arch`.
    pub fn overrides(&self, arch: VmArchitecture) -> ArchOverrides {
        self.overrides.get(&arch).cloned().unwrap_or_default()
    }

    pub fn image_cache_dir(&self) -> PathBuf {
        self.data_dir.join("images")
    }
    pub fn keys_dir(&self) -> PathBuf {
        self.data_dir.join("keys")
    }
    pub fn pool_dir(&self) -> PathBuf {
        self.data_dir.join("pool")
    }
    pub fn runs_dir(&self) -> PathBuf {
        self.data_dir.join("runs")
    }
    /// Saved VMs for warm starts (a cache: `devicelab clean --warm` empties it): this
    /// machine's in `warm`, another host's records in `warm/<host>[-<port>]` (its saved VMs'
    /// memory and disks are volumes of that host's pool).
    pub fn warm_dir(&self) -> PathBuf {
        self.per_host(self.local_warm_dir())
    }
    /// This machine's saved VMs (whatever host the configuration names).
    pub fn local_warm_dir(&self) -> PathBuf {
        self.data_dir.join("warm")
    }
    /// The cross-process VM slots' lock files: this machine's in `slots`, another host's in
    /// `slots/<host>[-<port>]` (each host counts its own).
    pub fn slots_dir(&self) -> PathBuf {
        self.per_host(self.data_dir.join("slots"))
    }
    /// `dir` for this machine; `dir/<host>[-<port>]` for another host.
    fn per_host(&self, dir: PathBuf) -> PathBuf {
        match uri_host(&self.libvirt_uri) {
            Some(host) => dir.join(
                host.chars()
                    .map(|c| match c {
                        c if c.is_ascii_alphanumeric() || c == '.' || c == '-' => c,
                        ':' => '-',
                        _ => '_',
                    })
                    .collect::<String>(),
            ),
            None => dir,
        }
    }
}

/// Reads and checks `arch`'s `DEVICELAB_*_<ARCH>` variables.
fn arch_overrides(
    get: &impl Fn(&str) -> Option<String>,
    arch: VmArchitecture,
) -> Result<ArchOverrides, ConfigError> {
    let named = |prefix: &str| {
        let var = format!("{prefix}_{}", arch.env_token());
        get(&var).map(|value| (var, value))
    };
    let image = match named("DEVICELAB_IMAGE") {
        Some((var, path)) if PathBuf::from(&path).is_relative() => {
            return Err(ConfigError::Invalid {
                var,
                value: path,
                expected: "use an absolute path".into(),
            });
        }
        other => other.map(|(var, path)| (var, PathBuf::from(path))),
    };
    let image_url = match (
        named("DEVICELAB_IMAGE_URL"),
        named("DEVICELAB_IMAGE_SHA256"),
    ) {
        (None, None) => None,
        (Some((var, _)), None) => {
            return Err(ConfigError::Incomplete {
                var,
                missing: format!("DEVICELAB_IMAGE_SHA256_{}", arch.env_token()),
            });
        }
        (None, Some((var, _))) => {
            return Err(ConfigError::Incomplete {
                var,
                missing: format!("DEVICELAB_IMAGE_URL_{}", arch.env_token()),
            });
        }
        (Some(_), Some((var, sha256)))
            if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            return Err(ConfigError::Invalid {
                var,
                value: sha256,
                expected: "use the image's SHA-256: 64 hex digits (sha256sum prints it)".into(),
            });
        }
        (Some((_, url)), Some((_, sha256))) => Some((url, sha256)),
    };
    Ok(ArchOverrides {
        image,
        image_url,
        agent_bin: named("DEVICELAB_AGENT_BIN").map(|(var, p)| (var, PathBuf::from(p))),
        agent_target: named("DEVICELAB_AGENT_TARGET").map(|(_, t)| t),
    })
}

/// nats-server from PATH, else Debian's /usr/sbin (not on every user's PATH).
fn default_nats_server() -> PathBuf {
    crate::support::which::which("nats-server")
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/nats-server"))
}

fn default_data_dir() -> PathBuf {
    // Not under $HOME: libvirt's qemu user must be able to traverse to the disk images, and
    // home directories are usually 0700/0750.
    let uid = rustix::process::geteuid().as_raw();
    if uid == 0 {
        PathBuf::from("/var/lib/devicelab")
    } else {
        PathBuf::from(format!("/var/tmp/devicelab-{uid}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults() {
        let c = HarnessConfig::from_vars(BTreeMap::new()).unwrap();
        assert_eq!(c.libvirt_uri, "qemu:///system");
        assert_eq!(c.network, "default");
        assert_eq!(c.accel, AccelChoice::Auto);
        assert!(!c.keep);
        assert_eq!(c.arch_filter, None);
        assert_eq!(c.start, crate::model::spec::Start::Cold);
        assert_eq!(c.vm_slots, None);
        let c = HarnessConfig::from_vars(vars(&[
            ("DEVICELAB_START", "warm"),
            ("DEVICELAB_VM_SLOTS", "3"),
        ]))
        .unwrap();
        assert_eq!(c.start, crate::model::spec::Start::Warm);
        assert_eq!(c.vm_slots, Some(3));
        assert_eq!(
            c.nats,
            NatsMode::Container {
                image: DEFAULT_NATS_IMAGE.into()
            }
        );
    }

    #[test]
    fn malformed_values_name_the_variable_and_the_fix() {
        assert!(
            variables_table().contains(&format!(
                "from `{MIN_BUDGET_SCALE}` to `{MAX_BUDGET_SCALE}`"
            )),
            "the table gives the budget scale's bounds"
        );
        for (var, value, hint) in [
            ("DEVICELAB_ACCEL", "hvf", "auto, kvm or tcg"),
            ("DEVICELAB_BUDGET_SCALE", "fast", "number"),
            ("DEVICELAB_BUDGET_SCALE", "-1", "from 0.1"),
            ("DEVICELAB_BUDGET_SCALE", "0.001", "from 0.1"),
            ("DEVICELAB_BUDGET_SCALE", "NaN", "from 0.1"),
            ("DEVICELAB_NETWORK", "my net", "without spaces"),
            ("DEVICELAB_BUDGET_SCALE", "101", "to 100"),
            ("DEVICELAB_NATS_IMAGE", "nats 2.10", "without spaces"),
            (
                "DEVICELAB_LIBVIRT_URI",
                "qemu:///system extra",
                "without spaces",
            ),
            ("DEVICELAB_KEEP", "maybe", "1 or 0"),
            ("DEVICELAB_NATS", "docker", "container or process"),
            ("DEVICELAB_DATA_DIR", "relative/dir", "absolute"),
            ("DEVICELAB_START", "hot", "cold or warm"),
            ("DEVICELAB_VM_SLOTS", "0", "from 1 to 256"),
            (
                "DEVICELAB_HOSTS",
                "qemu:///system#slots=0",
                "`#slots=N` with N from 1",
            ),
            ("DEVICELAB_HOSTS", "qemu:///system#cores=2", "`#slots=N`"),
            ("DEVICELAB_HOSTS", "kvm1", "libvirt URIs"),
            ("ARCH", "mips", "x86_64, aarch64"),
        ] {
            let err = HarnessConfig::from_vars(vars(&[(var, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(value) && err.contains(hint), "{var}: {err}");
        }
    }

    #[test]
    fn hosts_name_each_host_once_with_its_slots_and_the_first_runs_single_vms() {
        let c = HarnessConfig::from_vars(vars(&[
            (
                "DEVICELAB_HOSTS",
                " qemu:///system\tqemu+ssh://lab@kvm1:2222/system?keyfile=/k#slots=4 ",
            ),
            ("DEVICELAB_VM_SLOTS", "2"),
        ]))
        .unwrap();
        assert_eq!(c.libvirt_uri, "qemu:///system");
        let hosts = c.host_configs();
        assert_eq!(hosts.len(), 2);
        assert_eq!(
            hosts[1].libvirt_uri,
            "qemu+ssh://lab@kvm1:2222/system?keyfile=/k"
        );
        // Each host's own `#slots`, else DEVICELAB_VM_SLOTS.
        assert_eq!(
            (hosts[0].slots_set(), hosts[1].slots_set()),
            (Some(2), Some(4))
        );
        // Each host counts its slots in its own directory.
        assert_eq!(hosts[0].slots_dir(), c.data_dir.join("slots"));
        assert_eq!(
            hosts[1].slots_dir(),
            c.data_dir.join("slots").join("kvm1-2222")
        );
        // and keeps the records of its saved VMs in its own directory.
        assert_eq!(hosts[0].warm_dir(), c.data_dir.join("warm"));
        assert_eq!(
            hosts[1].warm_dir(),
            c.data_dir.join("warm").join("kvm1-2222")
        );
        let err = HarnessConfig::from_vars(vars(&[
            ("DEVICELAB_HOSTS", "qemu:///system"),
            ("DEVICELAB_LIBVIRT_URI", "qemu:///session"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("unset it") && err.contains("DEVICELAB_HOSTS"),
            "{err}"
        );
        let err = HarnessConfig::from_vars(vars(&[(
            "DEVICELAB_HOSTS",
            "qemu:///system qemu+ssh://kvm1/system qemu:///system",
        )]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("each host once"), "{err}");
        let one = HarnessConfig::from_vars(BTreeMap::new()).unwrap();
        assert_eq!(one.host_configs().len(), 1);
    }

    #[test]
    fn per_arch_variables_are_parsed_when_read() {
        let c =
            HarnessConfig::from_vars(vars(&[("DEVICELAB_IMAGE_AARCH64", "/img/a.qcow2")])).unwrap();
        assert_eq!(
            c.overrides(VmArchitecture::Aarch64).image,
            Some(("DEVICELAB_IMAGE_AARCH64".into(), "/img/a.qcow2".into()))
        );
        assert_eq!(c.overrides(VmArchitecture::X86_64).image, None);
        // Checked at read time, not when an image is first needed.
        for (pairs, hint) in [
            (&[("DEVICELAB_IMAGE_X86_64", "rel.qcow2")][..], "absolute"),
            (
                &[("DEVICELAB_IMAGE_URL_AARCH64", "http://x/i.img")][..],
                "DEVICELAB_IMAGE_SHA256_AARCH64",
            ),
            (
                &[
                    ("DEVICELAB_IMAGE_URL_X86_64", "http://x/i.img"),
                    ("DEVICELAB_IMAGE_SHA256_X86_64", "abc"),
                ][..],
                "64 hex digits",
            ),
        ] {
            let err = HarnessConfig::from_vars(vars(pairs))
                .unwrap_err()
                .to_string();
            assert!(err.contains(hint), "{pairs:?}: {err}");
        }
    }

    #[test]
    fn known_variables_include_the_per_arch_forms() {
        assert!(is_known("DEVICELAB_IMAGE_X86_64"));
        assert!(is_known("DEVICELAB_AGENT_BIN_AARCH64"));
        assert!(is_known("DEVICELAB_PODMAN"));
        assert!(!is_known("DEVICELAB_IMAGE_RISCV64"));
        assert!(!is_known("DEVICELAB_KEPP"));
    }

    /// docs/configuration.md's table is `variables_table()`, row for row: a variable added
    /// here and not documented there (or the reverse) fails this test.
    #[test]
    fn the_readme_table_is_rendered_from_variables() {
        let readme = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/docs/configuration.md"
        ))
        .expect("docs/configuration.md");
        let start = readme
            .find("<!-- variables:start -->\n")
            .expect("docs/configuration.md's variables:start marker")
            + "<!-- variables:start -->\n".len();
        let end = readme
            .find("<!-- variables:end -->")
            .expect("docs/configuration.md's variables:end marker");
        assert_eq!(
            &readme[start..end],
            variables_table(),
            "paste this table between the variables markers of docs/configuration.md"
        );
    }
}
