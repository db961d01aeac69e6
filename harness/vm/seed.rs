//! The cloud-init NoCloud seed: user-data and meta-data as typed structs (JSON is YAML, so
//! serde_json writes valid cloud-config), on a small FAT volume labelled `CIDATA` written by
//! the `fatfs` crate (no host tool: cloud-init reads vfat and iso9660 seeds alike).

use crate::model::spec::VirtualMachineSpec;
use crate::ssh::keys::HostKey;
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("cannot write the seed image in {dir}: {source}")]
    Write {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// The seed volume's size: a FAT12 volume with room to spare for a few KiB of user-data.
const SEED_BYTES: u64 = 1024 * 1024;
/// The label cloud-init's NoCloud source looks for (`cidata` or `CIDATA`; FAT labels are
/// upper case).
pub const SEED_LABEL: &str = "CIDATA";

#[derive(Debug, Serialize)]
pub struct CloudConfig {
    pub hostname: String,
    /// Maps the hostname to 127.0.1.1, so `sudo` never waits on DNS for it.
    pub manage_etc_hosts: bool,
    pub users: Vec<CloudUser>,
    pub ssh_pwauth: bool,
    pub disable_root: bool,
    /// The host key the harness generated; its public half is what SSH verifies.
    pub ssh_keys: SshHostKeys,
    /// Only ed25519, which `ssh_keys` already provides, so nothing is generated: RSA under
    /// emulation costs seconds for nothing. (An empty list fails cloud-init's schema check.)
    pub ssh_genkeytypes: Vec<String>,
    pub ssh_deletekeys: bool,
    /// `noblock`: the root file system grows in the background, not on boot's critical path.
    pub resize_rootfs: &'static str,
    /// Runs on every boot, before sshd: prints evidence for the harness's diagnosis.
    pub bootcmd: Vec<String>,
    /// The spec's first-boot commands, run once in cloud-init's final stage.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub runcmd: Vec<String>,
}

/// On every boot, before sshd starts, the guest names on its console each file the harness's
/// SSH access depends on that exists but is empty: what a power cut leaves of data that was
/// never flushed. Read-only: it changes nothing on the device.
pub fn evidence_bootcmd() -> String {
    let mark = super::console::EVIDENCE_MARK;
    format!(
        r#"for f in /etc/ssh/ssh_host_*key /etc/ssh/ssh_host_*key.pub /home/*/.ssh/authorized_keys; do if [ -e "$f" ] && [ ! -s "$f" ]; then echo "{mark} $f is empty (0 bytes)" >/dev/console; fi; done"#
    )
}

#[derive(Debug, Serialize)]
pub struct CloudUser {
    pub name: String,
    pub gecos: String,
    pub shell: String,
    pub sudo: String,
    pub lock_passwd: bool,
    pub ssh_authorized_keys: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct SshHostKeys {
    pub ed25519_private: String,
    pub ed25519_public: String,
}

#[derive(Debug, Serialize)]
pub struct MetaData {
    #[serde(rename = "instance-id")]
    pub instance_id: String,
    #[serde(rename = "local-hostname")]
    pub local_hostname: String,
}

pub struct Seed {
    pub user_data: String,
    pub meta_data: String,
}

impl Seed {
    pub fn new(
        spec: &VirtualMachineSpec,
        client_key_line: &str,
        host_key: &HostKey,
        instance_id: &str,
    ) -> Self {
        let fb = &spec.first_boot;
        let mut keys = vec![client_key_line.to_owned()];
        keys.extend(fb.authorized_keys.iter().cloned());
        let config = CloudConfig {
            hostname: fb.hostname.clone(),
            manage_etc_hosts: true,
            users: vec![CloudUser {
                name: fb.admin_user.clone(),
                gecos: "devicelab admin".into(),
                shell: "/bin/bash".into(),
                sudo: "ALL=(ALL) NOPASSWD:ALL".into(),
                lock_passwd: true,
                ssh_authorized_keys: keys,
            }],
            ssh_pwauth: false,
            disable_root: true,
            ssh_keys: SshHostKeys {
                ed25519_private: host_key.private_openssh.clone(),
                ed25519_public: host_key.public_line.clone(),
            },
            ssh_genkeytypes: vec!["ed25519".into()],
            ssh_deletekeys: true,
            resize_rootfs: "noblock",
            // bootcmd runs first in cloud-init's init stage, before the modules that write
            // users and host keys.
            bootcmd: spec
                .writeback_delay
                .map(|d| {
                    format!(
                        "sysctl -w vm.dirty_expire_centisecs={}",
                        d.as_millis().div_ceil(10)
                    )
                })
                .into_iter()
                .chain([evidence_bootcmd()])
                .collect(),
            runcmd: fb.runcmd.clone(),
        };
        let meta = MetaData {
            instance_id: instance_id.to_owned(),
            local_hostname: fb.hostname.clone(),
        };
        Self {
            user_data: format!(
                "#cloud-config\n{}\n",
                serde_json::to_string_pretty(&config).expect("cloud-config serializes")
            ),
            meta_data: format!(
                "{}\n",
                serde_json::to_string_pretty(&meta).expect("meta-data serializes")
            ),
        }
    }

    /// Writes the seed volume to `path` (atomically: a temp file renamed into place, so a
    /// crash never leaves a half-written seed).
    pub fn write_image(&self, path: &Path) -> Result<(), SeedError> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let write_err = |source| SeedError::Write {
            dir: dir.to_owned(),
            source,
        };
        let mut tmp = tempfile::Builder::new()
            .prefix(".seed-")
            .tempfile_in(dir)
            .map_err(write_err)?;
        self.format(tmp.as_file_mut()).map_err(write_err)?;
        tmp.as_file().sync_all().map_err(write_err)?;
        tmp.persist(path).map_err(|e| write_err(e.error))?;
        Ok(())
    }

    fn format(&self, file: &mut std::fs::File) -> std::io::Result<()> {
        use std::io::Write;
        file.set_len(SEED_BYTES)?;
        let mut label = [b' '; 11];
        label[..SEED_LABEL.len()].copy_from_slice(SEED_LABEL.as_bytes());
        fatfs::format_volume(
            &mut *file,
            fatfs::FormatVolumeOptions::new().volume_label(label),
        )?;
        let fs = fatfs::FileSystem::new(&mut *file, fatfs::FsOptions::new())?;
        for (name, text) in [
            ("user-data", &self.user_data),
            ("meta-data", &self.meta_data),
        ] {
            let mut f = fs.root_dir().create_file(name)?;
            f.truncate()?;
            f.write_all(text.as_bytes())?;
        }
        fs.unmount()
    }
}
