//! The SSH client against a real OpenSSH sshd started on 127.0.0.1 by the test, with a host key
//! and an authorized key the harness generated.

mod common;

use devicelab::ssh::keys::{ClientKey, HostKey};
use devicelab::ssh::session::{SshError, SshSession, SshTarget};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

struct Sshd {
    /// Accepts connections on the port the test bound (and keeps) and hands each to
    /// `sshd -i`: no port is picked, freed and bound again later by someone else.
    acceptor: tokio::task::JoinHandle<()>,
    addr: SocketAddr,
    host_key: HostKey,
    client: ClientKey,
    _dir: tempfile::TempDir,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

fn user() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| {
            let out = Command::new("id").arg("-un").output().unwrap();
            String::from_utf8(out.stdout).unwrap().trim().to_owned()
        })
}

async fn start_sshd() -> Sshd {
    devicelab::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let host_key = HostKey::generate("test-host").unwrap();
    let host_key_path = dir.path().join("host_ed25519");
    std::fs::write(&host_key_path, &host_key.private_openssh).unwrap();
    std::fs::set_permissions(&host_key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let client = ClientKey::load_or_generate(&dir.path().join("keys")).unwrap();
    let authorized = dir.path().join("authorized_keys");
    std::fs::write(&authorized, format!("{}\n", client.public_line)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = dir.path().join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "HostKey {}\nAuthorizedKeysFile {}\nPidFile none\n\
             UsePAM no\nStrictModes no\nPasswordAuthentication no\nPermitRootLogin prohibit-password\n",
            host_key_path.display(),
            authorized.display()
        ),
    )
    .unwrap();
    let _ = std::fs::create_dir_all("/run/sshd"); // privilege separation dir (Debian)
    let sshd = common::require(
        "sshd",
        "apt install openssh-server (fixtures/host/setup.sh)",
    );
    // Fails here, clearly, if sshd cannot run with this configuration.
    let check = Command::new(&sshd)
        .args(["-t", "-f"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "sshd -t: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let acceptor = tokio::spawn(async move {
        // Held by the task: aborting it (the drop) kills every sshd it started.
        let mut sessions = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            let stream = stream.into_std().unwrap();
            stream.set_nonblocking(false).unwrap();
            let input = stream.try_clone().unwrap();
            // Inetd mode: this connection is sshd's stdin and stdout; it exits with it.
            let session = tokio::process::Command::new(&sshd)
                .args(["-i", "-f"])
                .arg(&config)
                .stdin(Stdio::from(std::os::fd::OwnedFd::from(input)))
                .stdout(Stdio::from(std::os::fd::OwnedFd::from(stream)))
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn();
            sessions.extend(session.ok());
        }
    });
    Sshd {
        acceptor,
        addr,
        host_key,
        client,
        _dir: dir,
    }
}

fn target(sshd: &Sshd) -> SshTarget {
    SshTarget {
        addr: sshd.addr,
        user: user(),
        key: sshd.client.private.clone(),
        host_key: sshd.host_key.public.clone(),
    }
}

#[test_log::test(tokio::test)]
async fn exec_returns_status_stdout_and_stderr() {
    let sshd = start_sshd().await;
    let s = SshSession::connect(&target(&sshd), Duration::from_secs(10))
        .await
        .unwrap();
    let out = s.exec("echo out; echo err >&2; exit 3").await.unwrap();
    assert_eq!(out.exit_status, Some(3));
    assert_eq!(out.stdout, "out\n");
    assert_eq!(out.stderr, "err\n");
    assert!(!out.success());
    let ok = s.exec("true").await.unwrap();
    assert!(ok.success());
}

#[test_log::test(tokio::test)]
async fn a_hung_command_times_out_and_the_session_stays_usable() {
    let sshd = start_sshd().await;
    let s = SshSession::connect(&target(&sshd), Duration::from_secs(10))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let err = s
        .exec_within("sleep 60", None, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            devicelab::ssh::session::SshError::CommandTimeout { .. }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("`sleep 60`"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "gave up on time"
    );
    let out = s
        .exec_within("echo still here", None, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(out.stdout, "still here\n");
}

#[test_log::test(tokio::test)]
async fn large_output_is_drained_completely() {
    let sshd = start_sshd().await;
    let s = SshSession::connect(&target(&sshd), Duration::from_secs(10))
        .await
        .unwrap();
    let out = s
        .exec("head -c 3000000 /dev/zero | tr '\\0' x")
        .await
        .unwrap();
    assert_eq!(out.stdout.len(), 3_000_000);
    assert_eq!(out.exit_status, Some(0));
}

#[test_log::test(tokio::test)]
async fn stdin_is_delivered_then_closed() {
    let sshd = start_sshd().await;
    let s = SshSession::connect(&target(&sshd), Duration::from_secs(10))
        .await
        .unwrap();
    let out = s
        .exec_with_input("wc -c", Some(&[7u8; 100_000]))
        .await
        .unwrap();
    assert_eq!(out.stdout.trim(), "100000");
}

#[test_log::test(tokio::test)]
async fn upload_writes_contents_and_mode_atomically() {
    let sshd = start_sshd().await;
    let s = SshSession::connect(&target(&sshd), Duration::from_secs(10))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("it's here.bin");
    let data: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let out = s
        .upload(&data, dest.to_str().unwrap(), 0o640, false)
        .await
        .unwrap();
    assert!(out.success(), "{out:?}");
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    assert_eq!(
        std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
        0o640
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temp file left behind"
    );
}

#[test_log::test(tokio::test)]
async fn a_different_host_key_is_refused() {
    let sshd = start_sshd().await;
    let mut t = target(&sshd);
    t.host_key = HostKey::generate("impostor").unwrap().public;
    let err = SshSession::connect(&t, Duration::from_secs(10))
        .await
        .err()
        .expect("must fail");
    assert!(matches!(err, SshError::HostKeyMismatch { .. }), "{err}");
    assert!(err.to_string().contains("SHA256:"), "{err}");
}

#[test_log::test(tokio::test)]
async fn an_unauthorized_client_key_is_rejected() {
    let sshd = start_sshd().await;
    let other = tempfile::tempdir().unwrap();
    let mut t = target(&sshd);
    t.key = ClientKey::load_or_generate(other.path()).unwrap().private;
    let err = SshSession::connect(&t, Duration::from_secs(10))
        .await
        .err()
        .expect("must fail");
    assert!(matches!(err, SshError::AuthRejected { .. }), "{err}");
}
