//! Asking the host's QEMU which optional arguments it accepts, so the harness passes only those
//! (and says which it dropped) instead of failing to start a domain on an older QEMU.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// An optional QEMU argument pair for emulated aarch64 guests: what it does, and what a QEMU
/// that refuses it costs (`None`: nothing measured).
pub struct Knob {
    pub args: [&'static str; 2],
    pub why: &'static str,
    pub without: Option<&'static str>,
}

/// What an emulated aarch64 guest gets, appended through `<qemu:commandline>`. Each knob's
/// figures are the boot benchmark's (`BENCH_KNOBS=1 cargo bench --bench boot`, QEMU 7.2 on an
/// x86_64 host, BENCHMARKS.md "The aarch64 TCG knobs").
pub const AARCH64_TCG_KNOBS: &[Knob] = &[
    Knob {
        // A -cpu property, not a libvirt <feature>; QEMU takes the last -cpu, so appending wins.
        args: ["-cpu", "max,pauth-impdef=on"],
        why: "pointer authentication with an implementation-defined algorithm instead of QARMA5: \
              boot to SSH 2.3x faster under TCG (79 s, against 185 s without it)",
        without: Some("boot to SSH ~2.3x slower under TCG (QARMA5 computed in software)"),
    },
    Knob {
        args: ["-accel", "tcg,thread=multi"],
        why: "multi-threaded TCG, one host thread per vCPU: QEMU already picks it for an aarch64 \
              guest on an x86_64 host (79 s to SSH with it, 86 s without: one run's noise); \
              passed for a QEMU that would not",
        without: None,
    },
];

/// How long one probe may take: QEMU answers QMP in well under a second when it starts.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// Does `emulator` start a `virt` machine with `args`? Asked through QMP (greeting,
/// `qmp_capabilities`, `quit`), each reply read, within [`PROBE_TIMEOUT`]: QEMU answers and
/// quits at once instead of running a machine. `Err` says why not (QEMU's own stderr).
pub fn probe(emulator: &Path, args: &[&str]) -> Result<(), String> {
    probe_within(emulator, args, PROBE_TIMEOUT)
}

pub fn accepts(emulator: &Path, args: &[&str]) -> bool {
    probe(emulator, args).is_ok()
}

pub fn probe_within(emulator: &Path, args: &[&str], timeout: Duration) -> Result<(), String> {
    let mut child = Command::new(emulator)
        .args(["-machine", "virt", "-display", "none", "-nodefaults", "-S"])
        .args(["-qmp", "stdio"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", emulator.display()))?;
    let (Some(mut stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        let _ = child.kill();
        let _ = child.wait();
        return Err("no pipes to QEMU".into());
    };
    // Readers on threads of their own, so every read has the deadline.
    let (lines, replies) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = BufReader::new(stderr).read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + timeout;
    let mut exchange = || -> Result<(), String> {
        expect_reply(&replies, deadline, "QMP")?;
        for command in ["qmp_capabilities", "quit"] {
            writeln!(stdin, "{{\"execute\":\"{command}\"}}")
                .map_err(|e| format!("QEMU stopped reading ({e})"))?;
            expect_reply(&replies, deadline, "return")?;
        }
        Ok(())
    };
    let mut answered = exchange();
    drop(stdin);
    if answered.is_err() {
        let _ = child.kill();
    }
    // Even after `quit`, QEMU gets only the rest of the deadline to exit.
    while answered.is_ok() && child.try_wait().map_err(|e| e.to_string())?.is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            answered = Err(format!("QEMU did not exit within {timeout:?} of `quit`"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    let stderr = errors.join().unwrap_or_default();
    match answered {
        Ok(()) if status.success() => Ok(()),
        Ok(()) => Err(format!("QEMU exited {status}: {}", stderr.trim())),
        Err(why) if stderr.trim().is_empty() => Err(why),
        Err(why) => Err(format!("{why}: {}", stderr.trim())),
    }
}

/// One line of QMP: the greeting, a command's return or error, or an event.
#[derive(Debug, serde::Deserialize)]
struct QmpLine {
    #[serde(rename = "QMP")]
    greeting: Option<serde::de::IgnoredAny>,
    #[serde(rename = "return")]
    returned: Option<serde::de::IgnoredAny>,
    error: Option<QmpError>,
}

#[derive(Debug, serde::Deserialize)]
struct QmpError {
    class: String,
    desc: String,
}

/// Waits for the next QMP line of kind `key` ("QMP" or "return"); events in between are
/// skipped, an error reply ends the probe.
fn expect_reply(
    replies: &mpsc::Receiver<String>,
    deadline: Instant,
    key: &str,
) -> Result<(), String> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = replies.recv_timeout(left).map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => format!("no QMP {key:?} within the probe's time"),
            mpsc::RecvTimeoutError::Disconnected => "QEMU closed QMP (it refused to start)".into(),
        })?;
        let reply: QmpLine =
            serde_json::from_str(&line).map_err(|e| format!("not QMP ({e}): {line}"))?;
        if let Some(e) = reply.error {
            return Err(format!("QMP error {}: {}", e.class, e.desc));
        }
        let found = match key {
            "QMP" => reply.greeting.is_some(),
            _ => reply.returned.is_some(),
        };
        if found {
            return Ok(());
        }
    }
}

/// The knobs `emulator` accepts, each probed on its own by `probe` (this machine's QEMU
/// through [`probe`], another host's through its libvirt) and the choice logged.
pub fn accepted_args(
    emulator: &Path,
    knobs: &[Knob],
    probe: impl Fn(&[&str]) -> Result<(), String>,
) -> Vec<String> {
    let mut out = Vec::new();
    for knob in knobs {
        let shown = knob.args.join(" ");
        match probe(&knob.args) {
            Ok(()) => {
                tracing::info!("{}: passing {shown} ({})", emulator.display(), knob.why);
                out.extend(knob.args.iter().map(|a| a.to_string()));
            }
            Err(why) => tracing::warn!(
                "{} rejects {shown} ({why}): leaving it out (what it would give: {}; without it: {})",
                emulator.display(),
                knob.why,
                knob.without.unwrap_or("nothing measured")
            ),
        }
    }
    out
}
