//! The handle a test holds: the wait strategies (the spec's own waits run before the handle is
//! returned), the NixOS-driver verbs (`fail`, `wait_until_succeeds`, `wait_for_open_port`,
//! `wait_for_console_text`), and `remove`, which reports cleanup instead of leaving it to
//! `Drop`; onboarding a description that cannot work on the device (a `.deb` of the other
//! architecture, a unit that fails, a package the mirror lacks) fails with the device's own
//! words; packages from the guest's apt mirror install once. Boots a VM:
//! `--features e2e`.

mod agents;
mod common;

use devicelab::Wait;
use devicelab::agent::onboard::{OnboardError, Onboarding};
use devicelab::description::{Package, Service};
use devicelab::fixtures::*;
use devicelab::vm::VmError;
use devicelab::{Readiness, VirtualMachineSpec};
use std::sync::Arc;

/// Onboards `agent` on `vm`, which must fail; its message and the error.
async fn onboarding_error(lab: &Lab, vm: &Vm, agent: AgentDescription) -> (String, OnboardError) {
    let values = agents::test_values(vm.arch());
    let onboarding = Onboarding::prepare(&lab.config, &agent, values)
        .await
        .unwrap();
    let err = onboarding.apply(vm).await.unwrap_err();
    (err.to_string(), err)
}

#[rstest]
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[cfg_attr(not(feature = "e2e"), ignore = "boots a VM: run with --features e2e")]
async fn waits_verbs_and_remove(#[future] lab: Arc<Lab>, arch: VmArchitecture) {
    let lab = lab.await;
    let name = lab.vm_name("handle", arch);
    let spec = VirtualMachineSpec::new(&name, arch)
        .ready_when(Readiness::SshLogin)
        .with_wait(Wait::UnitActive {
            unit: "ssh.service".into(),
            user: None,
        })
        .with_wait(Wait::CommandSucceeds("test -d /home/devicelab".into()));
    let vm = lab.vm(spec).await.unwrap();
    let phases: Vec<String> = vm.timings.entries().into_iter().map(|(p, _)| p).collect();
    assert_eq!(
        phases,
        [
            "lease",
            "port 22",
            "ssh",
            "unit ssh.service",
            "`test -d /home/devicelab` succeeds"
        ],
        "the spec's waits, in order, after the harness's own"
    );

    vm.wait_for_open_port(22).await.unwrap();
    let line = vm.wait_for_console_text("Linux version").await.unwrap();
    assert!(line.contains("Linux version"), "{line}");

    let refusal = vm.fail("echo nope >&2; exit 4").await.unwrap();
    assert!(refusal.contains("nope"), "{refusal}");
    let err = vm.fail("true").await.expect_err("`true` does not fail");
    assert!(matches!(err, VmError::UnexpectedSuccess { .. }), "{err}");

    // Something the guest does later: the wait polls until it is there.
    vm.succeed("nohup sh -c 'sleep 3; echo ready > /tmp/later' >/dev/null 2>&1 &")
        .await
        .unwrap();
    assert!(vm.fail("cat /tmp/later").await.is_ok(), "not there yet");
    let out = vm.wait_until_succeeds("cat /tmp/later").await.unwrap();
    assert_eq!(out.trim(), "ready");

    // Onboarding any description fails clearly on the device: a .deb of the other
    // architecture (dpkg's words), a unit that fails to start (its journal).
    let other = VmArchitecture::ALL
        .into_iter()
        .find(|a| *a != arch)
        .unwrap();
    let mut wrong_deb = agents::heartbeat();
    if let Package::Deb { files, .. } = &mut wrong_deb.packages[2] {
        let theirs = files[&other].clone();
        files.insert(arch, theirs);
    }
    let (msg, err) = onboarding_error(&lab, &vm, wrong_deb).await;
    assert!(matches!(err, OnboardError::Package { .. }), "{msg}");
    assert!(
        msg.contains("netcat-openbsd") && msg.contains(other.debian_name()),
        "{msg}"
    );

    let mut failing = agents::heartbeat();
    failing.packages.clear();
    failing.service = Service::System {
        unit: "failing.service".into(),
        text: "[Service]\nExecStart=/bin/sh -c 'echo devicelab-unit-fails >&2; exit 3'\n\n[Install]\nWantedBy=multi-user.target\n".into(),
    };
    let (msg, err) = onboarding_error(&lab, &vm, failing).await;
    assert!(matches!(err, OnboardError::UnitFailed { .. }), "{msg}");
    assert!(
        msg.contains("failing.service") && msg.contains("devicelab-unit-fails"),
        "the unit's journal is quoted: {msg}"
    );

    // Package::Mirror, from the guest's own apt mirror (here the lab's: the guest has no
    // route out): the package lists are fetched, the package and what it depends on installed;
    // a second run changes nothing; a name the mirror lacks is apt's own error.
    let mirror = apt_mirror(&lab, arch).await;
    vm.succeed(&format!(
        "sudo sh -c 'mkdir -p /root/apt-off && mv /etc/apt/sources.list /etc/apt/sources.list.d/* /root/apt-off/ 2>/dev/null; \
         echo \"deb [trusted=yes] {} ./\" > /etc/apt/sources.list.d/lab.list'",
        mirror.url("/")
    ))
    .await
    .unwrap();
    // An image may ship netcat already (Debian 13's cloud-init depends on it): it is taken out
    // first, so that the install from the mirror is what puts it back.
    vm.succeed("sudo -n dpkg --purge --force-depends netcat-openbsd >/dev/null 2>&1; true")
        .await
        .unwrap();
    vm.fail("command -v nc").await.unwrap();
    let mut from_mirror = agents::heartbeat();
    from_mirror.packages = vec![Package::Mirror("netcat-openbsd".into())];
    let onboarding = Onboarding::prepare(&lab.config, &from_mirror, agents::test_values(arch))
        .await
        .unwrap();
    let first = onboarding.apply(&vm).await.unwrap();
    assert!(first.changed_steps().contains(&"packages"), "{first}");
    vm.succeed("command -v nc").await.unwrap();
    assert!(mirror.hits("/Packages") > 0, "apt read the mirror's index");
    let second = onboarding.apply(&vm).await.unwrap();
    assert!(second.changed_steps().is_empty(), "{second}");
    let mut missing = from_mirror.clone();
    missing.packages = vec![Package::Mirror("devicelab-no-such-package".into())];
    let (msg, err) = onboarding_error(&lab, &vm, missing).await;
    assert!(matches!(err, OnboardError::MirrorPackage { .. }), "{msg}");
    assert!(
        msg.contains("Unable to locate package devicelab-no-such-package"),
        "apt's words: {msg}"
    );

    // remove: done (and its errors reported) by the time it returns.
    let run_dir = vm.run_dir().to_owned();
    vm.remove().await.unwrap();
    let lv = devicelab::host::libvirt::Libvirt::open(&lab.config.libvirt_uri).unwrap();
    assert!(lv.domain(&name).is_err(), "the domain is gone");
    let leftovers: Vec<String> = lab
        .pool
        .volumes()
        .unwrap()
        .into_iter()
        .filter(|v| v.starts_with(&name))
        .collect();
    assert!(leftovers.is_empty(), "volumes left: {leftovers:?}");
    assert!(!run_dir.exists(), "the run dir is gone");
}

/// A flat apt repository of the heartbeat's `.deb` files for `arch`, served on the lab's
/// gateway: its `Packages` index from each file's own control fields (`dpkg-deb -f`).
async fn apt_mirror(lab: &Lab, arch: VmArchitecture) -> common::HttpServer {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/agents/heartbeat/debs");
    let mut index = String::new();
    let mut routes = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(&format!("_{}.deb", arch.debian_name())) {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let control = std::process::Command::new(common::require("dpkg-deb", "apt install dpkg"))
            .args(["-f"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(control.status.success(), "dpkg-deb -f {name}");
        index += &format!(
            "{}Filename: ./{name}\nSize: {}\nSHA256: {}\n\n",
            String::from_utf8(control.stdout).unwrap(),
            bytes.len(),
            common::sha256_hex(&bytes)
        );
        routes.push((format!("/{name}"), common::Route::ok(bytes)));
    }
    let release = format!(
        "Date: Thu, 01 Jan 2026 00:00:00 UTC\nSHA256:\n {} {} Packages\n",
        common::sha256_hex(index.as_bytes()),
        index.len()
    );
    routes.push(("/Packages".into(), common::Route::ok(index)));
    routes.push(("/Release".into(), common::Route::ok(release)));
    let routes = routes
        .iter()
        .map(|(p, r)| (p.as_str(), r.clone()))
        .collect();
    common::HttpServer::start_on(lab.gateway().await.unwrap(), routes).await
}

/// The `image` and `firmware` fixtures: what a VM boots, for a test that wants to look at it.
#[rstest]
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "reads the lab's images: run with --features e2e"
)]
async fn the_image_and_firmware_fixtures(
    #[future] image: BaseImage,
    #[future] firmware: FirmwarePair,
) {
    let (image, firmware) = (image.await, firmware.await);
    assert!(image.path.is_file(), "{}", image.path.display());
    let code = std::fs::metadata(&firmware.code).unwrap().len();
    assert_eq!(
        code,
        devicelab::image::firmware::PFLASH_SIZE,
        "CODE padded to 64 MiB"
    );
    assert!(firmware.vars.is_file());
}
