//! SSH keys: the harness's client key (one per data dir, 0600) and a fresh host key per VM,
//! injected through cloud-init so every connection verifies the guest (no trust on first use).

use russh::keys::ssh_key::LineEnding;
use russh::keys::{Algorithm, PrivateKey, PublicKey};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot create the key directory {dir}: {source}")]
    Dir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot generate an ed25519 key: {0}")]
    Generate(String),
    #[error("cannot write the key {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot load the key {path}: {reason} (delete it and its .pub to have a new one generated)"
    )]
    Load { path: PathBuf, reason: String },
    #[error("the key {path} is readable by others (mode {mode:o}): run chmod 600 {path}")]
    Permissions { path: PathBuf, mode: u32 },
}

/// The lab's client key in the keys dir `dir` (what `devicelab ssh` logs in with).
pub fn client_key_path(dir: &Path) -> PathBuf {
    dir.join("id_ed25519")
}

#[derive(Clone)]
pub struct ClientKey {
    pub private: Arc<PrivateKey>,
    /// `ssh-ed25519 AAAA… comment`, for authorized_keys.
    pub public_line: String,
    pub path: PathBuf,
}

/// A guest's SSH host key, made by the harness.
#[derive(Clone)]
pub struct HostKey {
    pub private_openssh: String,
    pub public: PublicKey,
    pub public_line: String,
}

fn generate(comment: &str) -> Result<PrivateKey, KeyError> {
    let mut key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
        .map_err(|e| KeyError::Generate(e.to_string()))?;
    key.set_comment(comment);
    Ok(key)
}

fn public_line(key: &PrivateKey) -> String {
    key.public_key()
        .to_openssh()
        .expect("an ed25519 public key always encodes")
}

impl ClientKey {
    /// Loads `dir/id_ed25519`, generating it on first use. Safe against concurrent processes:
    /// the key is written to a temp file and linked into place, so exactly one key wins.
    pub fn load_or_generate(dir: &Path) -> Result<Self, KeyError> {
        std::fs::create_dir_all(dir).map_err(|source| KeyError::Dir {
            dir: dir.to_owned(),
            source,
        })?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(
            |source| KeyError::Dir {
                dir: dir.to_owned(),
                source,
            },
        )?;
        let path = client_key_path(dir);
        if !path.exists() {
            let key = generate("devicelab")?;
            let tmp = dir.join(format!(
                ".id_ed25519.{}",
                hex::encode(rand::random::<[u8; 6]>())
            ));
            let write_err = |source| KeyError::Write {
                path: tmp.clone(),
                source,
            };
            // write_openssh_file creates the file 0600.
            key.write_openssh_file(&tmp, LineEnding::LF)
                .map_err(|e| write_err(std::io::Error::other(e.to_string())))?;
            // hard_link fails if another process won the race; then we use its key.
            let _ = std::fs::hard_link(&tmp, &path);
            let _ = std::fs::remove_file(&tmp);
        }
        let mode = std::fs::metadata(&path)
            .map_err(|e| KeyError::Load {
                path: path.clone(),
                reason: e.to_string(),
            })?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions { path, mode });
        }
        let private = russh::keys::load_secret_key(&path, None).map_err(|e| KeyError::Load {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        // The public half is written from the key that won, whoever generated it, and
        // atomically: a racing process can never leave a .pub of another key.
        let public_line = public_line(&private);
        let pub_path = dir.join("id_ed25519.pub");
        let wanted = format!("{public_line}\n");
        if std::fs::read_to_string(&pub_path).ok().as_deref() != Some(wanted.as_str()) {
            let tmp = dir.join(format!(
                ".id_ed25519.pub.{}",
                hex::encode(rand::random::<[u8; 6]>())
            ));
            std::fs::write(&tmp, &wanted)
                .and_then(|()| std::fs::rename(&tmp, &pub_path))
                .map_err(|source| KeyError::Write {
                    path: pub_path.clone(),
                    source,
                })?;
        }
        Ok(Self {
            public_line,
            private: Arc::new(private),
            path,
        })
    }
}

impl HostKey {
    pub fn generate(comment: &str) -> Result<Self, KeyError> {
        Self::of(generate(comment)?)
    }

    /// A fixed key, never given to a guest: stands in for the host key where a rendering must
    /// not depend on a random one (a saved VM's key hashes the seed rendered with it).
    pub fn placeholder() -> Self {
        use russh::keys::ssh_key::private::{Ed25519Keypair, KeypairData};
        let pair = Ed25519Keypair::from_seed(&[0x5a; 32]);
        let key = PrivateKey::new(KeypairData::Ed25519(pair), "devicelab-placeholder")
            .expect("an ed25519 key pair always makes a private key");
        Self::of(key).expect("an ed25519 key always encodes")
    }

    /// A host key kept in OpenSSH form (a saved VM's, whose clones all present it).
    pub fn from_openssh(text: &str) -> Result<Self, KeyError> {
        Self::of(PrivateKey::from_openssh(text).map_err(|e| KeyError::Generate(e.to_string()))?)
    }

    fn of(key: PrivateKey) -> Result<Self, KeyError> {
        Ok(Self {
            private_openssh: key
                .to_openssh(LineEnding::LF)
                .map_err(|e| KeyError::Generate(e.to_string()))?
                .to_string(),
            public_line: public_line(&key),
            public: key.public_key().clone(),
        })
    }

    /// The `known_hosts` line for an ssh command a human can paste.
    pub fn known_hosts_line(&self, host: &str) -> String {
        format!("{host} {}", self.public_line)
    }
}
