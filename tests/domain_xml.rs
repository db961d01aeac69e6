//! The rendered domain XML, pinned by snapshots in snapshots/ (review changes with
//! `cargo insta review`). The aarch64 one is what reviewers read on every XML change.

use devicelab::VmArchitecture;
use devicelab::host::domain_xml::{
    DomainXmlParams, RunOwner, UefiPflash, digest_of_defined, mac_for, render,
};
use devicelab::model::arch::Accelerator;
use std::path::PathBuf;

fn params(arch: VmArchitecture, accel: Accelerator) -> DomainXmlParams {
    let pool = PathBuf::from("/var/lib/devicelab/pool");
    let name = format!("devicelab-e2e-{}-0badc0de", arch.debian_name());
    DomainXmlParams {
        arch,
        accel,
        vcpus: 2,
        memory_mib: 2048,
        emulator: PathBuf::from(format!("/usr/bin/{}", arch.emulator_binary())),
        disk: pool.join(format!("{name}.qcow2")),
        seed: pool.join(format!("{name}-seed.img")),
        network: "default".into(),
        mac: mac_for(&name),
        uefi: (arch == VmArchitecture::Aarch64).then(|| UefiPflash {
            code: PathBuf::from("/usr/share/AAVMF/AAVMF_CODE.fd"),
            vars: pool.join(format!("{name}-VARS.fd")),
        }),
        qemu_args: if arch == VmArchitecture::Aarch64 {
            ["-cpu", "max,pauth-impdef=on", "-accel", "tcg,thread=multi"]
                .map(String::from)
                .to_vec()
        } else {
            Vec::new()
        },
        owner: RunOwner {
            run_id: "0badc0de".into(),
            pid: 4242,
        },
        name,
    }
}

fn snapshot(name: &str, xml: &str) {
    insta::with_settings!({ snapshot_path => "../snapshots", prepend_module_to_snapshot => false }, {
        insta::assert_snapshot!(name, xml);
    });
}

#[test]
fn x86_64_tcg() {
    snapshot(
        "domain_x86_64_tcg",
        &render(&params(VmArchitecture::X86_64, Accelerator::Tcg)).xml,
    );
}

#[test]
fn x86_64_kvm() {
    snapshot(
        "domain_x86_64_kvm",
        &render(&params(VmArchitecture::X86_64, Accelerator::Kvm)).xml,
    );
}

#[test]
fn aarch64_tcg() {
    snapshot(
        "domain_aarch64_tcg",
        &render(&params(VmArchitecture::Aarch64, Accelerator::Tcg)).xml,
    );
}

#[test]
fn the_digest_identifies_the_definition() {
    let a = render(&params(VmArchitecture::X86_64, Accelerator::Tcg));
    assert_eq!(
        digest_of_defined(&a.xml).as_deref(),
        Some(a.digest.as_str())
    );
    // libvirt hands the XML back with double quotes: still found.
    assert_eq!(
        digest_of_defined(&a.xml.replace('\'', "\"")).as_deref(),
        Some(a.digest.as_str())
    );
    let mut p = params(VmArchitecture::X86_64, Accelerator::Tcg);
    p.memory_mib = 4096;
    assert_ne!(
        render(&p).digest,
        a.digest,
        "a changed definition must not look identical"
    );
}

#[test]
fn paths_and_names_are_escaped() {
    let mut p = params(VmArchitecture::X86_64, Accelerator::Tcg);
    p.disk = PathBuf::from("/tmp/it's <odd> & fun.qcow2");
    let xml = render(&p).xml;
    assert!(
        xml.contains("/tmp/it&apos;s &lt;odd&gt; &amp; fun.qcow2"),
        "{xml}"
    );
}

#[test]
fn the_qemu_namespace_is_declared_exactly_when_used() {
    let arm = render(&params(VmArchitecture::Aarch64, Accelerator::Tcg)).xml;
    assert!(arm.contains("xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'"));
    assert!(arm.contains("<qemu:arg value='max,pauth-impdef=on'/>"));
    let x86 = render(&params(VmArchitecture::X86_64, Accelerator::Tcg)).xml;
    assert!(!x86.contains("qemu:"));
}
