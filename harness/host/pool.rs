//! The harness's dir-backed libvirt storage pool: everything a VM's disks are (its overlay,
//! the base image under it, its seed, its firmware) is a volume there, and every byte that
//! goes in goes through libvirt (volume creation and upload streams), so a libvirt host
//! elsewhere is served the same way as this one.
//!
//! Two kinds of volume are kept across runs, one copy per host: a base image
//! (`devicelab-base-<digest>.<format>`) and padded UEFI CODE (`…-pflash64M.fd`). Each is
//! uploaded under a name of its uploader's ([`upload_prefix`]) and copied by libvirt to its
//! own name once whole, so the cached name never holds a half-sent file, and the reaper
//! removes an upload whose process died.

use crate::host::domain_xml::xml_escape;
use crate::host::libvirt::{Libvirt, LibvirtError, call_err, is_code};
use crate::image::firmware::{self, FirmwareError, FirmwarePair, PFLASH_SIZE};
use crate::image::source::{BaseImage, DiskFormat};
use crate::support::lock;
use crate::support::process::process_start_time;
use sha2::Digest;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use virt::error::ErrorNumber;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;

pub const POOL_NAME: &str = "devicelab";

/// The start of a cached base image volume's name; the rest is the image's digest and format.
pub const BASE_PREFIX: &str = "devicelab-base-";

/// How long a process waits while another one uploads the cached volume it needs.
pub const UPLOAD_LOCK_BUDGET: Duration = Duration::from_secs(600);

/// Bytes sent per call of an upload stream.
const CHUNK: usize = 1 << 20;

/// The start of an upload's volume name while it is sent: its owner's pid and start time, so
/// the reaper can tell a dead uploader's leftover from a live one's. It starts with this
/// machine's id: a libvirt host several machines use holds uploads of processes this one
/// cannot see.
pub fn upload_prefix(pid: u32) -> String {
    format!(
        "devicelab-upload-{}-{pid}-{}-",
        machine_id(),
        process_start_time(pid).unwrap_or(0)
    )
}

/// The owner (machine, pid, start time) an upload volume's name carries, if it is one.
pub fn upload_owner(volume: &str) -> Option<(String, u32, u64)> {
    let mut f = volume.strip_prefix("devicelab-upload-")?.splitn(4, '-');
    Some((
        f.next()?.to_owned(),
        f.next()?.parse().ok()?,
        f.next()?.parse().ok()?,
    ))
}

/// This machine's id (the start of `/etc/machine-id`, else of its host name), as an upload's
/// name carries it.
pub fn machine_id() -> String {
    let id = std::fs::read_to_string("/etc/machine-id")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .unwrap_or_default();
    let id: String = id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(12)
        .collect();
    if id.is_empty() { "unknown".into() } else { id }
}

/// How long a pool refresh waits while libvirt copies a volume (it refuses one meanwhile).
const REFRESH_BUDGET: Duration = Duration::from_secs(120);

/// The name of the volume that holds `base` on every host.
pub fn base_volume_name(base: &BaseImage) -> String {
    format!(
        "{BASE_PREFIX}{}.{}",
        &base.digest[..16.min(base.digest.len())],
        base.format.as_str()
    )
}

/// A volume's definition: `capacity` bytes (sparse: what is not written takes no disk), its
/// file in `format`, its mode from `access`.
fn volume_xml(volume: &str, capacity: u64, format: DiskFormat, access: Access) -> String {
    format!(
        r#"<volume>
  <name>{name}</name>
  <capacity unit='bytes'>{capacity}</capacity>
  <allocation>0</allocation>
  <target>
    <format type='{format}'/>
    <permissions><mode>{mode}</mode></permissions>
  </target>
</volume>
"#,
        name = xml_escape(volume),
        format = format.as_str(),
        mode = access.mode(),
    )
}

/// The access mode of a volume's file on its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// 0600: the VM's own (its seed, its NVRAM).
    Private,
    /// 0644: read by every VM that boots from it (a base image, firmware CODE).
    Shared,
}

impl Access {
    fn mode(self) -> &'static str {
        match self {
            Self::Private => "0600",
            Self::Shared => "0644",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error("cannot prepare the pool directory {dir}: {source}")]
    Dir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Firmware(#[from] FirmwareError),
    #[error(
        "{path} changed while it was sent as volume {volume}: its bytes hash to {got}, not {want}; \
         nothing was kept. If the file is being rebuilt, run again once it is done; if it is a \
         downloaded image, `devicelab fetch` downloads a good copy"
    )]
    Changed {
        volume: String,
        path: PathBuf,
        want: String,
        got: String,
    },
    #[error("cannot read {path} to upload it as volume {volume}: {source}")]
    Source {
        volume: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "another process held the upload lock {path} for {waited:.0?} ({holder}) while volume \
         {volume} was sent: is it hung? It is released when that process exits"
    )]
    UploadLock {
        volume: String,
        path: PathBuf,
        holder: String,
        waited: Duration,
    },
    #[error(
        "the libvirt pool {POOL_NAME:?} already exists at {existing}, not {wanted}: set DEVICELAB_DATA_DIR so \
         its pool dir is {existing}, or remove the old pool (virsh pool-destroy {POOL_NAME}; virsh pool-undefine {POOL_NAME})"
    )]
    PathMismatch { existing: String, wanted: PathBuf },
}

#[derive(Clone)]
pub struct Pool {
    libvirt: Libvirt,
    pub dir: PathBuf,
    /// This machine's locks on the uploads of cached volumes (one process sends each).
    locks: PathBuf,
}

impl Pool {
    /// Defines, builds, starts and autostarts the pool once; later calls just find it.
    /// Callers serialise this across processes (see `Lab`).
    pub fn ensure(libvirt: &Libvirt, dir: &Path) -> Result<Self, PoolError> {
        let dir_err = |source| PoolError::Dir {
            dir: dir.to_owned(),
            source,
        };
        let make_dir = || -> Result<(), PoolError> {
            std::fs::create_dir_all(dir).map_err(dir_err)?;
            // 0711: libvirt's qemu user must reach the files; nobody needs to list them.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).map_err(dir_err)
        };
        let conn = libvirt.conn()?;
        // Looked up first: a pool at another path is refused before anything is made here.
        let pool = match conn.lookup_storage_pool_by_name(POOL_NAME) {
            Ok(pool) => {
                let xml = pool.xml_desc(0).map_err(call_err("read pool", POOL_NAME))?;
                let existing = roxmltree::Document::parse(&xml)
                    .ok()
                    .and_then(|doc| {
                        doc.descendants()
                            .find(|n| n.has_tag_name("target"))?
                            .children()
                            .find(|n| n.has_tag_name("path"))?
                            .text()
                            .map(str::to_owned)
                    })
                    .unwrap_or_default();
                if Path::new(&existing) != dir {
                    return Err(PoolError::PathMismatch {
                        existing,
                        wanted: dir.to_owned(),
                    });
                }
                make_dir()?;
                pool
            }
            Err(e) if is_code(&e, ErrorNumber::NoStoragePool) => {
                make_dir()?;
                let xml = format!(
                    r#"<pool type='dir'>
  <name>{POOL_NAME}</name>
  <target>
    <path>{}</path>
    <permissions><mode>0711</mode></permissions>
  </target>
</pool>
"#,
                    xml_escape(&dir.display().to_string())
                );
                let pool = conn
                    .define_storage_pool_xml(&xml, 0)
                    .map_err(call_err("define pool", POOL_NAME))?;
                pool.build(0).map_err(call_err("build pool", POOL_NAME))?;
                pool
            }
            Err(e) => return Err(call_err("look up pool", POOL_NAME)(e).into()),
        };
        if !pool
            .is_active()
            .map_err(call_err("query pool", POOL_NAME))?
        {
            pool.create(0).map_err(call_err("start pool", POOL_NAME))?;
        }
        if !pool.autostart().unwrap_or(false) {
            pool.set_autostart(true)
                .map_err(call_err("autostart pool", POOL_NAME))?;
        }
        let locks = dir.with_file_name(".pool-locks");
        lock::private_dir(&locks).map_err(|source| PoolError::Dir {
            dir: locks.clone(),
            source,
        })?;
        Ok(Self {
            libvirt: libvirt.clone(),
            dir: dir.to_owned(),
            locks,
        })
    }

    /// The pool, looked up afresh (a handle would not survive a libvirtd restart).
    fn handle(&self) -> Result<StoragePool, PoolError> {
        Ok(self
            .libvirt
            .conn()?
            .lookup_storage_pool_by_name(POOL_NAME)
            .map_err(call_err("look up pool", POOL_NAME))?)
    }

    pub fn path_of(&self, volume: &str) -> PathBuf {
        self.dir.join(volume)
    }

    /// A new raw volume `volume` of `capacity` bytes (at least the source's length) holding
    /// `source`'s bytes at its start, sent through a libvirt stream. A volume of that name is
    /// replaced; an upload that fails leaves none. Returns its path on the pool's host.
    pub fn upload(
        &self,
        volume: &str,
        source: &Path,
        capacity: u64,
        access: Access,
    ) -> Result<PathBuf, PoolError> {
        let (path, _) = self.send_file(volume, source, capacity, DiskFormat::Raw, access, None)?;
        Ok(path)
    }

    /// [`Pool::upload`] into a volume libvirt knows as `format` (the bytes are sent as they
    /// are), and when `sha256` is given, the bytes sent must have that digest (else the volume
    /// is deleted and the error says the file changed). Returns its path and its capacity.
    fn send_file(
        &self,
        volume: &str,
        source: &Path,
        capacity: u64,
        format: DiskFormat,
        access: Access,
        sha256: Option<&str>,
    ) -> Result<(PathBuf, u64), PoolError> {
        let source_err = |source_e| PoolError::Source {
            volume: volume.to_owned(),
            path: source.to_owned(),
            source: source_e,
        };
        let len = std::fs::metadata(source).map_err(source_err)?.len();
        self.delete_volume(volume)?;
        let capacity = capacity.max(len).max(1);
        let xml = volume_xml(volume, capacity, format, access);
        let vol = StorageVol::create_xml(&self.handle()?, &xml, 0)
            .map_err(call_err("create volume", volume))?;
        let sent = (|| -> Result<(), PoolError> {
            let mut file = std::fs::File::open(source).map_err(source_err)?;
            let conn = self.libvirt.conn()?;
            let stream =
                Stream::new(&conn, 0).map_err(call_err("open an upload stream for", volume))?;
            vol.upload(&stream, 0, len, 0)
                .map_err(call_err("upload to volume", volume))?;
            let mut buf = vec![0u8; CHUNK];
            let mut hasher = sha2::Sha256::new();
            let copied = (|| -> Result<(), PoolError> {
                loop {
                    let n = file.read(&mut buf).map_err(source_err)?;
                    if n == 0 {
                        let got = hex::encode(hasher.finalize_reset());
                        return match sha256 {
                            Some(want) if !got.eq_ignore_ascii_case(want) => {
                                Err(PoolError::Changed {
                                    volume: volume.to_owned(),
                                    path: source.to_owned(),
                                    want: want.to_owned(),
                                    got,
                                })
                            }
                            _ => Ok(()),
                        };
                    }
                    if sha256.is_some() {
                        hasher.update(&buf[..n]);
                    }
                    let mut at = 0;
                    while at < n {
                        let sent = stream
                            .send(&buf[at..n])
                            .map_err(call_err("upload to volume", volume))?;
                        match usize::try_from(sent) {
                            Ok(sent) if sent > 0 => at += sent.min(n - at),
                            _ => {
                                return Err(LibvirtError::Call {
                                    action: "upload to volume",
                                    object: volume.to_owned(),
                                    message: format!("the stream took {sent} bytes"),
                                }
                                .into());
                            }
                        }
                    }
                }
            })();
            match copied {
                Ok(()) => Ok(stream
                    .finish()
                    .map_err(call_err("finish the upload to volume", volume))?),
                Err(e) => {
                    let _ = stream.abort();
                    Err(e)
                }
            }
        })();
        match sent {
            Ok(()) => Ok((
                PathBuf::from(vol.path().map_err(call_err("locate volume", volume))?),
                capacity,
            )),
            Err(e) => {
                let _ = vol.delete(0);
                Err(e)
            }
        }
    }

    /// The volume `volume` the pool keeps across runs, uploaded from `source` if this host does
    /// not have it yet. `volume` names its content (a digest): one whole copy per host, sent by
    /// one process at a time from this machine, never seen half-sent under its own name.
    pub fn cached(
        &self,
        volume: &str,
        source: &Path,
        capacity: u64,
        format: DiskFormat,
        sha256: Option<&str>,
    ) -> Result<PathBuf, PoolError> {
        // Locked before looking: libvirt shows a volume under its name while it still copies
        // into it, and this machine's other processes must not take it before it is whole.
        let lock_path = self.locks.join(format!("{volume}.lock"));
        let holder = format!("pid {} uploading {volume}", std::process::id());
        let _lock =
            lock::lock_within(&lock_path, &holder, UPLOAD_LOCK_BUDGET).map_err(|e| match e {
                lock::WaitError::Io(source) => PoolError::Dir {
                    dir: lock_path.clone(),
                    source,
                },
                lock::WaitError::Timeout { holder, waited } => PoolError::UploadLock {
                    volume: volume.to_owned(),
                    path: lock_path.clone(),
                    holder,
                    waited,
                },
            })?;
        if let Some(path) = self.existing(volume)? {
            return Ok(path);
        }
        let part = format!("{}{volume}", upload_prefix(std::process::id()));
        // Declared in its own format from the start: libvirt's copy below reads it as that,
        // not as whatever its probe of the sent bytes would say.
        let (_, capacity) =
            self.send_file(&part, source, capacity, format, Access::Shared, sha256)?;
        let copied = (|| -> Result<PathBuf, PoolError> {
            let pool = self.handle()?;
            let from = pool
                .lookup_storage_vol_by_name(&part)
                .map_err(call_err("look up volume", &part))?;
            // In the source's own format: libvirt copies a raw file as it is and a qcow2
            // image image to image (at least the sent one's size: libvirt raises it to the
            // image's own).
            let xml = volume_xml(volume, capacity, format, Access::Shared);
            match StorageVol::create_xml_from(&pool, &xml, &from, 0) {
                Ok(vol) => Ok(PathBuf::from(
                    vol.path().map_err(call_err("locate volume", volume))?,
                )),
                // Another machine's copy came first: the same bytes, by its name.
                Err(e) if is_code(&e, ErrorNumber::StorageVolExist) => self
                    .existing(volume)?
                    .ok_or_else(|| call_err("copy to volume", volume)(e).into()),
                Err(e) => Err(call_err("copy to volume", volume)(e).into()),
            }
        })();
        let removed = self.delete_volume(&part);
        let path = copied?;
        removed?;
        Ok(path)
    }

    /// The path of volume `volume` on the pool's host, if there is one.
    fn existing(&self, volume: &str) -> Result<Option<PathBuf>, PoolError> {
        match self.handle()?.lookup_storage_vol_by_name(volume) {
            Ok(vol) => Ok(Some(PathBuf::from(
                vol.path().map_err(call_err("locate volume", volume))?,
            ))),
            Err(e) if is_code(&e, ErrorNumber::NoStorageVolume) => Ok(None),
            Err(e) => Err(call_err("look up volume", volume)(e).into()),
        }
    }

    /// The base image as a volume of this host's pool (uploaded once per host and digest,
    /// its bytes checked against the digest as they are sent).
    pub fn base_volume(&self, base: &BaseImage) -> Result<PathBuf, PoolError> {
        self.cached(
            &base_volume_name(base),
            &base.path,
            0,
            base.format,
            Some(&base.digest),
        )
    }

    /// `fw`'s CODE as a volume of this host's pool, padded to the 64 MiB a `virt` pflash device
    /// needs (uploaded once per host and firmware).
    pub fn firmware_code(&self, fw: &FirmwarePair) -> Result<PathBuf, PoolError> {
        let (volume, digest) = firmware::code_volume(fw)?;
        self.cached(
            &volume,
            &fw.code,
            PFLASH_SIZE,
            DiskFormat::Raw,
            Some(&digest),
        )
    }

    /// A qcow2 overlay over the base image (its volume in this pool): the VM writes there, the
    /// base stays pristine.
    pub fn create_overlay(
        &self,
        volume: &str,
        base: &BaseImage,
        capacity_gib: u64,
    ) -> Result<PathBuf, PoolError> {
        let backing = self.base_volume(base)?;
        self.create_overlay_on(volume, &backing, base.format, capacity_gib)
    }

    /// A qcow2 overlay over `backing`, a file of the pool's host (a saved VM's disk).
    pub fn create_overlay_on(
        &self,
        volume: &str,
        backing: &Path,
        format: DiskFormat,
        capacity_gib: u64,
    ) -> Result<PathBuf, PoolError> {
        self.delete_volume(volume)?; // a leftover of the same name would make create fail
        let xml = format!(
            r#"<volume>
  <name>{volume}</name>
  <capacity unit='GiB'>{capacity_gib}</capacity>
  <target>
    <format type='qcow2'/>
    <permissions><mode>0600</mode></permissions>
  </target>
  <backingStore>
    <path>{backing}</path>
    <format type='{format}'/>
  </backingStore>
</volume>
"#,
            volume = xml_escape(volume),
            backing = xml_escape(&backing.display().to_string()),
            format = format.as_str(),
        );
        let vol = StorageVol::create_xml(&self.handle()?, &xml, 0)
            .map_err(call_err("create volume", volume))?;
        Ok(PathBuf::from(
            vol.path().map_err(call_err("locate volume", volume))?,
        ))
    }

    /// An empty raw volume `volume` (replacing one of that name), for libvirt to write on its
    /// host (a saved VM's memory). Returns its path there.
    pub fn create_empty(&self, volume: &str) -> Result<PathBuf, PoolError> {
        self.delete_volume(volume)?;
        let xml = volume_xml(volume, 0, DiskFormat::Raw, Access::Private);
        let vol = StorageVol::create_xml(&self.handle()?, &xml, 0)
            .map_err(call_err("create volume", volume))?;
        Ok(PathBuf::from(
            vol.path().map_err(call_err("locate volume", volume))?,
        ))
    }

    /// A copy of the volume `from` (of `format`) as `to` (replacing one of that name), made on
    /// the pool's host: nothing crosses the connection. A qcow2 overlay is copied whole (its
    /// backing chain flattened into it). Returns the copy's path there.
    pub fn copy_volume(
        &self,
        from: &str,
        to: &str,
        format: DiskFormat,
    ) -> Result<PathBuf, PoolError> {
        self.delete_volume(to)?;
        let pool = self.handle()?;
        let source = pool
            .lookup_storage_vol_by_name(from)
            .map_err(call_err("look up volume", from))?;
        let capacity = source
            .info()
            .map_err(call_err("read volume", from))?
            .capacity;
        let xml = volume_xml(to, capacity, format, Access::Private);
        let vol = StorageVol::create_xml_from(&pool, &xml, &source, 0)
            .map_err(call_err("copy volume", &format!("{from} to {to}")))?;
        Ok(PathBuf::from(
            vol.path().map_err(call_err("locate volume", to))?,
        ))
    }

    /// The path of the volume `volume` on the pool's host, if the pool has it.
    pub fn volume_path(&self, volume: &str) -> Result<Option<PathBuf>, PoolError> {
        match self.handle()?.lookup_storage_vol_by_name(volume) {
            Ok(vol) => Ok(Some(PathBuf::from(
                vol.path().map_err(call_err("locate volume", volume))?,
            ))),
            Err(e) if is_code(&e, ErrorNumber::NoStorageVolume) => Ok(None),
            Err(e) => Err(call_err("look up volume", volume)(e).into()),
        }
    }

    /// Makes libvirt notice what changed in the pool directory outside its calls.
    /// libvirt refuses a refresh while it copies a volume into the pool (a base image's first
    /// upload to this host, by any process): it is tried again until [`REFRESH_BUDGET`].
    pub fn refresh(&self) -> Result<(), PoolError> {
        let started = std::time::Instant::now();
        loop {
            match self.handle()?.refresh(0) {
                Ok(_) => return Ok(()),
                Err(e)
                    if e.message().contains("asynchronous jobs running")
                        && started.elapsed() < REFRESH_BUDGET =>
                {
                    std::thread::sleep(Duration::from_millis(250));
                }
                Err(e) => return Err(call_err("refresh pool", POOL_NAME)(e).into()),
            }
        }
    }

    /// Deletes a volume; absent is fine.
    pub fn delete_volume(&self, volume: &str) -> Result<(), PoolError> {
        match self.handle()?.lookup_storage_vol_by_name(volume) {
            Ok(vol) => vol.delete(0).map_err(call_err("delete volume", volume))?,
            Err(e) if is_code(&e, ErrorNumber::NoStorageVolume) => {}
            Err(e) => return Err(call_err("look up volume", volume)(e).into()),
        }
        Ok(())
    }

    /// Deletes the uploads whose process is gone (a run killed mid-upload); returns their names.
    pub fn reap_uploads(&self) -> Vec<String> {
        let mut reaped = Vec::new();
        for volume in self.volumes().unwrap_or_default() {
            if let Some((machine, pid, start)) = upload_owner(&volume)
                && machine == machine_id()
                && !crate::support::process::is_alive(pid, start)
                && self.delete_volume(&volume).is_ok()
            {
                tracing::warn!("reaped volume {volume} (its uploader, pid {pid}, is gone)");
                reaped.push(volume);
            }
        }
        reaped
    }

    /// Names of the pool's volumes (refreshed first).
    pub fn volumes(&self) -> Result<Vec<String>, PoolError> {
        self.refresh()?;
        Ok(self
            .handle()?
            .list_volumes()
            .map_err(call_err("list volumes of", POOL_NAME))?)
    }
}
