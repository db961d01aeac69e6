//! The agent binary to ship to a VM: a prebuilt one per architecture, or the reference agent
//! built for the VM's target. Either way its ELF machine is checked before it is shipped, so a
//! wrong-arch binary fails here instead of as "Exec format error" in the guest's journal.

use crate::arch::VmArchitecture;
use crate::config::HarnessConfig;
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

/// The workspace that holds the reference agent (fixtures/agent).
fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

impl AgentBinary {
    /// DEVICELAB_AGENT_BIN_<ARCH> if set, else the reference agent built for `arch`.
    pub async fn for_arch(
        config: &HarnessConfig,
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
        let path = tokio::task::spawn_blocking(move || build_reference_agent(arch, &target))
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

/// `cargo build --release` of fixtures/agent for `target`, into its own target dir (so it
/// never waits on the lock of the build that is running the tests). Offline: the crates are
/// already fetched by the build of the tests, and the sandbox namespace has no route out.
fn build_reference_agent(arch: VmArchitecture, target: &str) -> Result<PathBuf, AgentBinaryError> {
    let root = workspace_root();
    let target_dir = root.join("target").join("devicelab-agent");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--release",
        "--offline",
        "--package",
        "devicelab-agent",
        "--target",
        target,
    ])
    .arg("--manifest-path")
    .arg(root.join("Cargo.toml"))
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
    tracing::info!("building the reference agent for {target}");
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
    Ok(target_dir
        .join(target)
        .join("release")
        .join("devicelab-agent"))
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
