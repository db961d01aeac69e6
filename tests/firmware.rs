//! aarch64 UEFI firmware discovery with real files in temp dirs, and its volumes (CODE padded
//! to the pflash size, a VARS per VM) in a real libvirt pool.

mod common;

use common::PrivateLibvirtd;
use devicelab::host::libvirt::Libvirt;
use devicelab::host::pool::{Access, Pool};
use devicelab::image::firmware::{
    CANDIDATES, FirmwareError, FirmwarePair, PADDED_SUFFIX, PFLASH_SIZE, code_volume, discover_in,
};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

fn put(root: &Path, path: &str, bytes: &[u8]) {
    let p = root.join(path.trim_start_matches('/'));
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, bytes).unwrap();
}

#[test]
fn every_distro_layout_is_found() {
    for (code, vars) in CANDIDATES {
        let root = tempfile::tempdir().unwrap();
        put(root.path(), code, b"code");
        put(root.path(), vars, b"vars");
        let fw = discover_in(root.path(), CANDIDATES).unwrap();
        assert!(
            fw.code.ends_with(code.trim_start_matches('/')),
            "{code}: {fw:?}"
        );
        assert!(
            fw.vars.ends_with(vars.trim_start_matches('/')),
            "{vars}: {fw:?}"
        );
    }
}

#[test]
fn probe_order_wins_when_several_are_installed() {
    let root = tempfile::tempdir().unwrap();
    for (code, vars) in CANDIDATES.iter().rev() {
        put(root.path(), code, b"c");
        put(root.path(), vars, b"v");
    }
    let fw = discover_in(root.path(), CANDIDATES).unwrap();
    assert!(fw.code.ends_with(CANDIDATES[0].0.trim_start_matches('/')));
}

#[test]
fn a_code_file_without_its_vars_is_not_a_pair() {
    let root = tempfile::tempdir().unwrap();
    put(root.path(), "/usr/share/AAVMF/AAVMF_CODE.fd", b"c");
    assert!(matches!(
        discover_in(root.path(), CANDIDATES),
        Err(FirmwareError::NotFound { .. })
    ));
}

#[test]
fn a_miss_lists_every_path_probed_and_how_to_install() {
    let root = tempfile::tempdir().unwrap();
    let msg = discover_in(root.path(), CANDIDATES)
        .unwrap_err()
        .to_string();
    for (code, vars) in CANDIDATES {
        assert!(
            msg.contains(code.trim_start_matches('/')),
            "{code} missing from: {msg}"
        );
        assert!(
            msg.contains(vars.trim_start_matches('/')),
            "{vars} missing from: {msg}"
        );
    }
    for install in [
        "pacman -S edk2-aarch64",
        "apt install qemu-efi-aarch64",
        "dnf install edk2-aarch64",
    ] {
        assert!(msg.contains(install), "{install} missing from: {msg}");
    }
}

fn pair(dir: &Path, code_len: u64) -> FirmwarePair {
    let code = dir.join("QEMU_EFI.fd");
    let mut content: Vec<u8> = (0..code_len.min(4096))
        .map(|i| (i % 253) as u8 + 1)
        .collect();
    content.resize(code_len as usize, 0);
    std::fs::write(&code, &content).unwrap();
    let vars = dir.join("QEMU_VARS.fd");
    std::fs::write(&vars, vec![0u8; 4096]).unwrap();
    FirmwarePair { code, vars }
}

/// A pool in a libvirtd of the test's own (the volumes go through it as to any host's).
fn private_pool() -> (PrivateLibvirtd, Libvirt, Pool) {
    let daemon = PrivateLibvirtd::start();
    let lv = Libvirt::open(&daemon.uri()).unwrap();
    let pool = Pool::ensure(&lv, &daemon.dir.path().join("data/pool")).unwrap();
    (daemon, lv, pool)
}

#[test]
fn code_is_padded_into_a_sparse_volume_once_per_firmware() {
    let (_daemon, _lv, pool) = private_pool();
    let src = tempfile::tempdir().unwrap();
    let fw = pair(src.path(), 2 * 1024 * 1024);
    let padded = pool.firmware_code(&fw).unwrap();
    assert!(padded.starts_with(&pool.dir), "{}", padded.display());
    assert!(
        padded.to_string_lossy().ends_with(PADDED_SUFFIX),
        "{}",
        padded.display()
    );
    let meta = std::fs::metadata(&padded).unwrap();
    assert_eq!(meta.len(), PFLASH_SIZE);
    assert_eq!(meta.permissions().mode() & 0o777, 0o644);
    assert!(
        meta.blocks() * 512 < PFLASH_SIZE / 2,
        "padding must be sparse ({} blocks)",
        meta.blocks()
    );
    let original = std::fs::read(&fw.code).unwrap();
    let bytes = std::fs::read(&padded).unwrap();
    assert_eq!(&bytes[..original.len()], &original[..]);
    assert!(bytes[original.len()..].iter().all(|b| *b == 0));

    let mtime = meta.modified().unwrap();
    assert_eq!(pool.firmware_code(&fw).unwrap(), padded);
    assert_eq!(
        std::fs::metadata(&padded).unwrap().modified().unwrap(),
        mtime,
        "reused, not sent again"
    );

    // The distro updated the firmware: new bytes, a new volume of their own.
    let mut newer = original.clone();
    newer[0] = 0xEE;
    std::fs::write(&fw.code, &newer).unwrap();
    let again = pool.firmware_code(&fw).unwrap();
    assert_ne!(again, padded);
    assert_eq!(
        std::fs::read(&again).unwrap()[0],
        0xEE,
        "padded from the new bytes"
    );
    let exact = pair(src.path(), PFLASH_SIZE);
    let whole = pool.firmware_code(&exact).unwrap();
    assert_eq!(
        std::fs::read(&whole).unwrap(),
        std::fs::read(&exact.code).unwrap()
    );
    let volumes = pool.volumes().unwrap();
    assert_eq!(
        volumes
            .iter()
            .filter(|v| v.ends_with(PADDED_SUFFIX))
            .count(),
        3,
        "one volume per firmware: {volumes:?}"
    );
    assert!(
        !volumes.iter().any(|v| v.starts_with("devicelab-upload-")),
        "no upload left: {volumes:?}"
    );
}

#[test]
fn larger_code_is_refused() {
    let src = tempfile::tempdir().unwrap();
    let fw = pair(src.path(), PFLASH_SIZE + 1);
    let err = code_volume(&fw).unwrap_err();
    assert!(
        matches!(err, FirmwareError::TooLarge { size, .. } if size == PFLASH_SIZE + 1),
        "{err}"
    );
}

#[test]
fn each_vm_gets_its_own_vars_volume() {
    let (_daemon, _lv, pool) = private_pool();
    let src = tempfile::tempdir().unwrap();
    let fw = pair(src.path(), 1024);
    std::fs::set_permissions(&fw.vars, std::fs::Permissions::from_mode(0o444)).unwrap();
    let a = pool
        .upload("a-VARS.fd", &fw.vars, 0, Access::Private)
        .unwrap();
    let b = pool
        .upload("b-VARS.fd", &fw.vars, 0, Access::Private)
        .unwrap();
    assert_ne!(a, b);
    for p in [&a, &b] {
        assert_eq!(std::fs::read(p).unwrap(), std::fs::read(&fw.vars).unwrap());
        assert_eq!(
            std::fs::metadata(p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
