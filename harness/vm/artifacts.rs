//! Failure artifacts: what explains a failure, saved into the VM's run dir (which then
//! outlives the VM). The serial log and the domain XML are there from the start; this adds
//! what only the guest can tell, each item read over SSH within its budget, best effort.

use crate::ssh::login::ssh_login;
use crate::ssh::session::SshTarget;
use std::path::Path;
use std::time::Duration;

/// What every failure keeps from the guest: cloud-init's status and logs, this boot's journal.
pub const GUEST_ITEMS: &[(&str, &str)] = &[
    ("cloud-init-status.txt", "sudo -n cloud-init status --long"),
    ("cloud-init.log", "sudo -n cat /var/log/cloud-init.log"),
    (
        "cloud-init-output.log",
        "sudo -n cat /var/log/cloud-init-output.log",
    ),
    ("journal.txt", "sudo -n journalctl -b --no-pager -n 500"),
];

/// Runs each `(file, command)` of [`GUEST_ITEMS`] and `extra` over one SSH session to
/// `target`, each within `budget`, and writes its output (or why there is none) to `dir/file`.
/// Returns the files that could not be written, each with why.
pub async fn collect(
    target: Option<&SshTarget>,
    dir: &Path,
    extra: &[(&str, &str)],
    budget: Duration,
) -> Vec<String> {
    let mut unkept = Vec::new();
    // Retried within the item budget: a guest restarting sshd (cloud-init does, mid first
    // boot) refuses connections for a moment, and its logs are what explains the failure.
    let session = match target {
        Some(t) => ssh_login(t, budget).await.map_err(|e| e.to_string()),
        None => Err("the guest had no address yet".to_owned()),
    };
    for (file, command) in GUEST_ITEMS.iter().chain(extra) {
        let text = match &session {
            Ok(s) => match s.exec_within(command, None, budget).await {
                Ok(out) => format!("{}{}", out.stdout, out.stderr),
                Err(e) => format!("could not run `{command}` within {budget:?}: {e}\n"),
            },
            Err(why) => format!("could not reach the guest to run `{command}`: {why}\n"),
        };
        if let Err(e) = tokio::fs::write(dir.join(file), text).await {
            tracing::warn!("cannot write {}: {e}", dir.join(file).display());
            unkept.push(format!("{file}: {e}"));
        }
    }
    unkept
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Evidence that cannot be written (a full or missing disk) is reported, each file with
    /// why, not only logged.
    #[tokio::test]
    async fn evidence_that_cannot_be_written_is_reported() {
        let dir = Path::new("/nonexistent/devicelab-run");
        let unkept = collect(None, dir, &[("extra.txt", "true")], Duration::from_secs(1)).await;
        assert_eq!(unkept.len(), GUEST_ITEMS.len() + 1, "{unkept:?}");
        assert!(
            unkept.iter().any(|u| u.starts_with("journal.txt: ")),
            "{unkept:?}"
        );
    }
}
