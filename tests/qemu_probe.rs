//! The QEMU probe asks the host's real QEMU through QMP which optional arguments it takes, and
//! reads every reply: an argument QEMU accepts is kept, one it refuses is left out with QEMU's
//! own words, and an emulator that never answers is given up on at the probe's deadline.
//! Needs qemu-system-aarch64 (fixtures/host/setup.sh).

use devicelab::host::qemu_probe::{Knob, accepted_args, probe, probe_within};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

const QEMU: &str = "/usr/bin/qemu-system-aarch64";

fn qemu() -> &'static Path {
    assert!(
        Path::new(QEMU).exists(),
        "install qemu-system-arm (fixtures/host/setup.sh)"
    );
    Path::new(QEMU)
}

#[test]
fn an_argument_qemu_accepts_is_kept() {
    // Every QEMU with TCG takes these: what is tested is the exchange, not the version.
    probe(qemu(), &["-accel", "tcg"]).unwrap();
    probe(qemu(), &["-cpu", "max"]).unwrap();
}

#[test]
fn an_unknown_property_is_left_out_with_qemus_reason() {
    let why = probe(qemu(), &["-cpu", "max,no-such-property=on"]).unwrap_err();
    assert!(why.contains("no-such-property"), "QEMU's stderr: {why}");
    let knobs = [
        Knob {
            args: ["-cpu", "max,no-such-property=on"],
            why: "test",
            without: None,
        },
        Knob {
            args: ["-accel", "tcg"],
            why: "test",
            without: None,
        },
    ];
    assert_eq!(
        accepted_args(qemu(), &knobs, |a| probe(qemu(), a)),
        ["-accel", "tcg"]
    );
}

#[test]
fn an_emulator_that_never_answers_is_given_up_on() {
    let dir = tempfile::tempdir().unwrap();
    let silent = dir.path().join("qemu-system-silent");
    std::fs::write(&silent, "#!/bin/sh\nexec sleep 600\n").unwrap();
    std::fs::set_permissions(&silent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let started = Instant::now();
    let why = probe_within(&silent, &[], Duration::from_secs(2)).unwrap_err();
    assert!(why.contains("no QMP"), "{why}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the probe gave up at its deadline, not when the emulator quit ({:?})",
        started.elapsed()
    );
}

#[test]
fn a_missing_emulator_accepts_nothing() {
    let knobs = [Knob {
        args: ["-accel", "tcg"],
        why: "test",
        without: None,
    }];
    assert!(
        accepted_args(Path::new("/nonexistent/qemu"), &knobs, |a| {
            probe(Path::new("/nonexistent/qemu"), a)
        })
        .is_empty()
    );
}

/// An emulator that answers every QMP command, `quit` included, and then does not exit is given
/// up on at the probe's deadline too (the probe's last wait has the budget as well).
#[test]
fn an_emulator_that_answers_quit_but_never_exits_is_given_up_on() {
    let dir = tempfile::tempdir().unwrap();
    let stuck = dir.path().join("qemu-system-stuck");
    std::fs::write(
        &stuck,
        "#!/bin/sh\necho '{\"QMP\": {}}'\nread a; echo '{\"return\": {}}'\nread b; echo '{\"return\": {}}'\nexec sleep 600\n",
    )
    .unwrap();
    std::fs::set_permissions(&stuck, std::fs::Permissions::from_mode(0o755)).unwrap();
    let started = Instant::now();
    let why = probe_within(&stuck, &[], Duration::from_secs(2)).unwrap_err();
    assert!(why.contains("did not exit"), "{why}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}
