//! The host's real QEMU is asked which optional arguments it takes (QEMU 7.2 on this project's
//! CI machine takes both aarch64 knobs); a property it does not know is left out, not fatal.

use devicelab::qemu_probe::{AARCH64_TCG_KNOBS, Knob, accepted_args, accepts};
use std::path::Path;

const QEMU: &str = "/usr/bin/qemu-system-aarch64";

#[test]
fn the_host_qemu_takes_the_aarch64_knobs() {
    assert!(
        Path::new(QEMU).exists(),
        "install qemu-system-arm (fixtures/host/setup.sh)"
    );
    assert!(accepts(Path::new(QEMU), &["-cpu", "max,pauth-impdef=on"]));
    assert_eq!(
        accepted_args(Path::new(QEMU), AARCH64_TCG_KNOBS),
        ["-cpu", "max,pauth-impdef=on", "-accel", "tcg,thread=multi"]
    );
}

#[test]
fn an_unknown_property_is_left_out() {
    assert!(!accepts(
        Path::new(QEMU),
        &["-cpu", "max,no-such-property=on"]
    ));
    let knobs = [
        Knob {
            args: ["-cpu", "max,no-such-property=on"],
            why: "test",
        },
        Knob {
            args: ["-accel", "tcg,thread=multi"],
            why: "test",
        },
    ];
    assert_eq!(
        accepted_args(Path::new(QEMU), &knobs),
        ["-accel", "tcg,thread=multi"]
    );
}

#[test]
fn a_missing_emulator_accepts_nothing() {
    assert!(accepted_args(Path::new("/nonexistent/qemu"), AARCH64_TCG_KNOBS).is_empty());
}
