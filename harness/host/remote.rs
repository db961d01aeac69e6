//! The SSH hop to a libvirt host named by a remote URI (`qemu+ssh://`): the same user, address
//! and key libvirt itself uses, read from the URI, so a guest on that host's network is reached
//! through the host, its key checked at both hops. A local URI (no host, or the `test` driver)
//! needs no hop; a remote one over another transport is refused with the fix: `qemu+tls://` and
//! `qemu+tcp://` since guest SSH has no way through them, `qemu+libssh://` and
//! `qemu+libssh2://` since libvirt's client stalls on them and then crashes
//! ([`RemoteError::Stalls`]).

use crate::ssh::{SshTarget, shell_quote};
use russh::keys::{Algorithm, PrivateKey, PublicKey};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why the hop to a remote libvirt host could not be worked out from its URI.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The URI does not parse.
    #[error(
        "the libvirt URI {uri:?} (DEVICELAB_LIBVIRT_URI or DEVICELAB_HOSTS) is not a URI: {message}"
    )]
    Uri {
        /// The URI.
        uri: String,
        /// What the parser said.
        message: String,
    },
    /// A remote host over a transport guest SSH cannot go through.
    #[error(
        "the libvirt URI {uri:?} (DEVICELAB_LIBVIRT_URI or DEVICELAB_HOSTS) reaches {host} over {transport}, which guest SSH cannot go \
         through: use qemu+ssh://{host}/system, so the harness reaches the guests through the \
         same SSH login"
    )]
    Transport {
        /// The URI.
        uri: String,
        /// Its host.
        host: String,
        /// Its transport (`tls`, `tcp`, ...).
        transport: String,
    },
    /// A transport on which libvirt's client leaves a reply in its SSH library's buffer while
    /// it waits for the socket: each call that meets it waits for the next keepalive ping, and
    /// a watch left behind by such a call is later run against a stack frame that is gone
    /// (GLib's "g_main_loop_quit: assertion" and a SIGSEGV).
    #[error(
        "the libvirt URI {uri:?} (DEVICELAB_LIBVIRT_URI or DEVICELAB_HOSTS) uses libvirt's \
         {transport} transport, whose client leaves replies in its SSH buffer until the next \
         keepalive pings: calls stall for seconds and the process then crashes (SIGSEGV after \
         \"g_main_loop_quit: assertion\"): use {ssh:?} instead. That runs OpenSSH's client, \
         which checks the host's key against ~/.ssh/known_hosts, not against a known_hosts= \
         in the URI (only the harness reads that): record the key there, or add \
         command=/path/to/script, a script that runs \
         `ssh -o UserKnownHostsFile=/path/to/known_hosts -o StrictHostKeyChecking=yes \"$@\"`"
    )]
    Stalls {
        /// The URI.
        uri: String,
        /// The same URI over `ssh`.
        ssh: String,
        /// Its transport (`libssh` or `libssh2`).
        transport: String,
    },
    /// The URI turns host key checking off.
    #[error(
        "the libvirt URI {uri:?} (DEVICELAB_LIBVIRT_URI or DEVICELAB_HOSTS) turns host key checking off ({option}): the harness \
         checks the libvirt host's key before it sends anything through it; remove {option} and \
         record the host's key in known_hosts (ssh-keyscan, after checking its fingerprint)"
    )]
    Unverified {
        /// The URI.
        uri: String,
        /// The option that turns it off.
        option: String,
    },
    /// No user in the URI, and none in the environment.
    #[error(
        "the libvirt URI {uri:?} (DEVICELAB_LIBVIRT_URI or DEVICELAB_HOSTS) names no user, and neither the effective uid's account \
         nor USER gives one: write the user into it \
         (qemu+ssh://USER@HOST/system)"
    )]
    NoUser {
        /// The URI.
        uri: String,
    },
    /// No key file in the URI, and none of the usual ones exists.
    #[error(
        "the libvirt URI {uri:?} (DEVICELAB_LIBVIRT_URI or DEVICELAB_HOSTS) names no keyfile and none of {tried:?} exists: add \
         ?keyfile=/path/to/key (an unencrypted key the host authorizes)"
    )]
    NoKey {
        /// The URI.
        uri: String,
        /// The key files looked for.
        tried: Vec<PathBuf>,
    },
    /// The key file cannot be read as an unencrypted OpenSSH private key.
    #[error(
        "cannot use {path} as the key for the libvirt host: {message} (the harness needs an \
         unencrypted OpenSSH private key; name another with ?keyfile= in the URI)"
    )]
    Key {
        /// The key file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The host has no key in `known_hosts`.
    #[error(
        "{host} (port {port}) has no key in {known_hosts}: record it (`ssh-keyscan -p {port} \
         {host} >> {known_hosts}`, after checking the fingerprint), or name another file with \
         ?known_hosts= in the URI"
    )]
    NotPinned {
        /// The host as the URI names it.
        host: String,
        /// Its SSH port.
        port: u16,
        /// The file looked in.
        known_hosts: PathBuf,
    },
    /// `known_hosts` could not be read.
    #[error(
        "cannot read {known_hosts}: {message} (make it readable, or name another file with \
         ?known_hosts= in the URI)"
    )]
    KnownHosts {
        /// The file.
        known_hosts: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The host name does not resolve.
    #[error(
        "cannot resolve the libvirt host {host}:{port}: {message} (check the host name in \
         the URI, or write its address)"
    )]
    Resolve {
        /// The host.
        host: String,
        /// Its SSH port.
        port: u16,
        /// What the resolver said.
        message: String,
    },
}

/// What a libvirt URI says about reaching its host over SSH, before anything is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLogin {
    /// The host as written (the name `known_hosts` records).
    pub host: String,
    /// Its SSH port.
    pub port: u16,
    /// The user to log in as.
    pub user: String,
    /// The private key (the URI's `keyfile`, or `None`: the usual files under `~/.ssh`).
    pub keyfile: Option<PathBuf>,
    /// The `known_hosts` file (the URI's, or `~/.ssh/known_hosts`).
    pub known_hosts: PathBuf,
}

/// The SSH login a libvirt URI implies: `None` for a local host, the login for a remote one
/// over SSH, an error for a remote one over another transport or with checks turned off.
/// `user` and `home` stand in for this process's account and home ([`login_of`] gives them).
pub fn host_login(
    uri: &str,
    user: Option<&str>,
    home: Option<&Path>,
) -> Result<Option<HostLogin>, RemoteError> {
    let parsed = url::Url::parse(uri).map_err(|e| RemoteError::Uri {
        uri: uri.to_owned(),
        message: e.to_string(),
    })?;
    refuse_stalling(uri, &parsed)?;
    // As `known_hosts` and the resolver name it (an IPv6 address without brackets), and as a
    // URI writes it (with them).
    let (host, uri_host) = match parsed.host() {
        None | Some(url::Host::Domain("")) => return Ok(None),
        Some(url::Host::Ipv6(ip)) => (ip.to_string(), format!("[{ip}]")),
        Some(host) => (host.to_string(), host.to_string()),
    };
    let transport = parsed
        .scheme()
        .split_once('+')
        .map(|(_, t)| t.to_owned())
        .unwrap_or_default();
    if transport != "ssh" {
        if transport == "unix" {
            return Ok(None);
        }
        return Err(RemoteError::Transport {
            uri: uri.to_owned(),
            host: uri_host,
            transport: if transport.is_empty() {
                "tls (the default for a host without +transport)".to_owned()
            } else {
                transport
            },
        });
    }
    let mut keyfile = None;
    let mut known_hosts = None;
    // libvirt decodes `%XX` in its parameters and nothing else (a `+` stays a `+`).
    let decode = |text: &str| {
        percent_encoding::percent_decode_str(text)
            .decode_utf8_lossy()
            .into_owned()
    };
    let pairs = parsed
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(name), decode(value))
        });
    for (name, value) in pairs {
        match (name.as_str(), value.as_str()) {
            ("keyfile", path) => keyfile = Some(PathBuf::from(path)),
            ("known_hosts", path) => known_hosts = Some(PathBuf::from(path)),
            ("no_verify", "1") | ("known_hosts_verify", "ignore") => {
                return Err(RemoteError::Unverified {
                    uri: uri.to_owned(),
                    option: format!("{name}={value}"),
                });
            }
            _ => {}
        }
    }
    let user = match decode(parsed.username()).as_str() {
        "" => user
            .filter(|u| !u.is_empty())
            .ok_or_else(|| RemoteError::NoUser {
                uri: uri.to_owned(),
            })?
            .to_owned(),
        named => named.to_owned(),
    };
    let ssh_dir = home.unwrap_or(Path::new("/")).join(".ssh");
    Ok(Some(HostLogin {
        host,
        port: parsed.port().unwrap_or(22),
        user,
        keyfile,
        known_hosts: known_hosts.unwrap_or_else(|| ssh_dir.join("known_hosts")),
    }))
}

impl HostLogin {
    /// The command OpenSSH's client reaches a guest of this host through (`ProxyCommand`):
    /// `ssh -W` with this login, the host key checked against its `known_hosts`.
    /// ssh expands `%` tokens in `ProxyCommand` and again in the file options, and splits
    /// those on blanks: each path is escaped for its layers (`IdentityFile`, not `-i`, whose
    /// raw path ssh checks before expanding it).
    pub fn proxy_command(&self) -> String {
        let option = |name: &str, path: &Path| {
            let path = path.display().to_string().replace('%', "%%");
            format!("-o {} ", shell_quote(&format!("{name}=\"{path}\"")))
        };
        let key = self
            .keyfile
            .as_ref()
            .map(|k| option("IdentityFile", k))
            .unwrap_or_default();
        let login = format!(
            "ssh {key}{}-o StrictHostKeyChecking=yes -p {}",
            option("UserKnownHostsFile", &self.known_hosts),
            self.port,
        );
        format!(
            "{} -W %h:%p {}@{}",
            login.replace('%', "%%"),
            shell_quote(&self.user).replace('%', "%%"),
            shell_quote(&self.host),
        )
    }
}

/// Refuses a URI over `libssh` or `libssh2`, local or remote ([`RemoteError::Stalls`]), before
/// anything connects over it; any other URI, or one that does not parse, passes.
pub fn refuse_stalling_transport(uri: &str) -> Result<(), RemoteError> {
    match url::Url::parse(uri) {
        Ok(parsed) => refuse_stalling(uri, &parsed),
        Err(_) => Ok(()),
    }
}

fn refuse_stalling(uri: &str, parsed: &url::Url) -> Result<(), RemoteError> {
    let scheme = parsed.scheme();
    let Some((driver, transport @ ("libssh" | "libssh2"))) = scheme.split_once('+') else {
        return Ok(());
    };
    // The same URI over `ssh`, without the parameters only libssh reads.
    let rest = uri.split_once(':').map_or("", |(_, rest)| rest);
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let name = pair.split_once('=').map_or(*pair, |(name, _)| name);
            !pair.is_empty() && !matches!(name, "sshauth" | "known_hosts_verify")
        })
        .collect();
    let ssh = match kept.join("&") {
        q if q.is_empty() => format!("{driver}+ssh:{path}"),
        q => format!("{driver}+ssh:{path}?{q}"),
    };
    Err(RemoteError::Stalls {
        uri: uri.to_owned(),
        ssh,
        transport: transport.to_owned(),
    })
}

/// [`host_login`] with this process's user and home: the login the harness makes to the host
/// (libvirt's OpenSSH client may take another from `~/.ssh/config`).
pub fn login_of(uri: &str) -> Result<Option<HostLogin>, RemoteError> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    // OpenSSH logs in as the effective uid's account where the URI names no user.
    let user = effective_user().or_else(|| std::env::var("USER").ok());
    host_login(uri, user.as_deref(), home.as_deref())
}

/// The usual private keys under `~/.ssh`, in the order OpenSSH tries them.
fn usual_keys(home: Option<&Path>) -> Vec<PathBuf> {
    let ssh_dir = home.unwrap_or(Path::new("/")).join(".ssh");
    ["id_ed25519", "id_ecdsa", "id_rsa"]
        .iter()
        .map(|name| ssh_dir.join(name))
        .collect()
}

/// A remote host's SSH login as the URI gives it, and as the harness's own client connects.
pub struct RemoteHost {
    /// The login, as the URI names it (what a human's OpenSSH client is given).
    pub login: HostLogin,
    /// The login read from its files and resolved (what the harness connects with).
    pub target: SshTarget,
}

/// The hop to the host `uri` names, read from its files (key, `known_hosts`) and resolved:
/// `None` for a local host. The host key is the one `known_hosts` records for it (Ed25519
/// first where several are). Blocking (files, the resolver).
pub fn ssh_hop(uri: &str) -> Result<Option<RemoteHost>, RemoteError> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let Some(login) = login_of(uri)? else {
        return Ok(None);
    };
    let key_path = match &login.keyfile {
        Some(path) => path.clone(),
        None => {
            let tried = usual_keys(home.as_deref());
            tried
                .iter()
                .find(|p| p.is_file())
                .cloned()
                .ok_or_else(|| RemoteError::NoKey {
                    uri: uri.to_owned(),
                    tried: tried.clone(),
                })?
        }
    };
    let key = read_key(&key_path)?;
    let host_key = pinned_key(&login)?;
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&(login.host.as_str(), login.port))
        .map_err(|e| RemoteError::Resolve {
            host: login.host.clone(),
            port: login.port,
            message: e.to_string(),
        })?
        .next()
        .ok_or_else(|| RemoteError::Resolve {
            host: login.host.clone(),
            port: login.port,
            message: "no address".to_owned(),
        })?;
    let target = SshTarget {
        addr,
        user: login.user.clone(),
        key: Arc::new(key),
        host_key,
        via: None,
    };
    Ok(Some(RemoteHost { login, target }))
}

/// The name of the effective uid's account, from the password database.
fn effective_user() -> Option<String> {
    let mut len = 1024;
    let mut buf;
    // SAFETY: a plain C struct, filled by getpwuid_r below before it is read.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    loop {
        buf = vec![0 as libc::c_char; len];
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is to a live local of the size given; `found` is set to
        // `entry` or to null, and `pw_name` points into `buf`, which outlives its use here.
        let rc = unsafe {
            libc::getpwuid_r(
                libc::geteuid(),
                &mut entry,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        match rc {
            0 if !found.is_null() && !entry.pw_name.is_null() => break,
            libc::ERANGE if len < 1 << 20 => len *= 2,
            _ => return None,
        }
    }
    // SAFETY: a NUL-terminated string inside `buf` (see above).
    let name = unsafe { std::ffi::CStr::from_ptr(entry.pw_name) };
    Some(name.to_string_lossy().into_owned())
}

fn read_key(path: &Path) -> Result<PrivateKey, RemoteError> {
    let err = |message: String| RemoteError::Key {
        path: path.to_owned(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let key = PrivateKey::from_openssh(&text).map_err(|e| err(e.to_string()))?;
    if key.is_encrypted() {
        return Err(err("it is encrypted".to_owned()));
    }
    Ok(key)
}

/// The key `known_hosts` records for the login's host: Ed25519 where there is one.
fn pinned_key(login: &HostLogin) -> Result<PublicKey, RemoteError> {
    let keys =
        russh::keys::known_hosts::known_host_keys_path(&login.host, login.port, &login.known_hosts)
            .map_err(|e| RemoteError::KnownHosts {
                known_hosts: login.known_hosts.clone(),
                message: e.to_string(),
            })?;
    let mut keys: Vec<PublicKey> = keys.into_iter().map(|(_, key)| key).collect();
    keys.sort_by_key(|k| k.algorithm() != Algorithm::Ed25519);
    keys.into_iter()
        .next()
        .ok_or_else(|| RemoteError::NotPinned {
            host: login.host.clone(),
            port: login.port,
            known_hosts: login.known_hosts.clone(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login(uri: &str) -> Result<Option<HostLogin>, RemoteError> {
        host_login(uri, Some("tester"), Some(Path::new("/home/tester")))
    }

    #[test]
    fn a_local_uri_needs_no_hop() {
        for uri in [
            "qemu:///system",
            "qemu:///system?socket=/run/x/libvirt-sock",
            "qemu:///session",
            "test:///default",
            "qemu+unix:///system",
        ] {
            assert_eq!(login(uri).unwrap(), None, "{uri}");
        }
    }

    #[test]
    fn an_ssh_uri_gives_its_user_port_key_and_known_hosts() {
        let l = login(
            "qemu+ssh://root@kvm.example:2222/system?keyfile=/k/id&known_hosts=/k/kh&no_tty=1",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            l,
            HostLogin {
                host: "kvm.example".into(),
                port: 2222,
                user: "root".into(),
                keyfile: Some("/k/id".into()),
                known_hosts: "/k/kh".into(),
            }
        );
        let l = login("qemu+ssh://kvm.example/system").unwrap().unwrap();
        assert_eq!(
            (l.port, l.user.as_str(), l.keyfile, l.known_hosts),
            (
                22,
                "tester",
                None,
                PathBuf::from("/home/tester/.ssh/known_hosts")
            )
        );
    }

    /// As libvirt reads them: `%XX` decoded, a `+` kept; an IPv6 host without its brackets.
    #[test]
    fn parameters_and_users_are_decoded_as_libvirt_decodes_them() {
        let l = login("qemu+ssh://ci%2Dbot@[fd00::5]/system?keyfile=/k/a+b%20c")
            .unwrap()
            .unwrap();
        assert_eq!(
            (l.user.as_str(), l.host.as_str(), l.keyfile),
            ("ci-bot", "fd00::5", Some(PathBuf::from("/k/a+b c")))
        );
        let e = login("qemu+tls://[fd00::5]/system").unwrap_err();
        assert!(
            e.to_string().contains("use qemu+ssh://[fd00::5]/system"),
            "{e}"
        );
    }

    #[test]
    fn a_remote_uri_that_ssh_cannot_follow_or_check_is_refused_with_the_fix() {
        let e = login("qemu+tls://kvm.example/system").unwrap_err();
        assert!(
            e.to_string().contains("use qemu+ssh://kvm.example/system"),
            "{e}"
        );
        let e = login("qemu://kvm.example/system").unwrap_err();
        assert!(matches!(e, RemoteError::Transport { .. }), "{e}");
        for (uri, instead) in [
            (
                "qemu+libssh://root@kvm.example:2222/system?keyfile=/k&known_hosts=/kh&known_hosts_verify=normal&sshauth=privkey",
                "qemu+ssh://root@kvm.example:2222/system?keyfile=/k&known_hosts=/kh",
            ),
            (
                "QEMU+LIBSSH2://[fd00::5]/system",
                "qemu+ssh://[fd00::5]/system",
            ),
            ("qemu+libssh:///system", "qemu+ssh:///system"),
        ] {
            let e = login(uri).unwrap_err();
            assert!(matches!(e, RemoteError::Stalls { .. }), "{e}");
            assert!(
                e.to_string().contains(&format!("use {instead:?} instead")),
                "{e}"
            );
            assert!(
                refuse_stalling_transport(uri).is_err(),
                "refused before connecting: {uri}"
            );
        }
        assert!(refuse_stalling_transport("qemu+ssh://kvm.example/system").is_ok());
        for option in ["no_verify=1", "known_hosts_verify=ignore"] {
            let e = login(&format!("qemu+ssh://root@kvm.example/system?{option}")).unwrap_err();
            assert!(e.to_string().contains(&format!("remove {option}")), "{e}");
        }
        let e = host_login("qemu+ssh://kvm.example/system", None, None).unwrap_err();
        assert!(e.to_string().contains("qemu+ssh://USER@HOST/system"), "{e}");
        let e = login("not a uri").unwrap_err();
        assert!(matches!(e, RemoteError::Uri { .. }), "{e}");
    }
}
