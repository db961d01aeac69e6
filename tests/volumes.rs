//! A VM's disks as volumes of a libvirt pool, every byte sent through libvirt: the base image
//! once per host and digest, checked as it is sent, and an upload whose process died reaped.
//! Each "host" is a libvirtd of the test's own.

mod common;

use common::{PrivateLibvirtd, require};
use devicelab::host::libvirt::Libvirt;
use devicelab::host::pool::{Access, BASE_PREFIX, Pool, PoolError, machine_id, upload_prefix};
use devicelab::host::reaper::{self, DataDirs};
use devicelab::image::{BaseImage, DiskFormat};
use std::path::Path;

/// A libvirt host of the test's own, with the harness's pool.
struct Host {
    pool: Pool,
    libvirt: Libvirt,
    _daemon: PrivateLibvirtd,
}

fn host() -> Host {
    let daemon = PrivateLibvirtd::start();
    let libvirt = Libvirt::open(&daemon.uri()).unwrap();
    let pool = Pool::ensure(&libvirt, &daemon.dir.path().join("data/pool")).unwrap();
    Host {
        pool,
        libvirt,
        _daemon: daemon,
    }
}

/// A 2 MiB raw image in `dir`, its digest as given (the true one unless `digest` says otherwise).
fn image(dir: &Path, digest: Option<&str>) -> BaseImage {
    let bytes: Vec<u8> = (0..2 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let path = dir.join("base.img");
    std::fs::write(&path, &bytes).unwrap();
    BaseImage {
        path,
        format: DiskFormat::Raw,
        cached: false,
        digest: digest.map_or_else(|| common::sha256_hex(&bytes), str::to_owned),
    }
}

/// What `qemu-img info` says of the image at `path`.
fn info(path: &Path) -> serde_json::Value {
    let out = std::process::Command::new(require("qemu-img", "apt install qemu-utils"))
        .args(["info", "-U", "--output=json"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// What backs the qcow2 file at `path`.
fn backing_of(path: &Path) -> String {
    info(path)["backing-filename"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn named(pool: &Pool, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = pool
        .volumes()
        .unwrap()
        .into_iter()
        .filter(|v| v.starts_with(prefix))
        .collect();
    v.sort();
    v
}

#[test]
fn a_base_image_is_sent_once_per_host_and_digest() {
    let src = tempfile::tempdir().unwrap();
    let base = image(src.path(), None);
    let (one, two) = (host(), host());

    let a = one.pool.create_overlay("vm-a.qcow2", &base, 1).unwrap();
    let b = one.pool.create_overlay("vm-b.qcow2", &base, 1).unwrap();
    let on_one = named(&one.pool, BASE_PREFIX);
    assert_eq!(on_one.len(), 1, "one copy per host: {on_one:?}");
    let copy = one.pool.path_of(&on_one[0]);
    assert!(
        on_one[0].contains(&base.digest[..16]),
        "named for its digest: {on_one:?}"
    );
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        std::fs::read(&base.path).unwrap()
    );
    for overlay in [&a, &b] {
        assert_eq!(
            backing_of(overlay),
            copy.display().to_string(),
            "backed by the pool's copy"
        );
    }

    // Another host: a copy of its own, and the first host's is not touched.
    let c = two.pool.create_overlay("vm-c.qcow2", &base, 1).unwrap();
    let on_two = named(&two.pool, BASE_PREFIX);
    assert_eq!(on_two, on_one, "the same name on every host");
    assert_eq!(
        backing_of(&c),
        two.pool.path_of(&on_two[0]).display().to_string()
    );
    for h in [&one, &two] {
        assert_eq!(
            named(&h.pool, "devicelab-upload-"),
            Vec::<String>::new(),
            "no upload left"
        );
    }
}

/// A qcow2 base image (as cloud images are) stays a qcow2 image of the same size in the pool,
/// and the overlays over it say so.
#[test]
fn a_qcow2_base_stays_qcow2_in_the_pool() {
    let src = tempfile::tempdir().unwrap();
    let path = src.path().join("base.qcow2");
    let made = std::process::Command::new(require("qemu-img", "apt install qemu-utils"))
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg("64M")
        .status()
        .unwrap();
    assert!(made.success());
    let base = BaseImage {
        digest: common::sha256_hex(&std::fs::read(&path).unwrap()),
        path,
        format: DiskFormat::Qcow2,
        cached: false,
    };
    let h = host();
    let overlay = h.pool.create_overlay("vm.qcow2", &base, 1).unwrap();
    let copy = h.pool.path_of(&named(&h.pool, BASE_PREFIX)[0]);
    let theirs = info(&copy);
    assert_eq!(theirs["format"], "qcow2", "{theirs}");
    assert_eq!(theirs["virtual-size"], 64 * 1024 * 1024, "{theirs}");
    let ours = info(&overlay);
    assert_eq!(
        ours["backing-filename"],
        copy.display().to_string(),
        "{ours}"
    );
    assert_eq!(ours["backing-filename-format"], "qcow2", "{ours}");
}

#[test]
fn bytes_that_do_not_match_the_digest_are_not_kept() {
    let src = tempfile::tempdir().unwrap();
    let base = image(src.path(), Some(&"0".repeat(64)));
    let h = host();
    let err = h.pool.create_overlay("vm.qcow2", &base, 1).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PoolError::Changed { .. }), "{msg}");
    assert!(
        msg.contains(&base.path.display().to_string()),
        "names the file: {msg}"
    );
    assert!(
        msg.contains("run again once it is done"),
        "says what to do: {msg}"
    );
    assert_eq!(
        h.pool.volumes().unwrap(),
        Vec::<String>::new(),
        "nothing kept"
    );
}

#[test]
fn an_upload_whose_process_died_is_reaped_and_a_live_ones_kept() {
    let src = tempfile::tempdir().unwrap();
    let file = src.path().join("part");
    std::fs::write(&file, b"half of something").unwrap();
    let h = host();
    let mine = format!("{}base", upload_prefix(std::process::id()));
    let mut dead = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    let theirs = format!("devicelab-upload-{}-{dead_pid}-1-base", machine_id());
    // Another machine's, by a pid this one cannot see: not this machine's to judge.
    let elsewhere = format!("devicelab-upload-othermachine-{dead_pid}-1-base");
    for v in [&mine, &theirs, &elsewhere] {
        h.pool.upload(v, &file, 0, Access::Shared).unwrap();
    }

    let data = tempfile::tempdir().unwrap();
    let dirs = DataDirs {
        runs: data.path().join("runs"),
        warm: data.path().join("warm"),
    };
    let reaped = reaper::reap(&h.libvirt, &h.pool, &dirs, Path::new("true"));
    assert_eq!(reaped.uploads, vec![theirs]);
    let mut left = vec![mine, elsewhere];
    left.sort();
    assert_eq!(named(&h.pool, "devicelab-upload-"), left);
}
