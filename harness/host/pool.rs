//! The harness's dir-backed libvirt storage pool: VM overlays (backed by the cached image)
//! and seed ISOs live there, so libvirt labels and cleans them like any volume.

use crate::host::domain_xml::xml_escape;
use crate::host::libvirt::{Libvirt, LibvirtError, call_err, is_code};
use crate::image::source::BaseImage;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use virt::error::ErrorNumber;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;

pub const POOL_NAME: &str = "devicelab";

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error("cannot prepare the pool directory {dir}: {source}")]
    Dir {
        dir: PathBuf,
        source: std::io::Error,
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
        Ok(Self {
            libvirt: libvirt.clone(),
            dir: dir.to_owned(),
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

    /// A qcow2 overlay over the base image: the VM writes there, the cached image stays pristine.
    pub fn create_overlay(
        &self,
        volume: &str,
        base: &BaseImage,
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
            backing = xml_escape(&base.path.display().to_string()),
            format = base.format.as_str(),
        );
        let vol = StorageVol::create_xml(&self.handle()?, &xml, 0)
            .map_err(call_err("create volume", volume))?;
        Ok(PathBuf::from(
            vol.path().map_err(call_err("locate volume", volume))?,
        ))
    }

    /// Makes libvirt notice files the harness wrote into the pool directory itself.
    pub fn refresh(&self) -> Result<(), PoolError> {
        self.handle()?
            .refresh(0)
            .map_err(call_err("refresh pool", POOL_NAME))?;
        Ok(())
    }

    /// Deletes a volume (or a file libvirt has not seen yet); absent is fine.
    pub fn delete_volume(&self, volume: &str) -> Result<(), PoolError> {
        match self.handle()?.lookup_storage_vol_by_name(volume) {
            Ok(vol) => vol.delete(0).map_err(call_err("delete volume", volume))?,
            Err(e) if is_code(&e, ErrorNumber::NoStorageVolume) => {}
            Err(e) => return Err(call_err("look up volume", volume)(e).into()),
        }
        match std::fs::remove_file(self.path_of(volume)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(PoolError::Dir {
                dir: self.path_of(volume),
                source,
            }),
        }
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
