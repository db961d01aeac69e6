//! A VM's name is its own: a name reused within the DHCP lease time (an hour), as the docs' own
//! `my-vm` example run twice does, gets a MAC of its own, so the second provisioning finds its
//! own lease instead of waiting on the first instance's stale one ("No route to host"); a name
//! in use by a running VM, asked for again by another test (in this process or another), is
//! refused without touching the running VM.
//! Boots two VMs, one after the other, to SSH only (the other process's claim boots none):
//! `--features e2e`.

mod common;

use common::mac_of;
use devicelab::fixtures::*;
use devicelab::{Readiness, VirtualMachineSpec};
use std::sync::Arc;

#[rstest]
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "boots two VMs: run with --features e2e"
)]
async fn the_same_name_provisioned_twice_in_a_row_gets_its_own_lease(
    #[future] lab: Arc<Lab>,
    arch: VmArchitecture,
) {
    let lab = lab.await;
    let name = lab.vm_name("reuse", arch);
    let spec = || VirtualMachineSpec::new(&name, arch).ready_when(Readiness::SshLogin);
    let first = lab.vm(spec()).await.unwrap();
    let (first_ip, first_mac) = (first.ip().expect("a leased VM"), mac_of(&first));
    // Another test (its own lab) asks for the same name while the first VM runs: refused,
    // with the owner named, and the first VM untouched.
    let other_test = Lab::from_env().await.unwrap();
    let refused = other_test.vm(spec()).await.expect_err("the name is in use");
    assert!(
        matches!(refused, devicelab::VmError::NameInUse { .. })
            && refused.to_string().contains("Lab::vm_name"),
        "{refused}"
    );
    first
        .succeed("true")
        .await
        .expect("the first VM still runs");
    first.remove().await.unwrap();
    // The first instance's lease is still listed by dnsmasq; the second must not wait on it.
    let second = lab.vm(spec()).await.unwrap();
    second.succeed("true").await.unwrap();
    assert_ne!(mac_of(&second), first_mac, "each instance has its own MAC");
    eprintln!(
        "first instance {first_ip} ({first_mac}), second {} ({})",
        second.ip().expect("a leased VM"),
        mac_of(&second)
    );
}

/// The claim on a name holds across processes, not only across the tests of one: a name whose
/// claim another process holds (util-linux's `flock`, holding the claim file with a run's
/// record in it) is refused at once, before a VM slot or anything else is taken, naming the
/// holder; once that process is gone the claim is free.
#[rstest]
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs a host ready for VMs: run with --features e2e"
)]
async fn a_name_claimed_by_another_process_is_refused_at_once(
    #[future] lab: Arc<Lab>,
    arch: VmArchitecture,
) {
    use devicelab::support::lock;
    let lab = lab.await;
    let name = lab.vm_name("xclaim", arch);
    let claims = lab.config.runs_dir().join(devicelab::host::reaper::CLAIMS);
    std::fs::create_dir_all(&claims).unwrap();
    let path = claims.join(format!("{name}.lock"));
    std::fs::write(&path, "run c1a1m0ff (another process)\n").unwrap();
    /// The other process; killed, and its claim file removed, however the test ends.
    struct Other(std::process::Child, std::path::PathBuf);
    impl Drop for Other {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
            let _ = std::fs::remove_file(&self.1);
        }
    }
    let mut other = Other(
        std::process::Command::new(common::require("flock", "apt install util-linux"))
            .args(["--nonblock", "--no-fork"])
            .arg(&path)
            .args(["sleep", "300"])
            .spawn()
            .unwrap(),
        path.clone(),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !lock::is_held(&path) {
        assert!(
            std::time::Instant::now() < deadline,
            "flock never took the claim"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    let started = std::time::Instant::now();
    let refused = lab
        .vm(VirtualMachineSpec::new(&name, arch).ready_when(Readiness::SshLogin))
        .await
        .expect_err("the name is claimed by another process");
    assert!(
        matches!(refused, devicelab::VmError::NameInUse { .. })
            && refused
                .to_string()
                .contains("run c1a1m0ff (another process)"),
        "{refused}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "refused at once, not after a wait: {:?}",
        started.elapsed()
    );
    let lv = devicelab::host::libvirt::Libvirt::open(&lab.config.libvirt_uri).unwrap();
    assert!(!lv.has_domain(&name).unwrap(), "nothing was made");

    other.0.kill().unwrap();
    other.0.wait().unwrap();
    assert!(!lock::is_held(&path), "the claim goes with its process");
}
