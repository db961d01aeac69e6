//! Asking the host's QEMU which optional arguments it accepts, so the harness passes only those
//! (and says which it dropped) instead of failing to start a domain on an older QEMU.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// An optional QEMU argument pair for emulated aarch64 guests, and why it is worth having.
pub struct Knob {
    pub args: [&'static str; 2],
    pub why: &'static str,
}

/// What an emulated aarch64 guest gets, appended through `<qemu:commandline>`.
pub const AARCH64_TCG_KNOBS: &[Knob] = &[
    Knob {
        // A -cpu property, not a libvirt <feature>; QEMU takes the last -cpu, so appending wins.
        args: ["-cpu", "max,pauth-impdef=on"],
        why: "an implementation-defined pointer-authentication algorithm roughly halves boot time under TCG",
    },
    Knob {
        args: ["-accel", "tcg,thread=multi"],
        why: "multi-threaded TCG: one host thread per vCPU",
    },
];

/// Does `emulator` start a `virt` machine with `args`? Asked through QMP, so QEMU answers and
/// quits at once instead of running a machine.
pub fn accepts(emulator: &Path, args: &[&str]) -> bool {
    let child = Command::new(emulator)
        .args(["-machine", "virt", "-display", "none", "-nodefaults", "-S"])
        .args(["-qmp", "stdio"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return false;
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n");
    }
    child.wait().map(|s| s.success()).unwrap_or(false)
}

/// The knobs `emulator` accepts, each probed on its own and the choice logged.
pub fn accepted_args(emulator: &Path, knobs: &[Knob]) -> Vec<String> {
    let mut out = Vec::new();
    for knob in knobs {
        let shown = knob.args.join(" ");
        if accepts(emulator, &knob.args) {
            tracing::info!("{}: passing {shown} ({})", emulator.display(), knob.why);
            out.extend(knob.args.iter().map(|a| a.to_string()));
        } else {
            tracing::warn!(
                "{} rejects {shown}: leaving it out (what it would give: {})",
                emulator.display(),
                knob.why
            );
        }
    }
    out
}
