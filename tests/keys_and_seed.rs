//! SSH key generation and the NoCloud seed volume, read back with real tools (ssh-keygen; blkid
//! and mtools for the FAT seed: fixtures/host/setup.sh installs them).

mod common;

use devicelab::VirtualMachineSpec;
use devicelab::VmArchitecture;
use devicelab::ssh::keys::{ClientKey, HostKey, KeyError};
use devicelab::vm::seed::{Seed, evidence_bootcmd};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

#[test]
fn client_key_is_generated_once_private_and_valid_for_openssh() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let a = ClientKey::load_or_generate(&keys).unwrap();
    let b = ClientKey::load_or_generate(&keys).unwrap();
    assert_eq!(
        a.public_line, b.public_line,
        "the second call loads the same key"
    );
    assert!(a.public_line.starts_with("ssh-ed25519 "));
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&a.path), 0o600);
    assert_eq!(mode(&keys), 0o700);
    // OpenSSH itself derives the same public key from the private file.
    let out = Command::new(common::require(
        "ssh-keygen",
        "apt install openssh-client (fixtures/host/setup.sh)",
    ))
    .arg("-y")
    .arg("-f")
    .arg(&a.path)
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let derived = String::from_utf8(out.stdout).unwrap();
    let fields = |s: &str| {
        s.split_whitespace()
            .take(2)
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(fields(&derived), fields(&a.public_line));
}

/// Several test processes start at once on a fresh data dir: one key wins, and the `.pub`
/// beside it is that key's, whoever wrote it (repeated: the race is not always lost).
#[test]
fn racing_generators_agree_on_one_key_and_its_pub_file() {
    for _ in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        let lines: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..6)
                .map(|_| s.spawn(|| ClientKey::load_or_generate(&keys).unwrap().public_line))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(
            lines.iter().all(|l| l == &lines[0]),
            "one key for all: {lines:?}"
        );
        let on_disk = std::fs::read_to_string(keys.join("id_ed25519.pub")).unwrap();
        assert_eq!(on_disk.trim(), lines[0], "the .pub is the winning key's");
    }
}

#[test]
fn a_world_readable_key_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let key = ClientKey::load_or_generate(dir.path()).unwrap();
    std::fs::set_permissions(&key.path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = ClientKey::load_or_generate(dir.path())
        .err()
        .expect("must refuse");
    assert!(matches!(err, KeyError::Permissions { .. }));
    assert!(err.to_string().contains("chmod 600"), "{err}");
}

#[test]
fn host_keys_differ_per_vm() {
    let a = HostKey::generate("a").unwrap();
    let b = HostKey::generate("b").unwrap();
    assert_ne!(a.public_line, b.public_line);
    assert!(
        a.private_openssh
            .starts_with("-----BEGIN OPENSSH PRIVATE KEY-----")
    );
    assert!(
        a.known_hosts_line("10.0.0.1")
            .starts_with("10.0.0.1 ssh-ed25519 ")
    );
}

#[test]
fn seed_image_is_a_vfat_volume_labelled_cidata_carrying_the_cloud_config() {
    let dir = tempfile::tempdir().unwrap();
    let spec = VirtualMachineSpec::new("devicelab-seed-test", VmArchitecture::X86_64);
    let host = HostKey::generate("h").unwrap();
    let seed = Seed::new(
        &spec,
        "ssh-ed25519 AAAAC3Nza test@client",
        &host,
        "devicelab-seed-test-1",
    );
    let image = dir.path().join("seed.img");
    seed.write_image(&image).unwrap();

    // What the guest's blkid (and so cloud-init's ds-identify) sees.
    let probe = Command::new(common::require("blkid", "apt install util-linux"))
        .args(["-p", "-o", "export"])
        .arg(&image)
        .output()
        .unwrap();
    let probe = String::from_utf8_lossy(&probe.stdout);
    assert!(
        probe.contains("TYPE=vfat") && probe.contains("LABEL=CIDATA"),
        "{probe}"
    );
    // Read back by another FAT implementation (mtools).
    let read = |name: &str| {
        let out = Command::new(common::require("mtype", "apt install mtools"))
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(&image)
            .arg(format!("::{name}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let (user_data, meta_data) = (read("user-data"), read("meta-data"));
    assert!(user_data.starts_with("#cloud-config\n"));
    let config: serde_json::Value =
        serde_json::from_str(user_data.trim_start_matches("#cloud-config\n")).unwrap();
    assert_eq!(config["users"][0]["name"], "devicelab");
    assert_eq!(
        config["users"][0]["ssh_authorized_keys"][0],
        "ssh-ed25519 AAAAC3Nza test@client"
    );
    assert_eq!(
        config["ssh_keys"]["ed25519_public"],
        host.public_line.as_str()
    );
    assert_eq!(config["ssh_pwauth"], false);
    let meta: serde_json::Value = serde_json::from_str(&meta_data).unwrap();
    assert_eq!(meta["instance-id"], "devicelab-seed-test-1");
    assert_eq!(meta["local-hostname"], "devicelab-seed-test");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no staging files left, only the image"
    );
}

#[test]
fn invalid_specs_say_what_is_wrong() {
    let bad = VirtualMachineSpec::new("Bad_Name", VmArchitecture::X86_64);
    assert!(bad.validate().unwrap_err().to_string().contains("Bad_Name"));
    let tiny = VirtualMachineSpec::new("ok", VmArchitecture::X86_64).with_memory_mib(64);
    assert!(
        tiny.validate()
            .unwrap_err()
            .to_string()
            .contains("memory_mib must be at least 512")
    );
}

#[test]
fn the_seed_makes_the_guest_name_empty_access_files_on_every_boot() {
    let spec = VirtualMachineSpec::new("devicelab-seed-test", VmArchitecture::X86_64);
    let host = HostKey::generate("h").unwrap();
    let seed = Seed::new(&spec, "ssh-ed25519 AAAAC3Nza t@c", &host, "id-1");
    let config: serde_json::Value =
        serde_json::from_str(seed.user_data.trim_start_matches("#cloud-config\n")).unwrap();
    let script = evidence_bootcmd();
    assert_eq!(config["bootcmd"], serde_json::json!([script.as_str()]));

    // A spec that sets the writeback delay gets it first, before anything else cloud-init does.
    let slow = spec
        .clone()
        .with_writeback_delay(std::time::Duration::from_secs(300));
    let seed = Seed::new(&slow, "ssh-ed25519 AAAAC3Nza t@c", &host, "id-2");
    let config: serde_json::Value =
        serde_json::from_str(seed.user_data.trim_start_matches("#cloud-config\n")).unwrap();
    assert_eq!(
        config["bootcmd"],
        serde_json::json!(["sysctl -w vm.dirty_expire_centisecs=30000", script.as_str()])
    );

    // The script itself, run by sh against a directory standing in for /etc/ssh and /home:
    // an empty key is named, a full one and a missing one are not.
    let root = tempfile::tempdir().unwrap();
    let etc_ssh = root.path().join("etc/ssh");
    let ssh_dir = root.path().join("home/devicelab/.ssh");
    std::fs::create_dir_all(&etc_ssh).unwrap();
    std::fs::create_dir_all(&ssh_dir).unwrap();
    std::fs::write(etc_ssh.join("ssh_host_ed25519_key"), "").unwrap();
    std::fs::write(etc_ssh.join("ssh_host_ed25519_key.pub"), "ssh-ed25519 AAAA").unwrap();
    std::fs::write(ssh_dir.join("authorized_keys"), "").unwrap();
    let root_s = root.path().display().to_string();
    let local = script
        .replace("/etc/ssh", &format!("{root_s}/etc/ssh"))
        .replace("/home", &format!("{root_s}/home"))
        .replace(">/dev/console", "");
    let out = Command::new("sh").args(["-c", &local]).output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "devicelab-evidence: {root_s}/etc/ssh/ssh_host_ed25519_key is empty (0 bytes)\n\
             devicelab-evidence: {root_s}/home/devicelab/.ssh/authorized_keys is empty (0 bytes)\n"
        )
    );
}
