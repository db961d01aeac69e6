//! The SSH client against a real OpenSSH sshd started on 127.0.0.1 by the test, with a host key
//! and an authorized key the harness generated.

mod common;

use common::{Sshd, user};
use devicelab::ssh::keys::{ClientKey, HostKey};
use devicelab::ssh::session::{SshError, SshSession, SshTarget};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

async fn start_sshd() -> Sshd {
    Sshd::start(&[]).await
}

fn target(sshd: &Sshd) -> SshTarget {
    SshTarget {
        addr: sshd.addr,
        user: user(),
        key: sshd.client.private.clone(),
        host_key: sshd.host_key.public.clone(),
        via: None,
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

/// A guest whose address does not route from here is reached through its host: a `direct-tcpip`
/// channel of a session to the host, each hop's host key checked, the error naming the hop
/// whose key was wrong.
#[test_log::test(tokio::test)]
async fn a_guest_is_reached_through_its_host_each_hop_verified() {
    let (host, guest) = (start_sshd().await, start_sshd().await);
    let through = |host_key: HostKey, guest_key: HostKey| SshTarget {
        host_key: guest_key.public,
        via: Some(Box::new(SshTarget {
            host_key: host_key.public,
            ..target(&host)
        })),
        ..target(&guest)
    };
    let s = SshSession::connect(
        &through(host.host_key.clone(), guest.host_key.clone()),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let out = s.exec("echo through").await.unwrap();
    assert_eq!(out.stdout, "through\n");
    assert_eq!(host.sessions(), 1, "the host carried it");
    assert_eq!(guest.sessions(), 1);

    for (host_key, guest_key, wrong) in [
        (
            HostKey::generate("impostor").unwrap(),
            guest.host_key.clone(),
            host.addr,
        ),
        (
            host.host_key.clone(),
            HostKey::generate("impostor").unwrap(),
            guest.addr,
        ),
    ] {
        let err = SshSession::connect(&through(host_key, guest_key), Duration::from_secs(10))
            .await
            .err()
            .expect("a host key that is not the expected one is refused");
        assert!(
            matches!(&err, SshError::HostKeyMismatch { addr, .. } if *addr == wrong),
            "{err}"
        );
    }
}
