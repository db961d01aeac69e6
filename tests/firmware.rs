//! aarch64 UEFI firmware discovery and pflash padding, with real files in temp dirs.

use devicelab::image::firmware::{
    CANDIDATES, FirmwareError, FirmwarePair, PFLASH_SIZE, discover_in, padded_code, vars_copy,
};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime};

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

#[test]
fn exactly_64_mib_is_used_as_is() {
    let src = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let fw = pair(src.path(), PFLASH_SIZE);
    assert_eq!(padded_code(&fw, cache.path()).unwrap(), fw.code);
    assert_eq!(
        std::fs::read_dir(cache.path()).unwrap().count(),
        0,
        "no copy"
    );
}

#[test]
fn smaller_code_is_padded_once_sparsely_and_reused() {
    let src = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let fw = pair(src.path(), 2 * 1024 * 1024);
    let padded = padded_code(&fw, cache.path()).unwrap();
    assert_ne!(padded, fw.code);
    assert!(padded.starts_with(cache.path()));
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
    assert_eq!(padded_code(&fw, cache.path()).unwrap(), padded);
    assert_eq!(
        std::fs::metadata(&padded).unwrap().modified().unwrap(),
        mtime,
        "reused, not rewritten"
    );
}

#[test]
fn a_stale_cache_is_padded_again() {
    let src = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let fw = pair(src.path(), 1024 * 1024);
    let padded = padded_code(&fw, cache.path()).unwrap();
    // The distro updated the firmware: the source is now newer than the cached copy.
    let mut newer = std::fs::read(&fw.code).unwrap();
    newer[0] = 0xEE;
    std::fs::write(&fw.code, &newer).unwrap();
    let future = SystemTime::now() + Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(&fw.code)
        .unwrap()
        .set_modified(future)
        .unwrap();
    let again = padded_code(&fw, cache.path()).unwrap();
    assert_eq!(again, padded);
    assert_eq!(
        std::fs::read(&again).unwrap()[0],
        0xEE,
        "re-padded from the new source"
    );
}

#[test]
fn larger_code_is_refused() {
    let src = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let fw = pair(src.path(), PFLASH_SIZE + 1);
    let err = padded_code(&fw, cache.path()).unwrap_err();
    assert!(
        matches!(err, FirmwareError::TooLarge { size, .. } if size == PFLASH_SIZE + 1),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);
}

#[test]
fn each_vm_gets_its_own_vars_copy() {
    let src = tempfile::tempdir().unwrap();
    let pool = tempfile::tempdir().unwrap();
    let fw = pair(src.path(), 1024);
    std::fs::set_permissions(&fw.vars, std::fs::Permissions::from_mode(0o444)).unwrap();
    let a = vars_copy(&fw, &pool.path().join("a-VARS.fd")).unwrap();
    let b = vars_copy(&fw, &pool.path().join("b-VARS.fd")).unwrap();
    assert_ne!(a, b);
    for p in [&a, &b] {
        assert_eq!(std::fs::read(p).unwrap(), std::fs::read(&fw.vars).unwrap());
        assert_eq!(
            std::fs::metadata(p).unwrap().permissions().mode() & 0o777,
            0o644
        );
    }
}
