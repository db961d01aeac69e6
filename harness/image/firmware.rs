//! aarch64 UEFI firmware: finding a CODE+VARS pflash pair across distros, and naming the pool
//! volume that holds CODE padded to the 64 MiB QEMU's `virt` machine requires (the pool pads
//! it as it uploads it; each VM's VARS is a volume uploaded from the template).

use std::path::{Path, PathBuf};

/// QEMU `virt` refuses pflash CODE of any other size ("device requires 67108864 bytes").
pub const PFLASH_SIZE: u64 = 64 * 1024 * 1024;

/// Known CODE+VARS pairs, in probe order.
pub const CANDIDATES: &[(&str, &str)] = &[
    // Arch (edk2-aarch64)
    (
        "/usr/share/edk2/aarch64/QEMU_EFI.fd",
        "/usr/share/edk2/aarch64/QEMU_VARS.fd",
    ),
    // Arch, older edk2-armvirt
    (
        "/usr/share/edk2-armvirt/aarch64/QEMU_EFI.fd",
        "/usr/share/edk2-armvirt/aarch64/QEMU_VARS.fd",
    ),
    // older raw-pflash naming
    (
        "/usr/share/edk2-armvirt/aarch64/QEMU_CODE.fd",
        "/usr/share/edk2-armvirt/aarch64/QEMU_VARS.fd",
    ),
    // Debian / Ubuntu (qemu-efi-aarch64)
    (
        "/usr/share/AAVMF/AAVMF_CODE.fd",
        "/usr/share/AAVMF/AAVMF_VARS.fd",
    ),
    // Fedora (edk2-aarch64)
    (
        "/usr/share/edk2/aarch64/QEMU_EFI-pflash.raw",
        "/usr/share/edk2/aarch64/vars-template-pflash.raw",
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error(
        "no aarch64 UEFI firmware found; probed:\n{}\n  install it: pacman -S edk2-aarch64 | apt install qemu-efi-aarch64 | dnf install edk2-aarch64",
        probed.iter().map(|p| format!("    {}", p.display())).collect::<Vec<_>>().join("\n")
    )]
    NotFound { probed: Vec<PathBuf> },
    #[error(
        "DEVICELAB_UEFI_CODE/DEVICELAB_UEFI_VARS name {path}, which is not a file: point them at the \
         firmware pair, or unset both to use the one installed in the usual places"
    )]
    ConfiguredMissing { path: PathBuf },
    #[error(
        "UEFI CODE {path} is {size} bytes, larger than the {PFLASH_SIZE} bytes of a `virt` pflash device: use a build made for QEMU's virt machine"
    )]
    TooLarge { path: PathBuf, size: u64 },
    #[error("firmware file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub use crate::model::arch::FirmwarePair;

/// The pair to boot: `configured` (DEVICELAB_UEFI_CODE/VARS) if given, both files there; else
/// the first pair found in the usual places.
pub fn discover(configured: Option<&FirmwarePair>) -> Result<FirmwarePair, FirmwareError> {
    match configured {
        Some(pair) => match [&pair.code, &pair.vars].into_iter().find(|p| !p.is_file()) {
            Some(missing) => Err(FirmwareError::ConfiguredMissing {
                path: missing.clone(),
            }),
            None => Ok(pair.clone()),
        },
        None => discover_in(Path::new("/"), CANDIDATES),
    }
}

/// Probes `candidates` under `root`; the first pair whose two files both exist wins.
pub fn discover_in(
    root: &Path,
    candidates: &[(&str, &str)],
) -> Result<FirmwarePair, FirmwareError> {
    let mut probed = Vec::new();
    for (code, vars) in candidates {
        let code = root.join(code.trim_start_matches('/'));
        let vars = root.join(vars.trim_start_matches('/'));
        if code.is_file() && vars.is_file() {
            return Ok(FirmwarePair { code, vars });
        }
        probed.push(code);
        probed.push(vars);
    }
    Err(FirmwareError::NotFound { probed })
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FirmwareError + '_ {
    move |source| FirmwareError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The end of the name of CODE's volume: CODE padded to [`PFLASH_SIZE`] (kept in the pool).
pub const PADDED_SUFFIX: &str = "-pflash64M.fd";

/// The name of the pool volume that holds `fw`'s CODE padded to 64 MiB, and the digest of the
/// bytes it names: a distro's firmware update is a new volume, and the same firmware is one
/// volume per host. CODE larger than a `virt` pflash device is refused.
pub fn code_volume(fw: &FirmwarePair) -> Result<(String, String), FirmwareError> {
    let source = &fw.code;
    let bytes = std::fs::read(source).map_err(io_err(source))?;
    if bytes.len() as u64 > PFLASH_SIZE {
        return Err(FirmwareError::TooLarge {
            path: source.clone(),
            size: bytes.len() as u64,
        });
    }
    let stem = source.file_stem().unwrap_or_default().to_string_lossy();
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
    Ok((format!("{stem}-{}{PADDED_SUFFIX}", &digest[..12]), digest))
}
