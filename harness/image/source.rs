//! The cloud image a VM boots from ("the image"): the pinned Ubuntu release per architecture,
//! or an override for air-gapped hosts (a local file, or a URL with its digest).

use crate::config::{ConfigError, HarnessConfig};
use crate::image::download::{self, Artifact, DownloadError};
use crate::model::arch::VmArchitecture;
use std::io::Read;
use std::path::{Path, PathBuf};

const UBUNTU_RELEASE: &str = "release-20251213";
const UBUNTU_MIRRORS: &[&str] = &[
    "https://cloud-images.ubuntu.com/releases/noble",
    // Dated releases move here once they age out of the main mirror.
    "https://cloud-images-archive.ubuntu.com/releases/noble",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    Download(Artifact),
    LocalFile { path: PathBuf, from_var: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Qcow2 => "qcow2",
            Self::Raw => "raw",
        }
    }
}

/// A base image ready to back VM overlays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseImage {
    pub path: PathBuf,
    pub format: DiskFormat,
    /// Downloaded into the cache (hashed again after a boot from it failed), not a local file.
    pub cached: bool,
    /// The SHA-256 of its bytes (lower-case hex): a libvirt host keeps one copy per digest.
    pub digest: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "{0}\n  offline, or no route to these mirrors? point DEVICELAB_IMAGE_<ARCH> at a local image \
         instead (fixtures/images/build-debian.sh builds one; docs/images.md: air-gapped hosts), or \
         DEVICELAB_IMAGE_URL_<ARCH> + DEVICELAB_IMAGE_SHA256_<ARCH> at a mirror you can reach"
    )]
    Download(#[from] DownloadError),
    #[error("cannot read the image {path} (from {from_var}): {source}")]
    Unreadable {
        path: PathBuf,
        from_var: String,
        source: std::io::Error,
    },
    #[error(
        "the image {path} (from {from_var}) is {reason}: point {from_var} at a qcow2 or raw disk image"
    )]
    NotAnImage {
        path: PathBuf,
        from_var: String,
        reason: String,
    },
}

/// The pinned Ubuntu 24.04 cloud image for `arch`.
pub fn ubuntu_pin(arch: VmArchitecture) -> Artifact {
    let (sha256, size) = match arch {
        VmArchitecture::X86_64 => (
            "2b5f90ffe8180def601c021c874e55d8303e8bcbfc66fee2b94414f43ac5eb1f",
            None,
        ),
        VmArchitecture::Aarch64 => (
            "a40713938d74aaec811f74cb1fa8bfcb535d22e26b2a0ca1cc90ad9db898feb9",
            Some(620_884_992),
        ),
    };
    let file_name = format!("ubuntu-24.04-server-cloudimg-{}.img", arch.debian_name());
    Artifact {
        urls: UBUNTU_MIRRORS
            .iter()
            .map(|m| format!("{m}/{UBUNTU_RELEASE}/{file_name}"))
            .collect(),
        file_name,
        sha256: sha256.into(),
        size,
    }
}

impl ImageSource {
    /// The pin, unless DEVICELAB_IMAGE_<ARCH> or DEVICELAB_IMAGE_URL_<ARCH> overrides it.
    pub fn for_arch(config: &HarnessConfig, arch: VmArchitecture) -> Result<Self, ConfigError> {
        let overrides = config.overrides(arch);
        if let Some((var, path)) = overrides.image {
            return Ok(Self::LocalFile {
                path,
                from_var: var,
            });
        }
        Ok(match overrides.image_url {
            None => Self::Download(ubuntu_pin(arch)),
            Some((url, sha256)) => {
                let file_name = url
                    .rsplit('/')
                    .next()
                    .filter(|n| !n.is_empty())
                    .unwrap_or("image")
                    .to_owned();
                // Keyed by digest so two URLs with the same file name never collide (the
                // digest was checked to be 64 hex digits when the configuration was read).
                let key: String = sha256.chars().take(12).collect();
                Self::Download(Artifact {
                    file_name: format!("{key}-{file_name}"),
                    urls: vec![url],
                    sha256,
                    size: None,
                })
            }
        })
    }

    /// Makes the image available locally (downloading into `cache_dir` if needed).
    pub async fn resolve(&self, cache_dir: &Path) -> Result<BaseImage, ImageError> {
        let (path, from_var, cached) = match self {
            Self::Download(artifact) => (
                download::fetch(cache_dir, artifact).await?,
                "the download cache".to_owned(),
                true,
            ),
            Self::LocalFile { path, from_var } => (path.clone(), from_var.clone(), false),
        };
        let format = sniff_format(&path, &from_var)?;
        let digest = match self {
            Self::Download(artifact) => artifact.sha256.to_ascii_lowercase(),
            Self::LocalFile { .. } => {
                let (file, records) = (path.clone(), cache_dir.join(".digests"));
                tokio::task::spawn_blocking(move || download::local_digest(&file, &records))
                    .await
                    .map_err(std::io::Error::other)
                    .and_then(|r| r)
                    .map_err(|source| ImageError::Unreadable {
                        path: path.clone(),
                        from_var: from_var.clone(),
                        source,
                    })?
            }
        };
        Ok(BaseImage {
            path,
            format,
            cached,
            digest,
        })
    }
}

fn sniff_format(path: &Path, from_var: &str) -> Result<DiskFormat, ImageError> {
    let unreadable = |source| ImageError::Unreadable {
        path: path.to_owned(),
        from_var: from_var.to_owned(),
        source,
    };
    let not_image = |reason: &str| ImageError::NotAnImage {
        path: path.to_owned(),
        from_var: from_var.to_owned(),
        reason: reason.to_owned(),
    };
    let meta = std::fs::metadata(path).map_err(unreadable)?;
    if !meta.is_file() {
        return Err(not_image("not a regular file"));
    }
    let mut magic = [0u8; 4];
    let mut file = std::fs::File::open(path).map_err(unreadable)?;
    if meta.len() < 1024 * 1024 {
        return Err(not_image(&format!("only {} bytes long", meta.len())));
    }
    file.read_exact(&mut magic).map_err(unreadable)?;
    Ok(if &magic == b"QFI\xfb" {
        DiskFormat::Qcow2
    } else {
        DiskFormat::Raw
    })
}
