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

/// Removes `vm`'s rules, if any, and checks they are gone (blocking). A host without iptables
/// (or without its filter table) has none, and a process that may not read the rules cannot
/// have added any.
pub fn unblock(vm: &str) -> Result<(), FirewallError> {
    let tag = tag(vm);
    for chain in CHAINS {
        let Some(listed) = listing(chain)? else {
            return Ok(());
        };
        for rule in listed.lines() {
            let words: Vec<&str> = rule.split_whitespace().collect();
            if !words.iter().any(|w| w.trim_matches('"') == tag) || words.first() != Some(&"-A") {
                continue;
            }
            let mut args: Vec<String> = words
                .iter()
                .map(|w| w.trim_matches('"').to_owned())
                .collect();
            args[0] = "-D".into();
            iptables(&args)?;
        }
    }
    let left = rules_of(vm)?;
    if !left.is_empty() {
        return Err(FirewallError::StillBlocked {
            vm: vm.to_owned(),
            rules: left.join("; "),
        });
    }
    Ok(())
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

/// `vm`'s rules now, as `iptables -S` prints them (blocking).
pub fn rules_of(vm: &str) -> Result<Vec<String>, FirewallError> {
    let tag = tag(vm);
    let mut rules = Vec::new();
    for chain in CHAINS {
        let listed = iptables(&["-S".into(), chain.into()])?;
        rules.extend(
            listed
                .lines()
                .filter(|l| l.split_whitespace().any(|w| w.trim_matches('"') == tag))
                .map(str::to_owned),
        );
    }
    Ok(rules)
}

/// The VMs that have rules now, each once (blocking); none where no rule of ours can exist.
pub fn partitioned_vms() -> Result<Vec<String>, FirewallError> {
    let mut vms = std::collections::BTreeSet::new();
    for chain in CHAINS {
        let Some(listed) = listing(chain)? else {
            return Ok(Vec::new());
        };
        vms.extend(listed.lines().flat_map(|l| {
            l.split_whitespace()
                .filter_map(|w| w.trim_matches('"').strip_prefix(TAG))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        }));
    }
    Ok(vms.into_iter().collect())
}

/// Whether `vm` has rules now (blocking; `false` without iptables).
pub fn is_blocked(vm: &str) -> bool {
    rules_of(vm).is_ok_and(|r| !r.is_empty())
}
