//! `devicelab doctor`, run as a user runs it, on this host (all set after
//! `fixtures/host/setup.sh`) and on the same host with one piece taken away at a time: a
//! stopped libvirtd, a missing or inactive network, a binary hidden from PATH, a firmware file
//! that is not there. Each miss is a ✗ line that names its fix, every miss is listed (not the
//! first one only), and the exit status says whether anything is missing. `Lab::new` fails the
//! same way, once, listing every miss. `devicelab fetch` without a route to the mirror names
//! the mirror and the override variables. Needs the system libvirtd (like `bad_input`).

mod common;

use devicelab::config::HarnessConfig;
use devicelab::lab::LabError;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// Runs `devicelab <args>` with only the `DEVICELAB_*` variables given (and PATH, unless
/// `path` replaces it): its exit status and stdout + stderr.
fn devicelab(args: &[&str], vars: &[(&str, &str)], path: Option<&Path>) -> (bool, String) {
    let mut cmd = Command::new(common::devicelab_cli());
    cmd.args(args);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("DEVICELAB_") || k == "ARCH") {
        cmd.env_remove(k);
    }
    cmd.envs(vars.iter().copied());
    if let Some(path) = path {
        cmd.env("PATH", path);
    }
    let out = cmd.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    // Piped, not a terminal: plain text, no colour codes in a log.
    assert!(
        !text.contains('\u{1b}'),
        "escape sequences in piped output:\n{text:?}"
    );
    (out.status.success(), text)
}

/// The ✗ line (and its fix) about `what`, or a failure that shows the whole report.
fn miss<'a>(report: &'a str, what: &str) -> &'a str {
    marked(report, '✗', what)
}

/// The line marked `mark` (and its fix) about `what`, or a failure that shows the report.
fn marked<'a>(report: &'a str, mark: char, what: &str) -> &'a str {
    let start = report
        .find(&format!("{mark} {what}"))
        .unwrap_or_else(|| panic!("no {mark} for {what:?} in:\n{report}"));
    let rest = &report[start..];
    // The line and its "fix:" line.
    let end = rest
        .match_indices('\n')
        .nth(1)
        .map_or(rest.len(), |(i, _)| i);
    &rest[..end]
}

#[test]
fn after_setup_everything_is_there() {
    let (ok, report) = devicelab(&["doctor"], &[], None);
    assert!(
        ok,
        "doctor finds something missing on a set-up host:\n{report}"
    );
    assert!(!report.contains('✗'), "{report}");
    for what in [
        "libvirt",
        "network default",
        "network filters",
        "data dir",
        "free disk",
        "NATS",
        "x86_64: QEMU",
        "aarch64: QEMU",
        "aarch64: UEFI firmware",
    ] {
        assert!(report.contains(what), "{what} is checked:\n{report}");
    }
    assert!(report.contains("all set"), "{report}");
}

#[test]
fn a_stopped_libvirtd_and_a_missing_firmware_file_are_both_named_with_their_fixes() {
    let (ok, report) = devicelab(
        &["doctor", "--arch", "aarch64"],
        &[
            (
                "DEVICELAB_LIBVIRT_URI",
                "qemu:///system?socket=/nonexistent/libvirt-sock",
            ),
            ("DEVICELAB_UEFI_CODE", "/nonexistent/AAVMF_CODE.fd"),
            ("DEVICELAB_UEFI_VARS", "/nonexistent/AAVMF_VARS.fd"),
        ],
        None,
    );
    assert!(!ok, "a miss is a non-zero exit status:\n{report}");
    let libvirt = miss(&report, "libvirt");
    assert!(
        libvirt.contains("cannot connect") && libvirt.contains("libvirtd"),
        "{libvirt}"
    );
    let firmware = miss(&report, "aarch64: UEFI firmware");
    assert!(
        firmware.contains("/nonexistent/AAVMF_CODE.fd") && firmware.contains("DEVICELAB_UEFI_CODE"),
        "{firmware}"
    );
    // Other checks (free disk, the network) depend on the host the test runs
    // on; whatever they say, the total counts every ✗ line.
    let misses = report
        .lines()
        .filter(|line| line.trim_start().starts_with('✗'))
        .count();
    assert!(misses >= 2, "{report}");
    assert!(
        report.contains(&format!("{misses} missing")),
        "every miss is counted ({misses} ✗ lines):\n{report}"
    );
}

/// A remote host over a transport guest SSH cannot follow is a miss naming the URI to use.
#[test]
fn a_remote_host_over_tls_is_a_miss_naming_qemu_ssh() {
    let (ok, report) = devicelab(
        &["doctor", "--arch", "x86_64"],
        &[("DEVICELAB_LIBVIRT_URI", "qemu+tls://127.0.0.1/system")],
        None,
    );
    assert!(!ok, "{report}");
    let route = miss(&report, "guest route");
    assert!(route.contains("use qemu+ssh://127.0.0.1/system"), "{route}");
}

/// A URI over libvirt's libssh transport is a miss naming the same URI over `qemu+ssh://`, and
/// nothing connects over it (a connection to the port, where nothing listens, would be refused
/// and said so).
#[test]
fn a_host_over_libssh_is_a_miss_naming_qemu_ssh_before_anything_connects() {
    let (ok, report) = devicelab(
        &["doctor", "--arch", "x86_64"],
        &[(
            "DEVICELAB_LIBVIRT_URI",
            "qemu+libssh://root@127.0.0.1:1/system?keyfile=/k&sshauth=privkey",
        )],
        None,
    );
    assert!(!ok, "{report}");
    let route = miss(&report, "guest route");
    assert!(
        route.contains("use \"qemu+ssh://root@127.0.0.1:1/system?keyfile=/k\" instead"),
        "{route}"
    );
    assert!(
        !report.contains("cannot connect") && !report.to_lowercase().contains("refused"),
        "nothing connected over libssh:\n{report}"
    );
}

/// With DEVICELAB_HOSTS, each host is checked under its URI, and a miss is named under the
/// host it belongs to.
#[test]
fn each_listed_host_is_checked_under_its_uri() {
    let remote = "qemu+tls://127.0.0.1/system";
    let (ok, report) = devicelab(
        &["doctor", "--arch", "x86_64"],
        &[("DEVICELAB_HOSTS", &format!("qemu:///system {remote}"))],
        None,
    );
    assert!(!ok, "{report}");
    let (here, there) = report
        .split_once(&format!("host {remote}:"))
        .unwrap_or_else(|| panic!("a heading for {remote}:\n{report}"));
    assert!(here.contains("host qemu:///system:"), "{report}");
    let route = miss(there, "guest route");
    assert!(route.contains("use qemu+ssh://127.0.0.1/system"), "{route}");
    assert!(
        !here
            .lines()
            .any(|l| l.contains('✗') && l.contains("guest route")),
        "this host's route is fine:\n{here}"
    );
}

#[test]
fn a_missing_and_an_inactive_network_are_named_with_net_start() {
    let (ok, report) = devicelab(
        &["doctor", "--arch", "x86_64"],
        &[("DEVICELAB_NETWORK", "devicelab-doctor-absent")],
        None,
    );
    assert!(!ok);
    let line = miss(&report, "network devicelab-doctor-absent");
    assert!(
        line.contains("no network") && line.contains("net-start"),
        "{line}"
    );

    // Defined, never started.
    let lv = common::system_libvirt();
    let name = format!("devicelab-doctor-{}", std::process::id());
    let xml = format!(
        "<network><name>{name}</name><bridge name='virbr-dl{}'/><ip address='192.0.2.1' netmask='255.255.255.0'/></network>",
        std::process::id() % 10000
    );
    let net = lv.conn().unwrap().define_network_xml(&xml).unwrap();
    let (ok, report) = devicelab(
        &["doctor", "--arch", "x86_64"],
        &[("DEVICELAB_NETWORK", &name)],
        None,
    );
    net.undefine().unwrap();
    assert!(!ok);
    let line = miss(&report, &format!("network {name}"));
    assert!(
        line.contains("not active") && line.contains(&format!("net-start '{name}'")),
        "{line}"
    );
}

/// With STP on, a bridge holds each newly plugged VM interface for ~4 s (what a warm restore
/// waits out): a warning whose fix, run as printed, turns it off.
#[test]
fn a_bridge_with_stp_on_is_a_warning_whose_fix_turns_it_off() {
    let lv = common::system_libvirt();
    let name = format!("devicelab-doctor-stp-{}", std::process::id());
    let xml = format!(
        "<network><name>{name}</name><bridge name='virbr-dls{}' stp='on' delay='0'/>\
         <dns enable='no'/><ip address='198.18.{}.1' netmask='255.255.255.0'/></network>",
        std::process::id() % 10000,
        std::process::id() % 256
    );
    let conn = lv.conn().unwrap();
    conn.define_network_xml(&xml).unwrap().create().unwrap();
    /// Destroys and undefines the network, however the test ends.
    struct Gone<'a>(&'a virt::connect::Connect, &'a str);
    impl Drop for Gone<'_> {
        fn drop(&mut self) {
            if let Ok(net) = self.0.lookup_network_by_name(self.1) {
                let _ = net.destroy();
                let _ = net.undefine();
            }
        }
    }
    let _gone = Gone(&conn, &name);
    let doctor = || {
        devicelab(
            &["doctor", "--arch", "x86_64"],
            &[("DEVICELAB_NETWORK", &name)],
            None,
        )
        .1
    };

    let report = doctor();
    let line = marked(&report, '!', &format!("network {name}: bridge"));
    assert!(line.contains("STP on") && line.contains("~4 s"), "{line}");
    let fix = line
        .split_once("fix: with no VM on it: ")
        .unwrap_or_else(|| panic!("a fix that says when to run it: {line}"))
        .1;
    let dir = tempfile::tempdir().unwrap();
    let ran = Command::new("sh")
        .args(["-c", fix])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        ran.status.success(),
        "{fix}: {}",
        String::from_utf8_lossy(&ran.stderr)
    );

    let report = doctor();
    assert!(
        report.contains(&format!("✓ network {name}: bridge: STP off")),
        "{report}"
    );
}

/// PATH holds only `rustc` (and so nothing else the checks look for there).
#[test]
fn a_binary_hidden_from_path_is_named_with_its_install_line() {
    let dir = tempfile::tempdir().unwrap();
    let rustc = common::require("rustc", "install Rust (rustup)");
    std::os::unix::fs::symlink(&rustc, dir.path().join("rustc")).unwrap();
    let (ok, report) = devicelab(
        &["doctor", "--arch", "aarch64"],
        &[
            ("DEVICELAB_NATS", "process"),
            ("DEVICELAB_NATS_SERVER", "nats-server"),
        ],
        Some(dir.path()),
    );
    assert!(!ok, "{report}");
    let nats = miss(&report, "NATS");
    assert!(
        nats.contains("nats-server") && nats.contains("install nats-server"),
        "{nats}"
    );
    let linker = miss(&report, "aarch64: building a cargo agent");
    assert!(
        linker.contains("aarch64-linux-gnu-gcc") && linker.contains("gcc-aarch64-linux-gnu"),
        "the linker and the package that has it: {linker}"
    );

    let (ok, report) = devicelab(
        &["doctor", "--arch", "x86_64"],
        &[("DEVICELAB_NATS", "container")],
        Some(dir.path()),
    );
    assert!(!ok);
    assert!(miss(&report, "NATS").contains("install podman"), "{report}");
}

/// `Lab::new` runs the same checks and fails once, listing every miss.
#[test_log::test(tokio::test)]
async fn the_lab_fails_once_listing_every_miss() {
    let vars = BTreeMap::from([
        (
            "DEVICELAB_LIBVIRT_URI".to_owned(),
            "qemu:///system?socket=/nonexistent/libvirt-sock".to_owned(),
        ),
        ("DEVICELAB_NATS".to_owned(), "process".to_owned()),
        (
            "DEVICELAB_NATS_SERVER".to_owned(),
            "/nonexistent/nats-server".to_owned(),
        ),
    ]);
    let err = match devicelab::Lab::new(HarnessConfig::from_vars(vars).unwrap()).await {
        Ok(_) => panic!("a lab without libvirt"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(matches!(err, LabError::HostNotReady { .. }), "{msg}");
    assert!(
        msg.contains("✗ libvirt") && msg.contains("✗ NATS"),
        "both misses, at once: {msg}"
    );
    assert!(msg.contains("devicelab doctor"), "{msg}");
}

#[test]
fn fetch_without_a_route_names_the_mirror_and_the_override_variables() {
    let data = tempfile::tempdir().unwrap();
    let (ok, out) = devicelab(
        &["fetch", "--arch", "x86_64"],
        &[
            ("DEVICELAB_DATA_DIR", data.path().to_str().unwrap()),
            (
                "DEVICELAB_IMAGE_URL_X86_64",
                "http://127.0.0.1:9/debian.qcow2",
            ),
            ("DEVICELAB_IMAGE_SHA256_X86_64", &"0".repeat(64)),
        ],
        None,
    );
    assert!(!ok, "{out}");
    assert!(
        out.contains("http://127.0.0.1:9/debian.qcow2"),
        "the mirror it tried: {out}"
    );
    assert!(
        out.contains("DEVICELAB_IMAGE_<ARCH>") && out.contains("build-debian.sh"),
        "the way out: {out}"
    );
}
