//! One onboarding run as one round trip (a lean run aside, see [`RESEND`]): a gzip'd tar bundle of
//! every file the device needs (the
//! shipped files, the rendered ones, the unit, the `.deb`s) and the POSIX shell script that
//! applies every step, sent on one SSH channel's stdin; the script prints one
//! `devicelab-step <step> changed|unchanged` line per step, or stops at the first failure with
//! a `devicelab-fail <step> <what>` line after the failing command's output.

use crate::agent::description::{AgentDescription, Package};
use crate::ssh::session::shell_quote;
use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use std::time::Duration;

/// Marks a step's outcome in the script's output.
pub const STEP: &str = "devicelab-step";
/// Says a run without some files' bytes found one of them missing or different on the device,
/// and changed nothing: the run is made again with every file.
pub const RESEND: &str = "devicelab-resend";
/// Marks the failure that stopped the script, after the failing command's output.
pub const FAIL: &str = "devicelab-fail";
/// How long the unit must have been active, without a restart, for onboarding to end.
pub const STAYS_ACTIVE: Duration = Duration::from_secs(2);
/// Before the journal of a unit that did not stay active: its state and how long it was given.
pub const UNIT_STATE: &str = "devicelab-unit-state";

/// A file to install: its step, guest path, mode, group and bytes.
#[derive(Debug, Clone)]
pub struct FileToInstall {
    pub step: String,
    pub path: String,
    pub mode: u32,
    pub group: String,
    pub bytes: Vec<u8>,
}

/// What one run sends: the bundle (the script inside) and the command that unpacks and runs
/// it, stopping after step `stop_after` if given.
pub struct Run {
    pub bundle: Vec<u8>,
    pub command: String,
}

/// Renders one run. The files `lean` selects are left out of the bundle: the script first
/// checks the device holds each already (bytes, mode and group), and if one differs it changes
/// nothing and prints [`RESEND`], for a run with every file.
#[allow(clippy::too_many_arguments)]
pub fn render(
    d: &AgentDescription,
    files: &[FileToInstall],
    lean: &dyn Fn(&FileToInstall) -> bool,
    unit: &[u8],
    debs: &[(String, Vec<u8>)],
    guest_step: Duration,
    lock_wait: Duration,
    stop_after: Option<&str>,
    flush: bool,
) -> std::io::Result<Run> {
    debug_assert!(
        !(flush && stop_after.is_some()),
        "a run stopped early does not flush"
    );
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |name: &str, bytes: &[u8]| -> std::io::Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o600);
        header.set_cksum();
        tar.append_data(&mut header, name, bytes)
    };
    let mut script = String::from(PROLOGUE);
    let _ = writeln!(script, "lockwait={}", lock_wait.as_secs());
    script += &precheck(files, lean);
    if !d.packages.is_empty() {
        for (i, (_, bytes)) in debs.iter().enumerate() {
            add(&format!("deb{i}.deb"), bytes)?;
        }
        script += &packages(d, debs);
    }
    if let Some(user) = &d.user {
        script += &user_step(user);
    }
    // Linger before the files: the user manager starts while they are installed.
    if let Some(user) = d.service.user() {
        script += &linger(user);
    }
    for (i, f) in files.iter().enumerate() {
        if lean(f) {
            // Checked before any step: the same bytes are there.
            let _ = writeln!(script, "report {} unchanged", shell_quote(&f.step));
            continue;
        }
        add(&format!("file{i}"), &f.bytes)?;
        script += &file_step(
            &f.step,
            &f.path,
            f.mode,
            &f.group,
            &f.bytes,
            &format!("file{i}"),
        );
    }
    add("unit", unit)?;
    script += &file_step("unit", &d.service.path(), 0o644, "root", unit, "unit");
    script += &service(d, guest_step, flush);
    add("onboard.sh", script.as_bytes())?;
    // Compressed: a guest under TCG unpacks gzip faster than SSH brings it the bytes gzip
    // saves (an agent binary shrinks to about 40 %).
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar.into_inner()?)?;
    let bundle = gz.finish()?;
    let stop = shell_quote(stop_after.unwrap_or(""));
    // Unpacked as root into a directory of its own, removed whatever the script did.
    let command = format!(
        r#"sudo -n sh -c 'd=$(mktemp -d) || exit 1; tar -xz --no-same-owner -f - -C "$d" && sh "$d/onboard.sh" "$d" "$1"; rc=$?; rm -rf "$d"; exit $rc' onboard {stop}"#
    );
    Ok(Run { bundle, command })
}

/// `$b`: the bundle's directory; `$stop`: the step to stop after. `report` prints a step's
/// outcome (and exits once the step to stop after has run); `fail` ends the run; `same` says
/// whether a file holds the bytes, mode and group given (`<sha256> <mode> <group>`). `pkg` runs a
/// package manager (in the C locale: its messages are matched): while another process holds
/// its lock (apt-daily) it tries again every 5 s until `$lockwait` seconds have passed since
/// the step's first package-manager call (one wait for the whole step, however many calls),
/// then fails the packages step saying so. The messages are dpkg's ("dpkg
/// frontend lock was locked by another process", "dpkg database lock …", and the older "… is
/// locked by another process") and apt's ("Could not get lock …").
const PROLOGUE: &str = r#"b=$1; stop=$2; restart=false
report() { echo "devicelab-step $1 $2"; if [ -n "$stop" ] && [ "$1" = "$stop" ]; then exit 0; fi; }
fail() { echo "devicelab-fail $*"; exit 1; }
run() { out=$("$@" 2>&1) || { printf '%s\n' "$out"; return 1; }; }
same() { h=$(sha256sum 2>/dev/null < "$1") && [ "${h%% *} $(stat -c '%a %G' "$1")" = "$2" ]; }
pkg() { : "${pkg_t0:=$(date +%s)}"; while ! out=$(LC_ALL=C "$@" 2>&1); do
  case $out in *"Could not get lock"*|*"frontend lock"*|*"database lock"*|*"is locked by another process"*) ;; *) printf '%s\n' "$out"; return 1;; esac
  waited=$(($(date +%s) - pkg_t0))
  [ "$waited" -ge "${lockwait:-0}" ] && { printf '%s\n' "$out"; fail packages locked "$waited"; }
  sleep 5; done; }
"#;

/// `.deb`s whose version is not installed yet, together (they may depend on each other); then
/// mirror packages not installed yet: the package lists first, then one apt run.
fn packages(d: &AgentDescription, debs: &[(String, Vec<u8>)]) -> String {
    let mut s = String::from("p=unchanged; need=\"\"\n");
    for (i, (name, _)) in debs.iter().enumerate() {
        let n = shell_quote(name);
        // The name dpkg will know it by must be the one the description gives (its check).
        let _ = writeln!(
            s,
            r#"own=$(dpkg-deb -f "$b/deb{i}.deb" Package 2>&1) || fail packages unreadable {n}; [ "$own" = {n} ] || {{ echo "$own"; fail packages name {n}; }}"#
        );
        let _ = writeln!(
            s,
            r#"[ "$(dpkg-query -W -f='${{Status}} ${{Version}}' {n} 2>/dev/null)" = "install ok installed $(dpkg-deb -f "$b/deb{i}.deb" Version)" ] || need="$need $b/deb{i}.deb""#
        );
    }
    let names: Vec<&str> = debs.iter().map(|(n, _)| n.as_str()).collect();
    let _ = writeln!(
        s,
        r#"if [ -n "$need" ]; then pkg dpkg -i $need || fail packages deb {}; p=changed; fi"#,
        shell_quote(&names.join(" "))
    );
    let mirror: Vec<String> = d
        .packages
        .iter()
        .filter_map(|p| match p {
            Package::Mirror(name) => Some(shell_quote(name)),
            Package::Deb { .. } => None,
        })
        .collect();
    if !mirror.is_empty() {
        let _ = writeln!(
            s,
            r#"missing=""; for n in {list}; do dpkg-query -W -f='${{Status}}' "$n" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $n"; done
if [ -n "$missing" ]; then {{ pkg apt-get update -q && pkg env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing; }} || fail packages mirror $missing; p=changed; fi"#,
            list = mirror.join(" ")
        );
    }
    s + "report packages $p\n"
}

fn user_step(user: &str) -> String {
    let u = shell_quote(user);
    format!(
        r#"if id -u {u} >/dev/null 2>&1; then report user unchanged; else run useradd --create-home --shell /usr/sbin/nologin {u} || fail user; report user changed; fi
"#
    )
}

/// Before any step: each file `lean` leaves out must be on the device as it is, or the run
/// stops there, changing nothing, with [`RESEND`].
fn precheck(files: &[FileToInstall], lean: &dyn Fn(&FileToInstall) -> bool) -> String {
    let mut s = String::new();
    for f in files.iter().filter(|f| lean(f)) {
        let _ = writeln!(
            s,
            "same {} {} || {{ echo {RESEND}; exit 0; }}",
            shell_quote(&f.path),
            shell_quote(&wanted(&f.bytes, f.mode, &f.group))
        );
    }
    s
}

/// What `same` compares a file with: its bytes' SHA-256, mode and group.
fn wanted(bytes: &[u8], mode: u32, group: &str) -> String {
    format!("{} {mode:o} {group}", hex::encode(Sha256::digest(bytes)))
}

/// Installed (owner root, `group`, `mode`) unless the same bytes, mode and group are there;
/// written beside the target, flushed to disk (`sync` on the file) and renamed over it, so a
/// power cut leaves the old file or the new one, whole (without the flush, the rename can reach
/// the disk before the file's data, and a cut leaves a file of zeros under the target's name).
fn file_step(step: &str, path: &str, mode: u32, group: &str, bytes: &[u8], member: &str) -> String {
    let want = wanted(bytes, mode, group);
    let (p, tmp) = (
        shell_quote(path),
        shell_quote(&format!("{path}.devicelab-new")),
    );
    let dir = shell_quote(
        path.rsplit_once('/')
            .map(|(d, _)| d)
            .filter(|d| !d.is_empty())
            .unwrap_or("/"),
    );
    let (s, g) = (shell_quote(step), shell_quote(group));
    format!(
        r#"if same {p} {want}; then report {s} unchanged; else
  run mkdir -p {dir} && run install -m {mode:o} -o root -g {g} "$b/{member}" {tmp} && run sync {tmp} && run mv -f {tmp} {p} || fail {s}
  restart=true; report {s} changed; fi
"#,
        want = shell_quote(&want),
    )
}

/// Linger starts the user's systemd at boot, without a login: what lets a user unit come back
/// after a power cycle. Enabling it starts that manager now too; the service step waits for
/// it.
fn linger(user: &str) -> String {
    let u = shell_quote(user);
    format!(
        r#"if [ -e /var/lib/systemd/linger/{u} ]; then l=unchanged; else run loginctl enable-linger {u} || fail linger; l=changed; fi
report linger $l
"#
    )
}

/// Enabled and started (restarted if a file it uses changed), then it must be active and stay
/// so for [`STAYS_ACTIVE`] within `budget`: a unit that fails is a failure with its journal
/// tail, and so is one not active for the whole window by `budget`. The window counts from the
/// unit's own activation (systemd's `ActiveEnterTimestampMonotonic`, against the guest's
/// uptime: a guest is never suspended, so the two clocks agree), so a unit that has run that
/// long already passes at once, and a restart by systemd starts the window again. In the
/// script: `sc` is the unit's `systemctl` (the user's, run as that user, for a user unit,
/// once that user's manager has opened its private socket: what `systemctl --user` uses where
/// there is no user D-Bus, as on minimal images); `state` reads its active state, enablement
/// and activation time in one call; `uptime_ms` is the guest's uptime in milliseconds.
/// With `flush`, a `sync` runs while the window passes, and the run ends once it is done:
/// everything the steps wrote is on disk, without a round trip of its own.
fn service(d: &AgentDescription, budget: Duration, flush: bool) -> String {
    let unit = shell_quote(d.service.unit());
    // The script runs as root: a user's `systemctl --user` through setpriv, not sudo (no PAM
    // session per call, a few hundred milliseconds each under TCG).
    let (define, sc) = match d.service.user() {
        None => (String::new(), "systemctl"),
        Some(user) => (
            format!(
                r#"u=$(id -u {u}); g=$(id -g {u}); sock=/run/user/$u/systemd/private; i=0
while [ ! -S "$sock" ]; do i=$((i+1)); if [ $i -gt {tries} ]; then echo "the user manager never opened $sock within {budget:?}: see systemctl status user@$u.service and loginctl show-user {u}"; fail service; fi; sleep 0.1; done
sc() {{ setpriv --reuid="$u" --regid="$g" --clear-groups env -i PATH="$PATH" XDG_RUNTIME_DIR=/run/user/$u systemctl --user "$@"; }}
"#,
                u = shell_quote(user),
                tries = budget.as_millis().div_ceil(100),
            ),
            "sc",
        ),
    };
    let (sync, synced) = if flush {
        (
            "sync >\"$b/sync.out\" 2>&1 & fl=$!\n",
            r#"wait "$fl" || { cat "$b/sync.out"; fail flush; }; "#,
        )
    } else {
        ("", "")
    };
    format!(
        r#"{define}state() {{ st=""; since=0; enabled=""
  for kv in $({sc} show -p ActiveState -p UnitFileState -p ActiveEnterTimestampMonotonic {unit} 2>/dev/null); do case $kv in
    ActiveState=*) st=${{kv#*=}};; UnitFileState=*) enabled=${{kv#*=}};;
    ActiveEnterTimestampMonotonic=*) since=$((${{kv#*=}} / 1000));; esac; done; }}
if [ "$restart" = true ]; then
  run {sc} enable --quiet --no-reload {unit} && run {sc} daemon-reload && run {sc} restart {unit} || fail service; s=changed
elif state && [ "$enabled" = enabled ] && [ "$st" = active ]; then s=unchanged
else run {sc} enable --quiet --no-reload {unit} && run {sc} daemon-reload && run {sc} start {unit} || fail service; s=changed; fi
echo "devicelab-step service $s"
{sync}uptime_ms() {{ read up _ < /proc/uptime; echo $(( ${{up%.*}} * 1000 + 10 * 1${{up#*.}} - 1000 )); }}
t0=$(uptime_ms)
while :; do
  state
  now=$(uptime_ms)
  [ "$since" -gt 0 ] || since=${{seen:=$now}}
  if [ "$st" = active ] && [ $((now - since)) -ge {window_ms} ]; then {synced}exit 0
  elif [ "$st" = failed ] || [ $((now - t0)) -ge {budget_ms} ]; then
    echo "devicelab-unit-state ${{st:-unknown}} $((now - t0))"; {journal} 2>&1; fail active
  elif [ "$st" = active ]; then
    left=$(({window_ms} - (now - since)))
    sleep $((left / 1000)).$(printf %03d $((left % 1000)))
  else
    sleep 0.2
  fi
done
"#,
        journal = d.service.journal_command(30),
        window_ms = STAYS_ACTIVE.as_millis(),
        budget_ms = budget.as_millis(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::description::Service;
    use std::io::Read;

    /// The bundle's script for `d`, as the guest's `sh` would read it.
    fn script_of(d: &AgentDescription, stop: Option<&str>) -> (String, Vec<String>) {
        let files = [FileToInstall {
            step: "config".into(),
            path: "/etc/x/y.conf".into(),
            mode: 0o640,
            group: "x".into(),
            bytes: vec![1, 2, 3],
        }];
        let debs = vec![("netcat-openbsd".to_owned(), vec![4, 5])];
        let run = render(
            d,
            &files,
            &|_| false,
            b"[Service]\n",
            &debs,
            Duration::from_secs(60),
            Duration::from_secs(150),
            stop,
            false,
        )
        .unwrap();
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(run.bundle.as_slice()));
        let mut names = Vec::new();
        let mut script = String::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().display().to_string();
            if name == "onboard.sh" {
                entry.read_to_string(&mut script).unwrap();
            }
            names.push(name);
        }
        (script, names)
    }

    /// A file step with a hostile path (spaces, quotes, `$`, backslashes, `;`, backticks) run
    /// by a real `sh`: the file lands at exactly that path, and nothing else runs. (`install`
    /// is a shell function here that leaves out `-o`/`-g`, so the test needs no root.)
    #[test]
    fn a_hostile_path_is_installed_as_it_is() {
        let base = scratch("script");
        let bundle = base.join("bundle");
        std::fs::create_dir_all(&bundle).unwrap();
        std::fs::write(bundle.join("file0"), b"payload").unwrap();
        let hostile = [
            "a b",
            "it's",
            "$HOME",
            "back\\slash",
            "semi;colon",
            "`touch pwned`",
            "dq\"uote",
        ];
        for (i, name) in hostile.iter().enumerate() {
            let path = base.join(format!("d{i}")).join(name);
            let path = path.to_str().unwrap();
            let script = format!(
                "install() {{ while [ $# -gt 2 ]; do case $1 in -m|-o|-g) shift 2;; *) break;; esac; done; cp \"$1\" \"$2\"; }}\n{PROLOGUE}{}",
                file_step("config", path, 0o600, "root", b"payload", "file0")
            );
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(&script)
                .arg("onboard")
                .arg(&bundle)
                .arg("")
                .current_dir(&base)
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains("devicelab-step config changed"),
                "{name:?}: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(std::fs::read(path).unwrap(), b"payload", "{name:?}");
        }
        assert!(!base.join("pwned").exists(), "a backtick ran a command");
        std::fs::remove_dir_all(&base).unwrap();
    }

    /// A fresh directory under the temp dir, for one test.
    fn scratch(what: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "devicelab-{what}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// An executable `sh` script `name` in `dir`, running `body`: a tool the script under test
    /// finds first on PATH.
    fn tool(dir: &std::path::Path, name: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// `script` run by a real `sh` (`$1` the bundle dir `bundle`, no step to stop after) with
    /// `bin` first on PATH: whether it succeeded, its stdout, and how long it took.
    fn run_sh(
        script: &str,
        bundle: &std::path::Path,
        bin: &std::path::Path,
    ) -> (bool, String, Duration) {
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let started = std::time::Instant::now();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("onboard")
            .arg(bundle)
            .arg("")
            .env("PATH", path)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success(), stdout, started.elapsed())
    }

    /// A run without a large file's bytes checks the device first: the same bytes, mode and
    /// group there, and the step reports unchanged; any of them different, and the run stops
    /// before any step with RESEND.
    #[test]
    fn a_lean_run_changes_nothing_and_asks_again_when_a_file_it_left_out_differs() {
        let base = scratch("lean");
        let target = base.join("agent");
        let group = String::from_utf8(
            std::process::Command::new("id")
                .arg("-gn")
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap()
        .trim()
        .to_owned();
        let file = FileToInstall {
            step: "binary".into(),
            path: target.to_str().unwrap().to_owned(),
            mode: 0o755,
            group,
            bytes: b"the agent".to_vec(),
        };
        let lean = |_: &FileToInstall| true;
        let script = format!(
            "{PROLOGUE}{}report binary unchanged\n",
            precheck(std::slice::from_ref(&file), &lean)
        );
        use std::os::unix::fs::PermissionsExt;
        let cases: [(&[u8], u32, bool); 4] = [
            (b"the agent", 0o755, true),
            (b"the agent", 0o644, false),
            (b"an older agent", 0o755, false),
            (b"", 0, false),
        ];
        for (bytes, mode, same) in cases {
            let _ = std::fs::remove_file(&target);
            if mode != 0 {
                std::fs::write(&target, bytes).unwrap();
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode)).unwrap();
            }
            let (ok, stdout, _) = run_sh(&script, &base, &base);
            assert!(ok, "{stdout}");
            if same {
                assert_eq!(stdout, "devicelab-step binary unchanged\n");
            } else {
                assert_eq!(stdout, format!("{RESEND}\n"), "{mode:o} {bytes:?}");
            }
        }
        std::fs::remove_dir_all(&base).unwrap();
    }

    /// The service's window counts from the unit's own activation, read from a `systemctl`
    /// that says how long ago that was (against the real uptime): a unit active for 10 s
    /// passes at once; one active since just now is waited for until 2 s have passed; a failed
    /// one fails the step with its journal.
    #[test]
    fn the_unit_must_stay_active_from_its_own_activation() {
        let mut d = crate::agent::reference::agent();
        d.service = Service::System {
            unit: "a.service".into(),
            text: String::new(),
        };
        let base = scratch("active");
        for (name, body) in [
            (
                "systemctl",
                r#"case "$1" in
  show) echo "ActiveState=$(cat "$0.state")"
    echo "UnitFileState=enabled"
    since=$(cat "$0.since")
    # "now": a unit systemd restarts between any two polls.
    [ "$since" = now ] && { read up _ < /proc/uptime; since=$(( ${up%.*} * 1000000 + 10000 * 1${up#*.} - 1000000 )); }
    echo "ActiveEnterTimestampMonotonic=$since";;
esac"#,
            ),
            ("journalctl", "echo the journal of the unit"),
            ("sudo", r#"[ "$1" = -n ] && shift; exec "$@""#),
        ] {
            tool(&base, name, body);
        }
        let script = format!("{PROLOGUE}{}", service(&d, Duration::from_secs(30), false));
        // Activated `ago` seconds before now, on the clock the script reads.
        let set = |state: &str, ago: f64| {
            let uptime: f64 = std::fs::read_to_string("/proc/uptime")
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap();
            let since = ((uptime - ago) * 1e6) as u64;
            std::fs::write(base.join("systemctl.state"), state).unwrap();
            std::fs::write(base.join("systemctl.since"), since.to_string()).unwrap();
        };

        set("active", 10.0);
        let (ok, stdout, took) = run_sh(&script, &base, &base);
        assert!(
            ok && stdout.contains("devicelab-step service unchanged"),
            "{stdout}"
        );
        assert!(
            took < Duration::from_millis(1500),
            "waited {took:?} for a unit active for 10 s"
        );

        set("active", 0.5);
        let (ok, stdout, took) = run_sh(&script, &base, &base);
        assert!(ok, "{stdout}");
        // The window left: 1.5 s, less the uptime's 10 ms steps.
        assert!(
            took >= Duration::from_millis(1400),
            "did not wait: {took:?}"
        );

        set("failed", 0.0);
        let (ok, stdout, _) = run_sh(&script, &base, &base);
        assert!(!ok, "{stdout}");
        assert!(
            stdout.contains("devicelab-unit-state failed")
                && stdout.contains("the journal of the unit\ndevicelab-fail active"),
            "{stdout}"
        );

        // Active at every poll, yet started again each time: never 2 s in a row, so the
        // budget (1 s here) ends it.
        std::fs::write(base.join("systemctl.state"), "active").unwrap();
        std::fs::write(base.join("systemctl.since"), "now").unwrap();
        let restarting = format!("{PROLOGUE}{}", service(&d, Duration::from_secs(1), false));
        let (ok, stdout, took) = run_sh(&restarting, &base, &base);
        assert!(!ok, "{stdout}");
        assert!(stdout.contains("devicelab-unit-state active"), "{stdout}");
        assert!(
            took < Duration::from_secs(10),
            "the budget did not end it: {took:?}"
        );

        // With the flush: the run ends once its `sync` has, and fails if that fails.
        let flushing = format!("{PROLOGUE}{}", service(&d, Duration::from_secs(30), true));
        set("active", 10.0);
        tool(
            &base,
            "sync",
            "sleep 0.5; echo synced > \"$0.done\"; exit \"$(cat \"$0.rc\")\"",
        );
        std::fs::write(base.join("sync.rc"), "0").unwrap();
        let (ok, stdout, _) = run_sh(&flushing, &base, &base);
        assert!(ok, "{stdout}");
        assert!(
            base.join("sync.done").exists(),
            "ended before its sync did: {stdout}"
        );
        std::fs::write(base.join("sync.rc"), "1").unwrap();
        let (ok, stdout, _) = run_sh(&flushing, &base, &base);
        assert!(!ok && stdout.contains("devicelab-fail flush"), "{stdout}");
        std::fs::remove_dir_all(&base).unwrap();
    }

    /// The packages step for one `.deb` (netcat-openbsd), run by a real `sh` with `tools`
    /// (name, shell body) as programs on PATH (a shell function cannot have a `-`); each
    /// writes each call's arguments as a line of `<name>.calls`. Returns whether it succeeded,
    /// its output and each tool's calls.
    fn packages_step_with(
        tools: &[(&str, &str)],
        lockwait: u64,
    ) -> (bool, String, Vec<Vec<String>>) {
        let mut d = crate::agent::reference::agent();
        d.packages = vec![Package::Deb {
            name: "netcat-openbsd".into(),
            files: Default::default(),
        }];
        let debs = vec![("netcat-openbsd".to_owned(), vec![1])];
        let bin = scratch("packages");
        for (name, body) in tools {
            tool(&bin, name, &format!("echo \"$*\" >> \"$0.calls\"\n{body}"));
        }
        let script = format!("{PROLOGUE}lockwait={lockwait}\n{}", packages(&d, &debs));
        let (ok, stdout, _) = run_sh(&script, std::path::Path::new("/nonexistent"), &bin);
        let calls = tools
            .iter()
            .map(|(tool, _)| {
                std::fs::read_to_string(bin.join(format!("{tool}.calls")))
                    .map_or_else(|_| Vec::new(), |c| c.lines().map(str::to_owned).collect())
            })
            .collect();
        std::fs::remove_dir_all(&bin).unwrap();
        (ok, stdout, calls)
    }

    /// `dpkg-deb` for a `.deb` called netcat-openbsd, version 1.0; `sleep` that returns at
    /// once; `date +%s` that is 5 s later at every call (each try and its sleep take 5 s).
    const DEB: (&str, &str) = (
        "dpkg-deb",
        r#"case $3 in Package) echo netcat-openbsd;; *) echo 1.0;; esac"#,
    );
    const NO_SLEEP: (&str, &str) = ("sleep", "exit 0");
    const NOT_INSTALLED: (&str, &str) = ("dpkg-query", "exit 1");
    const CLOCK: (&str, &str) = ("date", r#"echo $(( $(wc -l < "$0.calls") * 5 ))"#);
    /// The tools of a packages step whose `dpkg` is `dpkg`.
    fn with_dpkg(dpkg: &str) -> [(&str, &str); 5] {
        [DEB, ("dpkg", dpkg), NO_SLEEP, NOT_INSTALLED, CLOCK]
    }

    /// A `.deb` of another name stops the step there, naming the package, before dpkg runs.
    #[test]
    fn a_deb_of_another_name_stops_the_packages_step() {
        let (ok, stdout, calls) = packages_step_with(
            &[
                ("dpkg-deb", "echo netcat-traditional"),
                ("dpkg", "echo dpkg ran"),
            ],
            0,
        );
        assert!(!ok, "{stdout}");
        assert!(
            stdout.contains("netcat-traditional\ndevicelab-fail packages name netcat-openbsd"),
            "{stdout}"
        );
        assert!(calls[1].is_empty(), "dpkg never ran: {stdout}");
    }

    /// dpkg locked by another process (apt-daily) is waited for, trying every 5 s until the
    /// lock wait has passed: the install goes on once the lock is free, and a lock that stays
    /// fails the step saying so. Each wording dpkg and apt use counts; any other failure fails
    /// the step at once.
    #[test]
    fn a_locked_package_manager_is_waited_for_within_the_lock_wait() {
        let locked_twice = r#"if [ "$(wc -l < "$0.calls")" -le 2 ]; then
  echo "dpkg: error: dpkg frontend lock was locked by another process with pid 4242" >&2; exit 2; fi"#;
        let (ok, stdout, calls) = packages_step_with(&with_dpkg(locked_twice), 60);
        assert!(ok, "{stdout}");
        assert!(
            stdout.contains("devicelab-step packages changed"),
            "{stdout}"
        );
        assert_eq!(calls[1].len(), 3, "three tries: {stdout}");
        assert_eq!(calls[2], ["5", "5"], "two waits of 5 s");
        assert!(
            calls[1].iter().all(|args| args.starts_with("-i ")),
            "{:?}",
            calls[1]
        );

        for says in [
            "E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 4242 (apt-get)",
            "dpkg: error: dpkg database lock was locked by another process with pid 4242",
            "dpkg: error: dpkg status database is locked by another process",
        ] {
            let dpkg = format!("echo '{says}' >&2; exit 2");
            let (ok, stdout, calls) = packages_step_with(&with_dpkg(&dpkg), 10);
            assert!(!ok, "{stdout}");
            assert!(
                stdout.contains(&format!("{says}\ndevicelab-fail packages locked 10")),
                "{says}: {stdout}"
            );
            assert_eq!(calls[1].len(), 2, "tried at 0 and 5 s, given up at 10 s");
        }

        let broken = "echo 'dpkg: dependency problems prevent configuration' >&2; exit 1";
        let (ok, stdout, calls) = packages_step_with(&with_dpkg(broken), 60);
        assert!(!ok, "{stdout}");
        assert!(stdout.contains("devicelab-fail packages deb"), "{stdout}");
        assert_eq!(
            (calls[1].len(), calls[2].len()),
            (1, 0),
            "no wait for another failure"
        );
    }

    #[test]
    fn the_script_is_valid_sh_and_the_bundle_holds_every_file() {
        let mut d = crate::agent::reference::agent();
        d.packages = vec![
            Package::Deb {
                name: "netcat-openbsd".into(),
                files: Default::default(),
            },
            Package::Mirror("curl".into()),
        ];
        for service in [
            d.service.clone(),
            Service::System {
                unit: "a.service".into(),
                text: String::new(),
            },
        ] {
            d.service = service;
            let (script, names) = script_of(&d, Some("linger"));
            assert_eq!(names, ["deb0.deb", "file0", "unit", "onboard.sh"]);
            let check = std::process::Command::new("sh")
                .arg("-n")
                .arg("-c")
                .arg(&script)
                .output()
                .unwrap();
            assert!(
                check.status.success(),
                "sh -n: {}\n{script}",
                String::from_utf8_lossy(&check.stderr)
            );
            let linger = d.service.user().map(|_| "linger");
            let steps = ["packages", "user", "config", "unit", "service"];
            for step in steps.into_iter().chain(linger) {
                let reported = [
                    format!("report {step} "),
                    format!("report '{step}' "),
                    format!("step {step} "),
                ];
                assert!(
                    reported.iter().any(|r| script.contains(r.as_str())),
                    "{step}:\n{script}"
                );
            }
        }
    }
}
