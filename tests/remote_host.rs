//! A libvirt host reached the way a remote one is: `qemu+libssh://` through a real sshd, with
//! the harness's key and a pinned `known_hosts`. The host is a libvirtd of the test's own in
//! namespaces of its own, with files of its own; each SSH session runs in its mount namespace,
//! so what answers over SSH is that libvirtd, not this machine's, and a file written here does
//! not reach it. The VM's disks go to its pool through libvirt.

mod common;

use common::{PrivateLibvirtd, Sshd, require};
use devicelab::host::libvirt::Libvirt;
use devicelab::host::pool::{BASE_PREFIX, Pool};
use devicelab::image::{BaseImage, DiskFormat};
use devicelab::ssh::keys::HostKey;
use std::ffi::OsString;
use std::path::Path;

/// The private libvirtd, and an sshd whose sessions run in its mount namespace.
async fn remote() -> (PrivateLibvirtd, Sshd) {
    let daemon = tokio::task::spawn_blocking(PrivateLibvirtd::apart)
        .await
        .unwrap();
    let nsenter = require("nsenter", "apt install util-linux");
    let wrap: Vec<OsString> = vec![
        nsenter.into(),
        "-t".into(),
        daemon.pid().to_string().into(),
        "-m".into(),
        "--".into(),
    ];
    (daemon, Sshd::start(&wrap).await)
}

/// `qemu+libssh://` to `sshd`, authenticating with its client key, verifying its host key
/// against a `known_hosts` that pins `pinned`.
fn uri(sshd: &Sshd, pinned: &HostKey, dir: &Path) -> String {
    let known_hosts = dir.join("known_hosts");
    std::fs::write(
        &known_hosts,
        format!(
            "[{}]:{} {}\n",
            sshd.addr.ip(),
            sshd.addr.port(),
            pinned.public_line
        ),
    )
    .unwrap();
    format!(
        "qemu+libssh://root@{}:{}/system?keyfile={}&known_hosts={}&known_hosts_verify=normal&sshauth=privkey",
        sshd.addr.ip(),
        sshd.addr.port(),
        sshd.client.path.display(),
        known_hosts.display()
    )
}

#[test_log::test(tokio::test(flavor = "multi_thread"))]
async fn a_host_over_ssh_gets_the_disks_through_libvirt_and_a_wrong_host_key_is_refused() {
    let (daemon, sshd) = remote().await;
    let local = tempfile::tempdir().unwrap();
    let good = uri(&sshd, &sshd.host_key, local.path());
    let pool_dir = daemon.dir.path().join("data/pool");
    let src = tempfile::tempdir().unwrap();
    let bytes: Vec<u8> = (0..2 * 1024 * 1024u32).map(|i| (i % 241) as u8).collect();
    std::fs::write(src.path().join("base.img"), &bytes).unwrap();
    let base = BaseImage {
        path: src.path().join("base.img"),
        format: DiskFormat::Raw,
        cached: false,
        digest: common::sha256_hex(&bytes),
    };
    let (overlay, volumes, local_volumes) = tokio::task::spawn_blocking(move || {
        let lv = Libvirt::open(&good).unwrap_or_else(|e| panic!("{good}: {e}"));
        let pool = Pool::ensure(&lv, &pool_dir).unwrap();
        let overlay = pool.create_overlay("remote-vm.qcow2", &base, 1).unwrap();
        let local = common::system_libvirt()
            .conn()
            .unwrap()
            .lookup_storage_pool_by_name("devicelab")
            .and_then(|p| p.list_volumes())
            .unwrap_or_default();
        (overlay, pool.volumes().unwrap(), local)
    })
    .await
    .unwrap();
    // The host's path for it; the files are where the host keeps them, not at that path here.
    assert!(
        overlay.starts_with(daemon.dir.path().join("data/pool")),
        "{}",
        overlay.display()
    );
    let theirs = daemon.dir.path().join("host-data/pool");
    let mut volumes = volumes;
    volumes.sort();
    assert_eq!(
        volumes.len(),
        2,
        "the overlay and the base image: {volumes:?}"
    );
    assert!(volumes[0].starts_with(BASE_PREFIX), "{volumes:?}");
    assert_eq!(
        std::fs::read(theirs.join(&volumes[0])).unwrap(),
        bytes,
        "the base image, sent over SSH"
    );
    assert!(theirs.join("remote-vm.qcow2").is_file());
    assert!(
        !daemon.dir.path().join("data/pool/remote-vm.qcow2").exists(),
        "nothing of the host's is written on this side"
    );
    assert!(
        !local_volumes.contains(&"remote-vm.qcow2".to_owned()),
        "this machine's libvirt has none of it"
    );

    // The same host behind a host key the known_hosts does not pin: refused, and said why.
    let impostor = HostKey::generate("impostor").unwrap();
    let bad = uri(&sshd, &impostor, local.path());
    let err = tokio::task::spawn_blocking(move || Libvirt::open(&bad).err())
        .await
        .unwrap()
        .expect("a host key that is not the pinned one is refused");
    let msg = err.to_string();
    assert!(
        msg.to_lowercase().contains("host key") || msg.contains("known_hosts"),
        "{msg}"
    );
}
