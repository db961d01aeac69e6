//! The harness's own firewall rules: a partitioned VM's traffic silently dropped (a NAT that
//! forgot the connection: no reset, no ICMP, TCP keeps waiting) where the harness owns the
//! network, i.e. the host side of the libvirt network.
//! Rules are iptables rules tagged `devicelab:<vm>`, so healing, the VM's teardown and the
//! reaper of a killed run remove exactly that VM's rules.

use std::net::Ipv4Addr;
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error(
        "cannot run iptables ({0}): partitioning a VM needs iptables on the host and root \
         (apt install iptables)"
    )]
    Missing(std::io::Error),
    #[error("iptables {args} failed: {stderr} (partitioning a VM needs root)")]
    Failed { args: String, stderr: String },
    #[error(
        "VM {vm}: its partition rules are still in place after removing them: {rules} \
         (remove them with `iptables -D`, or `devicelab clean` once its run is gone)"
    )]
    StillBlocked { vm: String, rules: String },
}

/// Every chain the VM's packets cross on the host: to the host itself (the NATS server on the
/// network's gateway), from it (the harness's SSH), and forwarded (a container behind NAT).
const CHAINS: [&str; 3] = ["INPUT", "OUTPUT", "FORWARD"];

/// What every rule's comment starts with; the VM's name follows.
const TAG: &str = "devicelab:";

fn tag(vm: &str) -> String {
    format!("{TAG}{vm}")
}

/// `iptables -S <chain>`, or `None` where no rule of ours can exist (no iptables, no filter
/// table, no right to read it); any other failure is an error, never taken for "no rules".
fn listing(chain: &str) -> Result<Option<String>, FirewallError> {
    match iptables(&["-S".into(), chain.into()]) {
        Ok(listed) => Ok(Some(listed)),
        Err(FirewallError::Missing(_)) => Ok(None),
        Err(FirewallError::Failed { stderr, .. }) if cannot_have_rules(&stderr) => Ok(None),
        Err(e) => Err(e),
    }
}

fn iptables(args: &[String]) -> Result<String, FirewallError> {
    let out = Command::new("iptables")
        .args(["-w", "5"])
        .args(args)
        .output()
        .map_err(FirewallError::Missing)?;
    if !out.status.success() {
        return Err(FirewallError::Failed {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Drops every packet from and to `ip` (blocking). Idempotent.
pub fn block(vm: &str, ip: Ipv4Addr) -> Result<(), FirewallError> {
    unblock(vm)?;
    let ip = format!("{ip}/32");
    for (chain, dir) in [
        ("INPUT", "-s"),
        ("OUTPUT", "-d"),
        ("FORWARD", "-s"),
        ("FORWARD", "-d"),
    ] {
        let args: Vec<String> = [
            "-I",
            chain,
            "1",
            dir,
            &ip,
            "-m",
            "comment",
            "--comment",
            &tag(vm),
            "-j",
            "DROP",
        ]
        .map(str::to_owned)
        .to_vec();
        iptables(&args)?;
    }
    Ok(())
}

/// Removes `vm`'s rules, if any, and checks they are gone (blocking); returns how many it
/// removed. A host without iptables (or without its filter table) has none, and a process that
/// may not read the rules cannot have added any.
pub fn unblock(vm: &str) -> Result<usize, FirewallError> {
    let (mut removed, mut failed) = (0, None);
    for (words, _) in tagged(Some(vm))? {
        if words.first().map(String::as_str) != Some("-A") {
            continue;
        }
        let mut args = words;
        args[0] = "-D".into();
        match iptables(&args) {
            Ok(_) => removed += 1,
            // Removed meanwhile by another process (a reaper, the VM's own teardown): gone is
            // what was wanted; the check below says whether anything is left, and if so this
            // failure is the error.
            Err(e @ FirewallError::Failed { .. }) => failed = Some(e),
            Err(e) => return Err(e),
        }
    }
    let left = rules_of(vm)?;
    if !left.is_empty() {
        return Err(failed.unwrap_or_else(|| FirewallError::StillBlocked {
            vm: vm.to_owned(),
            rules: left.join("; "),
        }));
    }
    Ok(removed)
}

/// iptables' answer where no rule of ours can exist: a user who may not read the rules, or a
/// kernel without the filter table (where `block` could never have added one).
fn cannot_have_rules(stderr: &str) -> bool {
    let s = stderr.to_ascii_lowercase();
    [
        "permission denied",
        "must be root",
        "table does not exist",
        "can't initialize iptables table",
        "protocol not supported",
    ]
    .iter()
    .any(|m| s.contains(m))
}

/// Every rule of ours in [`CHAINS`] (only `vm`'s, if given): its words as `iptables -S` prints
/// them (quotes dropped), and the VM its tag names. Blocking.
fn tagged(vm: Option<&str>) -> Result<Vec<(Vec<String>, String)>, FirewallError> {
    let mut rules = Vec::new();
    for chain in CHAINS {
        let Some(listed) = listing(chain)? else {
            continue;
        };
        for rule in listed.lines() {
            let words: Vec<String> = rule
                .split_whitespace()
                .map(|w| w.trim_matches('"').to_owned())
                .collect();
            let Some(of) = words.iter().find_map(|w| w.strip_prefix(TAG)) else {
                continue;
            };
            if vm.is_none_or(|vm| vm == of) {
                let of = of.to_owned();
                rules.push((words, of));
            }
        }
    }
    Ok(rules)
}

/// `vm`'s rules now, as `iptables -S` prints them (quotes dropped; blocking).
pub fn rules_of(vm: &str) -> Result<Vec<String>, FirewallError> {
    Ok(tagged(Some(vm))?
        .into_iter()
        .map(|(words, _)| words.join(" "))
        .collect())
}

/// The VMs that have rules now, each once (blocking); none where no rule of ours can exist.
pub fn partitioned_vms() -> Result<Vec<String>, FirewallError> {
    let vms: std::collections::BTreeSet<String> =
        tagged(None)?.into_iter().map(|(_, vm)| vm).collect();
    Ok(vms.into_iter().collect())
}

/// Whether `vm` has rules now (blocking; `false` without iptables).
pub fn is_blocked(vm: &str) -> bool {
    rules_of(vm).is_ok_and(|r| !r.is_empty())
}
