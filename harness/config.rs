//! The harness's configuration: every setting comes from an environment variable, read once
//! and validated here so a typo fails with the variable's name and the accepted values.

use crate::accel::{AccelChoice, Accelerator};
use crate::arch::{ArchError, VmArchitecture};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Every variable the harness reads (the README's configuration table mirrors this list).
pub const VARIABLES: &[(&str, &str)] = &[
    (
        "ARCH",
        "run only this architecture's VM trials (x86_64|aarch64); setting it opts in to booting VMs",
    ),
    (
        "DEVICELAB_DATA_DIR",
        "cache, keys, storage pool (default /var/lib/devicelab as root, else /var/tmp/devicelab-$UID)",
    ),
    (
        "DEVICELAB_LIBVIRT_URI",
        "libvirt connection (default qemu:///system)",
    ),
    (
        "DEVICELAB_NETWORK",
        "libvirt network the VMs join (default: default)",
    ),
    (
        "DEVICELAB_ACCEL",
        "auto|kvm|tcg (default auto: KVM where it really works)",
    ),
    (
        "DEVICELAB_BUDGET_SCALE",
        "multiplies every readiness budget, e.g. 2 on a slow host (default 1)",
    ),
    (
        "DEVICELAB_KEEP",
        "1 = leave VMs and NATS running after a trial and print how to get in",
    ),
    (
        "DEVICELAB_IMAGE_<ARCH>",
        "local cloud image to boot instead of the pinned Ubuntu download",
    ),
    (
        "DEVICELAB_IMAGE_URL_<ARCH>",
        "image URL to download instead of the pin (needs DEVICELAB_IMAGE_SHA256_<ARCH>)",
    ),
    (
        "DEVICELAB_IMAGE_SHA256_<ARCH>",
        "sha256 of DEVICELAB_IMAGE_URL_<ARCH>",
    ),
    (
        "DEVICELAB_AGENT_BIN_<ARCH>",
        "prebuilt agent binary for that architecture (default: build fixtures/agent)",
    ),
    (
        "DEVICELAB_AGENT_TARGET_<ARCH>",
        "Rust target triple for building the agent (default <arch>-unknown-linux-gnu)",
    ),
    (
        "DEVICELAB_NATS",
        "container|process: NATS in a podman container (default) or a local nats-server process",
    ),
    (
        "DEVICELAB_NATS_IMAGE",
        "NATS container image (default docker.io/library/nats:2.10)",
    ),
    (
        "DEVICELAB_NATS_SERVER",
        "nats-server binary for DEVICELAB_NATS=process (default nats-server from PATH)",
    ),
];

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
    env: BTreeMap<String, String>,
}

pub const DEFAULT_NATS_IMAGE: &str = "docker.io/library/nats:2.10";

impl HarnessConfig {
    /// The host-side budgets, scaled by DEVICELAB_BUDGET_SCALE.
    pub fn host_budgets(&self) -> crate::arch::HostBudgets {
        crate::arch::HostBudgets::scaled(self.budget_scale)
    }

    pub fn from_env() -> Result<Self, ConfigError> {
        let env = std::env::vars()
            .filter(|(k, _)| k == "ARCH" || k.starts_with("DEVICELAB_"))
            .collect();
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
                Ok(f) if f.is_finite() && f > 0.0 && f <= 100.0 => f,
                _ => {
                    return Err(invalid(
                        "DEVICELAB_BUDGET_SCALE",
                        &v,
                        "use a number greater than 0 and at most 100, e.g. 2 or 0.5",
                    ));
                }
            },
        };
        let keep = match get("DEVICELAB_KEEP").as_deref() {
            None | Some("0") | Some("false") | Some("no") => false,
            Some("1") | Some("true") | Some("yes") => true,
            Some(other) => return Err(invalid("DEVICELAB_KEEP", other, "use 1 or 0")),
        };
        let nats = match get("DEVICELAB_NATS").as_deref() {
            None | Some("container") => NatsMode::Container {
                image: get("DEVICELAB_NATS_IMAGE").unwrap_or_else(|| DEFAULT_NATS_IMAGE.into()),
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
        let network = get("DEVICELAB_NETWORK").unwrap_or_else(|| "default".into());
        Ok(Self {
            data_dir,
            libvirt_uri: get("DEVICELAB_LIBVIRT_URI").unwrap_or_else(|| "qemu:///system".into()),
            network,
            accel,
            budget_scale,
            keep,
            nats,
            podman: get("DEVICELAB_PODMAN")
                .unwrap_or_else(|| "podman".into())
                .into(),
            arch_filter,
            env,
        })
    }

    /// A per-architecture variable, e.g. `per_arch("DEVICELAB_IMAGE", X86_64)` reads
    /// DEVICELAB_IMAGE_X86_64.
    pub fn per_arch(&self, prefix: &str, arch: VmArchitecture) -> Option<(String, String)> {
        let var = format!("{prefix}_{}", arch.env_token());
        let value = self.env.get(&var)?.trim().to_owned();
        (!value.is_empty()).then_some((var, value))
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
}

/// nats-server from PATH, else Debian's /usr/sbin (not on every user's PATH).
fn default_nats_server() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("nats-server"))
                .find(|p| p.is_file())
        })
        .unwrap_or_default();
    on_path.unwrap_or_else(|| PathBuf::from("/usr/sbin/nats-server"))
}

fn default_data_dir() -> PathBuf {
    // Not under $HOME: libvirt's qemu user must be able to traverse to the disk images, and
    // home directories are usually 0700/0750.
    let uid = unsafe { libc::geteuid() };
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
        assert_eq!(
            c.nats,
            NatsMode::Container {
                image: DEFAULT_NATS_IMAGE.into()
            }
        );
    }

    #[test]
    fn malformed_values_name_the_variable_and_the_fix() {
        for (var, value, hint) in [
            ("DEVICELAB_ACCEL", "hvf", "auto, kvm or tcg"),
            ("DEVICELAB_BUDGET_SCALE", "fast", "number"),
            ("DEVICELAB_BUDGET_SCALE", "-1", "greater than 0"),
            ("DEVICELAB_KEEP", "maybe", "1 or 0"),
            ("DEVICELAB_NATS", "docker", "container or process"),
            ("DEVICELAB_DATA_DIR", "relative/dir", "absolute"),
            ("ARCH", "mips", "x86_64, aarch64"),
        ] {
            let err = HarnessConfig::from_vars(vars(&[(var, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(value) && err.contains(hint), "{var}: {err}");
        }
    }

    #[test]
    fn per_arch_variables() {
        let c =
            HarnessConfig::from_vars(vars(&[("DEVICELAB_IMAGE_AARCH64", "/img/a.qcow2")])).unwrap();
        assert_eq!(
            c.per_arch("DEVICELAB_IMAGE", VmArchitecture::Aarch64),
            Some(("DEVICELAB_IMAGE_AARCH64".into(), "/img/a.qcow2".into()))
        );
        assert_eq!(c.per_arch("DEVICELAB_IMAGE", VmArchitecture::X86_64), None);
    }
}
