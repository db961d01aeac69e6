//! Choosing the accelerator: real KVM where it can boot a stock guest, TCG otherwise.

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
    let tcg = |reason: String| AccelDecision {
        accel: Accelerator::Tcg,
        reason,
    };
    if let AccelChoice::Force(accel) = choice {
        return AccelDecision {
            accel,
            reason: "forced by DEVICELAB_ACCEL".into(),
        };
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

#[cfg(test)]
mod tests {
    use super::*;

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
