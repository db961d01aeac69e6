//! A VM name reused within the DHCP lease time (an hour), as the docs' own `my-vm` example run
//! twice does: every instance has its own MAC, so the second provisioning finds its own lease
//! instead of waiting on the first instance's stale one ("No route to host").
//! Boots two VMs, one after the other, to SSH only: `--features e2e`.

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
