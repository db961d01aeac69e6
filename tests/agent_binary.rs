//! The ELF check that keeps a wrong-arch agent from reaching a VM.

use devicelab::VmArchitecture;
use devicelab::agent::build::{AgentBinary, AgentBinaryError, check_elf};
use devicelab::config::HarnessConfig;
use std::collections::BTreeMap;

fn elf_with_machine(machine: u16) -> tempfile::NamedTempFile {
    let mut header = vec![0u8; 64];
    header[..4].copy_from_slice(b"\x7fELF");
    header[4] = 2; // 64-bit
    header[5] = 1; // little endian
    header[18..20].copy_from_slice(&machine.to_le_bytes());
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), header).unwrap();
    file
}

#[test]
fn the_test_binary_itself_is_an_x86_64_or_aarch64_elf() {
    let me = std::env::current_exe().unwrap();
    let host = VmArchitecture::host().unwrap();
    check_elf(&me, host, "test").unwrap();
}

#[test]
fn a_wrong_arch_binary_is_refused_with_the_fix() {
    let x86 = elf_with_machine(62);
    let err = check_elf(
        x86.path(),
        VmArchitecture::Aarch64,
        "DEVICELAB_AGENT_BIN_AARCH64",
    )
    .unwrap_err();
    assert!(matches!(err, AgentBinaryError::WrongArch { .. }));
    let msg = err.to_string();
    for needle in [
        "x86_64",
        "aarch64",
        "--target aarch64-unknown-linux-gnu",
        "DEVICELAB_AGENT_BIN_AARCH64",
    ] {
        assert!(msg.contains(needle), "{needle} missing: {msg}");
    }
    check_elf(elf_with_machine(183).path(), VmArchitecture::Aarch64, "x").unwrap();
    let riscv = check_elf(elf_with_machine(243).path(), VmArchitecture::X86_64, "x").unwrap_err();
    assert!(riscv.to_string().contains("ELF machine 243"), "{riscv}");
}

#[test]
fn a_script_is_not_an_agent() {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), "#!/bin/sh\necho hi\n").unwrap();
    let err = check_elf(
        f.path(),
        VmArchitecture::X86_64,
        "DEVICELAB_AGENT_BIN_X86_64",
    )
    .unwrap_err();
    assert!(matches!(err, AgentBinaryError::NotElf { .. }), "{err}");
}

#[test_log::test(tokio::test)]
async fn a_prebuilt_binary_from_the_environment_is_checked() {
    let aarch64 = elf_with_machine(183);
    let vars = BTreeMap::from([
        (
            "DEVICELAB_AGENT_BIN_X86_64".to_owned(),
            aarch64.path().display().to_string(),
        ),
        (
            "DEVICELAB_AGENT_BIN_AARCH64".to_owned(),
            "/nonexistent/agent".to_owned(),
        ),
    ]);
    let config = HarnessConfig::from_vars(vars).unwrap();
    let err = AgentBinary::for_arch(&config, VmArchitecture::X86_64)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("DEVICELAB_AGENT_BIN_X86_64"),
        "{err}"
    );
    let err = AgentBinary::for_arch(&config, VmArchitecture::Aarch64)
        .await
        .unwrap_err();
    assert!(matches!(err, AgentBinaryError::Unreadable { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/agent"));
}
