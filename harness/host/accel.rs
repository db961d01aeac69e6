//! Choosing the accelerator: real KVM where it can boot a stock guest, TCG otherwise; on this
//! machine from its `/dev/kvm`, on another libvirt host from what its libvirt says.

use crate::model::arch::{AccelChoice, Accelerator, VmArchitecture};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelDecision {
    pub accel: Accelerator,
    pub reason: String,
}

/// Decides the accelerator for a guest of `arch` on this host.
pub fn decide(arch: VmArchitecture, choice: AccelChoice) -> AccelDecision {
    decide_with(arch, choice, VmArchitecture::host(), Path::new("/"))
}

/// `root` lets tests point the probe at a fake /dev and /sys tree.
pub fn decide_with(
    arch: VmArchitecture,
    choice: AccelChoice,
    host: Option<VmArchitecture>,
    root: &Path,
) -> AccelDecision {
    if let Some(forced) = forced(choice) {
        return forced;
    }
    if host != Some(arch) {
        return tcg(format!(
            "guest is {arch}, host is {}",
            std::env::consts::ARCH
        ));
    }
    let kvm = root.join("dev/kvm");
    if !kvm.exists() {
        return tcg("no /dev/kvm".into());
    }
    // kvm_pvm exposes /dev/kvm without VMX/SVM: a stock guest kernel dies in its instruction
    // emulator (measured: ~100x slower, then emulation failures), so it is KVM in name only.
    if root.join("sys/module/kvm_pvm").exists() {
        return tcg("/dev/kvm is kvm_pvm, which cannot boot stock guest kernels".into());
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&kvm)
    {
        return tcg(format!(
            "cannot open /dev/kvm ({e}): add the user to group kvm"
        ));
    }
    AccelDecision {
        accel: Accelerator::Kvm,
        reason: "/dev/kvm is usable".into(),
    }
}

fn forced(choice: AccelChoice) -> Option<AccelDecision> {
    match choice {
        AccelChoice::Force(accel) => Some(AccelDecision {
            accel,
            reason: "forced by DEVICELAB_ACCEL".into(),
        }),
        AccelChoice::Auto => None,
    }
}

fn tcg(reason: String) -> AccelDecision {
    AccelDecision {
        accel: Accelerator::Tcg,
        reason,
    }
}

/// What a libvirt host says about running guests under KVM, read through its libvirt (for a
/// host that is not this machine: nothing of it is local).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// The host's architecture as libvirt names it (`x86_64`, `aarch64`).
    pub host_arch: String,
    /// Whether the host's CPU, its model's features expanded, has hardware virtualisation
    /// (`vmx` or `svm`; x86_64 hosts only).
    pub cpu_virt: bool,
    /// libvirt's domain capabilities for KVM guests of the host's architecture: its message
    /// if it has none.
    pub kvm: Result<(), String>,
}

/// Decides the accelerator for a guest of `arch` on the libvirt host `host` from what its
/// libvirt says (`facts`, or why it said nothing).
pub fn decide_from_libvirt(
    arch: VmArchitecture,
    choice: AccelChoice,
    host: &str,
    facts: &Result<HostFacts, String>,
) -> AccelDecision {
    if let Some(forced) = forced(choice) {
        return forced;
    }
    let facts = match facts {
        Ok(facts) => facts,
        Err(e) => {
            return tcg(format!(
                "libvirt on {host} did not say whether it offers KVM: {e}"
            ));
        }
    };
    if facts.host_arch != arch.name() {
        return tcg(format!(
            "guest is {arch}, host {host} is {}",
            facts.host_arch
        ));
    }
    if let Err(message) = &facts.kvm {
        return tcg(format!("libvirt on {host} offers no KVM: {message}"));
    }
    // A /dev/kvm without VT-x/AMD-V under it (kvm_pvm) passes libvirt's check, yet a stock
    // guest kernel dies in its instruction emulator.
    if facts.host_arch == "x86_64" && !facts.cpu_virt {
        return tcg(format!(
            "libvirt on {host} offers KVM, but its CPU has neither vmx nor svm (a /dev/kvm \
             without hardware virtualisation, such as kvm_pvm, cannot boot stock guest kernels)"
        ));
    }
    AccelDecision {
        accel: Accelerator::Kvm,
        reason: format!("libvirt on {host} offers KVM"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_libvirt_host_gives_kvm_only_for_its_own_arch_with_kvm_and_hardware_virt() {
        let facts = |host_arch: &str, cpu_virt, kvm: Result<(), String>| HostFacts {
            host_arch: host_arch.into(),
            cpu_virt,
            kvm,
        };
        let x86 = VmArchitecture::X86_64;
        let decide = |f: HostFacts| decide_from_libvirt(x86, AccelChoice::Auto, "kvm1", &Ok(f));
        let kvm = decide(facts("x86_64", true, Ok(())));
        assert_eq!(kvm.accel, Accelerator::Kvm, "{}", kvm.reason);
        assert!(kvm.reason.contains("kvm1"), "{}", kvm.reason);
        let pvm = decide(facts("x86_64", false, Ok(())));
        assert_eq!(pvm.accel, Accelerator::Tcg);
        assert!(pvm.reason.contains("neither vmx nor svm"), "{}", pvm.reason);
        let none = decide(facts("x86_64", true, Err("no /dev/kvm".into())));
        assert_eq!(none.accel, Accelerator::Tcg);
        assert!(none.reason.contains("no /dev/kvm"), "{}", none.reason);
        let other = decide(facts("aarch64", false, Ok(())));
        assert_eq!(other.accel, Accelerator::Tcg);
        assert!(
            other.reason.contains("host kvm1 is aarch64"),
            "{}",
            other.reason
        );
        // An arm64 server lists no vmx/svm: its KVM counts.
        let arm = decide_from_libvirt(
            VmArchitecture::Aarch64,
            AccelChoice::Auto,
            "arm1",
            &Ok(facts("aarch64", false, Ok(()))),
        );
        assert_eq!(arm.accel, Accelerator::Kvm, "{}", arm.reason);
        let forced = decide_from_libvirt(
            x86,
            AccelChoice::Force(Accelerator::Tcg),
            "kvm1",
            &Err("unreachable".into()),
        );
        assert_eq!(forced.accel, Accelerator::Tcg);
        let silent = decide_from_libvirt(x86, AccelChoice::Auto, "kvm1", &Err("hung".into()));
        assert_eq!(silent.accel, Accelerator::Tcg);
        assert!(silent.reason.contains("hung"), "{}", silent.reason);
    }

    #[test]
    fn cross_arch_guests_are_emulated() {
        let d = decide_with(
            VmArchitecture::Aarch64,
            AccelChoice::Auto,
            Some(VmArchitecture::X86_64),
            Path::new("/nonexistent"),
        );
        assert_eq!(d.accel, Accelerator::Tcg);
    }

    #[test]
    fn kvm_pvm_means_tcg_and_usable_kvm_means_kvm() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("dev")).unwrap();
        std::fs::write(root.path().join("dev/kvm"), b"").unwrap();
        let host = Some(VmArchitecture::X86_64);
        let d = decide_with(VmArchitecture::X86_64, AccelChoice::Auto, host, root.path());
        assert_eq!(d.accel, Accelerator::Kvm, "{}", d.reason);
        std::fs::create_dir_all(root.path().join("sys/module/kvm_pvm")).unwrap();
        let d = decide_with(VmArchitecture::X86_64, AccelChoice::Auto, host, root.path());
        assert_eq!(d.accel, Accelerator::Tcg);
        assert!(d.reason.contains("kvm_pvm"));
        let forced = AccelChoice::Force(Accelerator::Kvm);
        let d = decide_with(VmArchitecture::X86_64, forced, host, root.path());
        assert_eq!(d.accel, Accelerator::Kvm);
    }
}
