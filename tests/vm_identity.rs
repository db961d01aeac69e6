//! A VM's name is its own: a name reused within the DHCP lease time (an hour), as the docs' own
//! `my-vm` example run twice does, gets a MAC of its own, so the second provisioning finds its
//! own lease instead of waiting on the first instance's stale one ("No route to host"); a name
//! in use by a running VM, asked for again by another test (in this process or another), is
//! refused without touching the running VM; a domain whose owner still runs is never redefined.
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

/// A domain whose owner, another process, still runs is never redefined (which would destroy
/// it): the definition is refused with the owner named. (pid 1 stands for the other process.)
#[test]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs libvirt: run with --features e2e"
)]
fn a_domain_of_a_live_run_is_never_redefined() {
    use devicelab::host::domain_xml::{self, RunOwner};
    use devicelab::host::libvirt::{Libvirt, LibvirtError};
    let config = devicelab::config::HarnessConfig::from_env().unwrap();
    let lv = Libvirt::open(&config.libvirt_uri).unwrap();
    let name = format!("devicelab-owned-{}", hex::encode(rand::random::<[u8; 3]>()));
    let params = |pid: u32, memory_mib: u64| domain_xml::DomainXmlParams {
        name: name.clone(),
        arch: VmArchitecture::X86_64,
        accel: devicelab::Accelerator::Tcg,
        vcpus: 1,
        memory_mib,
        emulator: "/usr/bin/qemu-system-x86_64".into(),
        disk: "/nonexistent/disk.qcow2".into(),
        seed: "/nonexistent/seed.img".into(),
        network: config.network.clone(),
        mac: "52:54:00:12:34:56".into(),
        serial_log: "/nonexistent/serial.log".into(),
        uefi: None,
        qemu_args: vec![],
        owner: RunOwner {
            run_id: "other".into(),
            pid,
        },
    };
    let theirs = domain_xml::render(&params(1, 512));
    let defined = lv.define(&name, &theirs).unwrap();
    let ours = domain_xml::render(&params(std::process::id(), 1024));
    let refused = lv.define(&name, &ours);
    let still_theirs = lv
        .domain(&name)
        .map_err(|e| e.to_string())
        .and_then(|d| d.info().map(|i| i.max_mem).map_err(|e| e.to_string()));
    lv.remove_domain(&defined, &name).unwrap();
    assert!(
        matches!(&refused, Err(LibvirtError::OwnedByLiveRun { pid: 1, .. })),
        "{:?}",
        refused.map(drop)
    );
    assert_eq!(
        still_theirs.unwrap(),
        512 * 1024,
        "their definition is untouched"
    );
}
