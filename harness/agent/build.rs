//! The agent binary to ship to a VM: a prebuilt one per architecture, or the reference agent
//! built for the VM's target. Either way its ELF machine is checked before it is shipped, so a
//! wrong-arch binary fails here instead of as "Exec format error" in the guest's journal.

use crate::agent::description::Source;
use crate::config::HarnessConfig;
use crate::model::arch::VmArchitecture;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum AgentBinaryError {
    #[error("the agent build task failed: {0}")]
    Task(String),
    #[error("cannot read the agent binary {path} (from {origin}): {source}")]
    Unreadable {
        path: PathBuf,
        origin: String,
        source: std::io::Error,
    },
    #[error("the agent binary {path} (from {origin}) is not an ELF executable")]
    NotElf { path: PathBuf, origin: String },
    #[error(
        "the agent binary {path} (from {origin}) is for {found}, but the VM is {expected}: \
         build it with --target {target} or point {var} at a {expected} binary"
    )]
    WrongArch {
        path: PathBuf,
        origin: String,
        found: String,
        expected: VmArchitecture,
        target: &'static str,
        var: String,
    },
    #[error("cannot run cargo to build the agent: {0}")]
    CargoMissing(std::io::Error),
    #[error(
        "building the agent for {target} failed:\n{stderr}\n  for aarch64: rustup target add {target} and install \
         {linker} (fixtures/host/setup.sh --cross), or set DEVICELAB_AGENT_BIN_{token} to a prebuilt binary"
    )]
    Build {
        target: String,
        linker: &'static str,
        token: &'static str,
        stderr: String,
    },
}

#[derive(Debug, Clone)]
pub struct AgentBinary {
    pub path: PathBuf,
    pub arch: VmArchitecture,
}

/// The reference agent's package and binary name (fixtures/agent).
pub const REFERENCE_PACKAGE: &str = "devicelab-agent";

fn reference_manifest() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/agent/Cargo.toml")
}

/// The binary `bin` of the reference agent's package, as a cargo source.
pub fn reference_source(bin: &str) -> Source {
    Source::Cargo {
        manifest: reference_manifest(),
        package: REFERENCE_PACKAGE.into(),
        bin: bin.into(),
    }
}

impl AgentBinary {
    /// The reference agent for `arch` (see [`AgentBinary::cargo`]).
    pub async fn for_arch(
        config: &HarnessConfig,
        arch: VmArchitecture,
    ) -> Result<Self, AgentBinaryError> {
        let manifest = reference_manifest();
        Self::cargo(
            config,
            &manifest,
            REFERENCE_PACKAGE,
            REFERENCE_PACKAGE,
            arch,
        )
        .await
    }

    /// DEVICELAB_AGENT_BIN_<ARCH> if set (the agent under test, prebuilt), else `bin` of
    /// `package` built for `arch`'s target (DEVICELAB_AGENT_TARGET_<ARCH> picks another), its
    /// ELF machine checked either way.
    pub async fn cargo(
        config: &HarnessConfig,
        manifest: &Path,
        package: &str,
        bin: &str,
        arch: VmArchitecture,
    ) -> Result<Self, AgentBinaryError> {
        let overrides = config.overrides(arch);
        if let Some((var, path)) = overrides.agent_bin {
            check_elf(&path, arch, &var)?;
            return Ok(Self { path, arch });
        }
        let target = overrides
            .agent_target
            .unwrap_or_else(|| arch.rust_target().to_owned());
        let (manifest, package, bin) = (manifest.to_owned(), package.to_owned(), bin.to_owned());
        let path = tokio::task::spawn_blocking(move || {
            build_cargo(&manifest, &package, &bin, arch, &target)
        })
        .await
        .map_err(|e| AgentBinaryError::Task(e.to_string()))??;
        check_elf(
            &path,
            arch,
            &format!("DEVICELAB_AGENT_BIN_{}", arch.env_token()),
        )?;
        Ok(Self { path, arch })
    }
}

/// Where agents are built: `devicelab-agent/` in the running test's own target dir (the
/// user's workspace, never devicelab's source tree when devicelab is a dependency), in a
/// directory of its own so the build never waits on the lock of the build running the tests.
fn agent_target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir).join("devicelab-agent");
    }
    // <target>/<profile>/deps/<test binary>
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(Path::to_owned))
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("devicelab-agent")
}

/// `cargo build --release --bin <bin>` of `package` for `target`. Offline: the crates are
/// already fetched by the build of the tests (run `cargo fetch` first for a package the tests
/// do not depend on): a test host need not have a route to crates.io.
fn build_cargo(
    manifest: &Path,
    package: &str,
    bin: &str,
    arch: VmArchitecture,
    target: &str,
) -> Result<PathBuf, AgentBinaryError> {
    let target_dir = agent_target_dir();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "--offline", "--package", package])
        .args(["--bin", bin, "--target", target])
        .arg("--manifest-path")
        .arg(manifest)
        .arg("--target-dir")
        .arg(&target_dir);
    if VmArchitecture::host() != Some(arch) {
        let var = format!(
            "CARGO_TARGET_{}_LINKER",
            target.to_uppercase().replace('-', "_")
        );
        if std::env::var_os(&var).is_none() {
            cmd.env(var, arch.cross_linker());
        }
    }
    tracing::info!("building {package} ({bin}) for {target}");
    let output = cmd.output().map_err(AgentBinaryError::CargoMissing)?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(25).collect();
        return Err(AgentBinaryError::Build {
            target: target.to_owned(),
            linker: arch.cross_linker(),
            token: arch.env_token(),
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    Ok(target_dir.join(target).join("release").join(bin))
}

/// Checks the ELF header's machine field against `arch`.
pub fn check_elf(path: &Path, arch: VmArchitecture, var: &str) -> Result<(), AgentBinaryError> {
    let origin = var.to_owned();
    let bytes = std::fs::read(path).map_err(|source| AgentBinaryError::Unreadable {
        path: path.to_owned(),
        origin: origin.clone(),
        source,
    })?;
    if bytes.len() < 20 || &bytes[..4] != b"\x7fELF" {
        return Err(AgentBinaryError::NotElf {
            path: path.to_owned(),
            origin,
        });
    }
    let machine = u16::from_le_bytes([bytes[18], bytes[19]]);
    if machine != arch.elf_machine() {
        let found = VmArchitecture::ALL
            .into_iter()
            .find(|a| a.elf_machine() == machine)
            .map(|a| a.name().to_owned())
            .unwrap_or_else(|| format!("ELF machine {machine}"));
        return Err(AgentBinaryError::WrongArch {
            path: path.to_owned(),
            origin,
            found,
            expected: arch,
            target: arch.rust_target(),
            var: var.to_owned(),
        });
    }
    Ok(())
}
