//! The serial console log: its tail for error messages, and the lines that mean a boot has
//! failed for good (so the harness fails at once instead of waiting out a 30-minute budget).

use std::path::Path;

/// Console lines after which the boot cannot succeed, with what they mean.
const FATAL: &[(&str, &str)] = &[
    (
        "Minimal BASH-like line editing is supported",
        "GRUB found no grub.cfg (or not the root filesystem holding it) and stopped at its prompt",
    ),
    (
        "grub rescue>",
        "GRUB could not load its modules and stopped at the rescue prompt",
    ),
    (
        "UEFI Interactive Shell",
        "the UEFI firmware found nothing to boot and started its shell",
    ),
    ("No bootable device", "the BIOS found nothing to boot"),
    ("Kernel panic - not syncing", "the guest kernel panicked"),
    (
        "You are in emergency mode",
        "systemd dropped to the emergency shell",
    ),
    (
        "Give root password for maintenance",
        "systemd dropped to the emergency shell",
    ),
    (
        "(initramfs)",
        "the initramfs could not mount the root filesystem",
    ),
    (
        "ALERT!  UUID=",
        "the initramfs could not find the root filesystem",
    ),
    ("Failed to start cloud-init", "a cloud-init stage failed"),
    ("Failed to start cloud-final", "a cloud-init stage failed"),
    ("Failed to start cloud-config", "a cloud-init stage failed"),
    (
        "Failed to start cloud-init-local",
        "a cloud-init stage failed",
    ),
    // The harness reaches the device through sshd: once it has failed to start (systemd
    // retries it a few times, each as hopeless as the first), SSH cannot come back this boot.
    // systemd shortens unit names to the console's width (`ssh.servic…`), so match the
    // start of the name, and the unit's description (Debian's and Ubuntu's) on a failure line.
    (
        "Failed to start ssh.",
        "sshd failed to start, so SSH cannot come back this boot",
    ),
    (
        "Failed to start sshd.",
        "sshd failed to start, so SSH cannot come back this boot",
    ),
    (
        "- OpenBSD Secure Shell server.",
        "sshd failed to start, so SSH cannot come back this boot",
    ),
];

/// What the guest itself prints about the files the harness's access depends on (the seed's
/// `bootcmd` checks them on every boot, before sshd starts): direct evidence for a diagnosis.
pub const EVIDENCE_MARK: &str = "devicelab-evidence:";

/// The evidence lines (without the mark) printed after byte `offset`.
pub fn evidence_after(path: &Path, offset: u64) -> Vec<String> {
    boot_text(path, offset)
        .lines()
        .map(strip_ansi)
        .filter_map(|l| {
            l.split_once(EVIDENCE_MARK)
                .map(|(_, rest)| rest.trim().to_owned())
        })
        .collect()
}

/// What in this boot's console `text` says the boot has finished, the guest now idle: a getty's
/// login prompt, or cloud-init's final message (printed on every boot, also by an image that
/// puts no getty on the serial console). `None` while neither is there.
pub fn idle_marker_in(text: &str) -> Option<&'static str> {
    if login_prompt_in(text) {
        return Some("its login prompt");
    }
    text.lines()
        .map(strip_ansi)
        .any(|l| l.contains("Cloud-init v. ") && l.contains(" finished at "))
        .then_some("cloud-init's final message")
}

/// Whether a getty's login prompt (`<host> login: `) is in `text`. Later console output often
/// continues on the prompt's line.
fn login_prompt_in(text: &str) -> bool {
    text.lines().map(strip_ansi).any(|l| {
        l.split_once(" login:")
            .is_some_and(|(host, _)| !host.is_empty() && !host.contains(char::is_whitespace))
    })
}

/// The first line after byte `offset` that contains `text` (ANSI escapes stripped).
pub fn line_with_after(path: &Path, offset: u64, text: &str) -> Option<String> {
    boot_text(path, offset)
        .lines()
        .map(strip_ansi)
        .find(|l| l.contains(text))
        .map(|l| l.trim().to_owned())
}

/// What the log holds after byte `offset` (this boot's output), lossily decoded.
pub fn boot_text(path: &Path, offset: u64) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(bytes.get(offset as usize..).unwrap_or_default()).into_owned()
}

/// The first fatal line in the log, with its meaning.
pub fn fatal_line(path: &Path) -> Option<(String, &'static str)> {
    fatal_line_after(path, 0)
}

/// Like [`fatal_line`], looking only at what was written after byte `offset` (this boot's output).
pub fn fatal_line_after(path: &Path, offset: u64) -> Option<(String, &'static str)> {
    fatal_line_in(&boot_text(path, offset))
}

/// [`fatal_line_after`] on text already read.
pub fn fatal_line_in(text: &str) -> Option<(String, &'static str)> {
    text.lines().map(strip_ansi).find_map(|line| {
        FATAL
            .iter()
            .find(|(needle, _)| line.contains(needle) && is_failure(&line, needle))
            .map(|(_, meaning)| (line.trim().to_owned(), *meaning))
    })
}

/// A description needle (starting with "- ") only counts on a failure line.
fn is_failure(line: &str, needle: &str) -> bool {
    !needle.starts_with("- ") || line.contains("Failed to start")
}

/// The log's bytes after byte `offset` (none if it is shorter or unreadable): read from there,
/// not from the start, for a watch that polls often.
pub fn bytes_after(path: &Path, offset: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut out = Vec::new();
    if let Ok(mut file) = std::fs::File::open(path)
        && file.seek(SeekFrom::Start(offset)).is_ok()
    {
        let _ = file.read_to_end(&mut out);
    }
    out
}

/// A watch for a line with a text in a log read piece by piece ([`bytes_after`]): a line split
/// across two reads, or a character split across two reads, is whole when it is matched.
#[derive(Debug, Default)]
pub struct LineWatch {
    /// The last, incomplete line read so far (raw bytes: a character may be cut).
    tail: Vec<u8>,
}

impl LineWatch {
    /// Feeds the next bytes of the log; returns the first line (ANSI escapes stripped,
    /// trimmed) that contains `text`. The last line, incomplete until its newline, is matched
    /// too, and read again with what follows.
    pub fn feed(&mut self, bytes: &[u8], text: &str) -> Option<String> {
        self.tail.extend_from_slice(bytes);
        let found = String::from_utf8_lossy(&self.tail)
            .lines()
            .map(strip_ansi)
            .find(|l| l.contains(text))
            .map(|l| l.trim().to_owned());
        if let Some(end) = self.tail.iter().rposition(|b| *b == b'\n') {
            self.tail.drain(..=end);
        }
        found
    }
}

/// Current size of the log: where this boot's output will start.
pub fn len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The last `n` non-empty lines, ANSI escapes stripped.
pub fn tail(path: &Path, n: usize) -> Vec<String> {
    let Ok(bytes) = std::fs::read(path) else {
        return Vec::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<String> = text
        .lines()
        .map(strip_ansi)
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else if c != '\r' {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_or_a_character_split_across_reads_is_matched_whole() {
        let mut watch = LineWatch::default();
        assert_eq!(watch.feed(b"boot\nUpdate Pro", "Update Progress"), None);
        assert_eq!(
            watch.feed(b"gress 40%\r\nnext\n", "Update Progress"),
            Some("Update Progress 40%".into())
        );
        // "é" is two bytes: the first read ends inside it.
        let bytes = "état: fini\n".as_bytes();
        let mut watch = LineWatch::default();
        assert_eq!(watch.feed(&bytes[..1], "état"), None);
        assert_eq!(watch.feed(&bytes[1..], "état"), Some("état: fini".into()));
        // Escapes are stripped; older lines are not read again.
        let mut watch = LineWatch::default();
        assert_eq!(watch.feed(b"\x1b[0;32mmark\x1b[0m old\n", "nothing"), None);
        assert_eq!(watch.feed(b"new\n", "mark"), None);
    }

    #[test]
    fn bytes_after_reads_from_the_offset_on() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), "old line\nnew line\n").unwrap();
        assert_eq!(bytes_after(f.path(), 9), b"new line\n");
        assert!(bytes_after(f.path(), 99).is_empty());
        assert!(bytes_after(Path::new("/nonexistent/console.log"), 0).is_empty());
    }

    #[test]
    fn finds_a_panic_among_escape_codes_and_quotes_the_tail() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            f.path(),
            "\x1b[0;32m  OK  \x1b[0m] Started foo\r\n[ 3.1] Kernel panic - not syncing: VFS: Unable to mount root fs\r\nlast\n",
        )
        .unwrap();
        let (line, meaning) = fatal_line(f.path()).unwrap();
        assert!(line.starts_with("[ 3.1] Kernel panic"), "{line}");
        assert_eq!(meaning, "the guest kernel panicked");
        assert_eq!(
            tail(f.path(), 2),
            vec![
                "[ 3.1] Kernel panic - not syncing: VFS: Unable to mount root fs",
                "last"
            ]
        );
        assert_eq!(tail(f.path(), 5)[0], "  OK  ] Started foo");
    }

    #[test]
    fn a_grub_prompt_is_fatal() {
        // What the serial log showed for an arm64 image whose grub.cfg was missing.
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            f.path(),
            "Welcome to GRUB!\r\n\r\n   Minimal BASH-like line editing is supported. For the first word, TAB   \r\n\r\ngrub> ",
        )
        .unwrap();
        let (_, meaning) = fatal_line(f.path()).unwrap();
        assert!(meaning.contains("grub.cfg"), "{meaning}");
    }

    #[test]
    fn a_failed_sshd_is_fatal_and_the_guests_evidence_is_read_for_this_boot_only() {
        // A second boot's console with the host keys empty after an early power cut.
        let f = tempfile::NamedTempFile::new().unwrap();
        // As seen: the prompt, then a cloud-init line continuing on it.
        let first_boot = "devicelab-evidence: stale line from the first boot\r\n\
                          dev-x86 login: [   56.9] cloud-init[408]: running 'modules:config'\r\n";
        std::fs::write(
            f.path(),
            format!(
                "{first_boot}[    5.1] cloud-init[301]: devicelab-evidence: /etc/ssh/ssh_host_ed25519_key is empty (0 bytes)\r\n\
                 [\x1b[0;1;31mFAILED\x1b[0m] Failed to start \x1b[0;1;39mssh.servic\u{2026}\x1b[0m - OpenBSD Secure Shell server.\r\n"
            ),
        )
        .unwrap();
        let offset = first_boot.len() as u64;
        let (line, meaning) = fatal_line_after(f.path(), offset).unwrap();
        assert!(line.contains("ssh.servic"), "{line}");
        // A healthy start of the same unit is not a failure.
        let ok = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            ok.path(),
            "[  OK  ] Started ssh.service - OpenBSD Secure Shell server.\n",
        )
        .unwrap();
        assert_eq!(fatal_line(ok.path()), None);
        assert!(meaning.contains("sshd failed"), "{meaning}");
        assert_eq!(
            evidence_after(f.path(), offset),
            vec!["/etc/ssh/ssh_host_ed25519_key is empty (0 bytes)"]
        );
        let marker = |path: &Path, offset| idle_marker_in(&boot_text(path, offset));
        assert_eq!(marker(f.path(), 0), Some("its login prompt"));
        let not_a_prompt = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            not_a_prompt.path(),
            "[  3.2] systemd[1]: Started getty: login: prompts\n\
             [ 41.8] cloud-init[338]: Cloud-init v. 22.4.2 running 'modules:final' at Mon, 30 Nov 2026 15:54:40 +0000. Up 41.61 seconds.\n",
        )
        .unwrap();
        assert_eq!(marker(not_a_prompt.path(), 0), None);
        assert_eq!(
            marker(f.path(), offset),
            None,
            "this boot has no prompt yet"
        );
        // An image without a getty on the serial console: cloud-init's final message.
        let no_getty = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            no_getty.path(),
            "[ 62.1] cloud-init[512]: Cloud-init v. 22.4.2 finished at Mon, 30 Nov 2026 15:55:01 +0000. \
             Datasource DataSourceNoCloud [seed=/dev/vdb][dsmode=net].  Up 62.10 seconds\r\n",
        )
        .unwrap();
        assert_eq!(
            marker(no_getty.path(), 0),
            Some("cloud-init's final message")
        );
    }

    #[test]
    fn a_healthy_boot_is_not_fatal() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            f.path(),
            "[  OK  ] Finished cloud-init.service - Cloud-init: Network Stage.\n",
        )
        .unwrap();
        assert_eq!(fatal_line(f.path()), None);
        assert_eq!(fatal_line(Path::new("/nonexistent")), None);
    }
}
