//! When a device fails, the harness says so at once and leaves what explains it: one real VM
//! collects its failure artifacts, then its kernel is crashed and the next wait must fail on the
//! console's panic line instead of waiting out its budget; powered on again with sshd and the
//! serial console's getty masked, it idles with no login prompt to show and the wait for SSH
//! must say so after the idle grace (cloud-init's final message marks the finished boot), not
//! after its budget. A cold boot from a cached image whose bytes rotted on disk names the rot and
//! removes the image. Boots a VM: `--features e2e`.

mod common;

use devicelab::fixtures::*;
use devicelab::vm::VmError;
use std::time::{Duration, Instant};

#[rstest]
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[cfg_attr(not(feature = "e2e"), ignore = "boots a VM: run with --features e2e")]
async fn a_crashed_device_fails_fast_and_leaves_its_artifacts(#[future] vm: Vm) {
    let vm = vm.await;

    let dir = vm.collect_artifacts(&[("uname.txt", "uname -a")]).await;
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    assert!(
        read("serial.log").contains("Linux version"),
        "the boot's console"
    );
    assert!(read("domain.xml").contains(&format!("<name>{}</name>", vm.name())));
    assert!(read("cloud-init-status.txt").contains("status: done"));
    assert!(read("cloud-init.log").contains("DataSourceNoCloud"));
    assert!(!read("journal.txt").trim().is_empty());
    assert!(read("uname.txt").contains("Linux"), "extra items run too");

    // The next boot will have no sshd and no getty on the serial console (masked, and made
    // durable): no failure on the console, no login prompt, and a refused port 22.
    vm.succeed(
        "sudo -n systemctl mask ssh.service ssh.socket serial-getty@ttyS0.service \
         serial-getty@ttyAMA0.service",
    )
    .await
    .unwrap();
    vm.flush().await.unwrap();

    // Crash the guest kernel; the SSH call that does it may never answer.
    let crash = "sudo -n sh -c 'echo 1 > /proc/sys/kernel/sysrq; echo c > /proc/sysrq-trigger'";
    let _ = tokio::time::timeout(Duration::from_secs(10), vm.exec(crash)).await;
    let started = Instant::now();
    let err = vm
        .wait_for_cloud_init()
        .await
        .expect_err("a crashed guest cannot be waited on");
    let msg = err.to_string();
    assert!(
        matches!(err, VmError::BootFailed { .. }),
        "a boot failure, not a timeout: {msg}"
    );
    assert!(msg.contains("panicked") && msg.contains("sysrq"), "{msg}");
    assert!(
        started.elapsed() < vm.budgets().cloud_init / 4,
        "failed at once ({:?}), not after the budget",
        started.elapsed()
    );

    vm.power_off().await.unwrap();
    let boot_starts = std::fs::metadata(vm.serial_log()).unwrap().len();
    vm.power_on().await.unwrap();
    let started = Instant::now();
    let err = vm.wait_for_ssh().await.expect_err("no sshd, no SSH");
    let msg = err.to_string();
    assert!(
        matches!(err, VmError::NothingListening { .. }),
        "the idle guest is named, not a timeout: {msg}"
    );
    assert!(
        msg.contains("cloud-init's final message is on the console"),
        "{msg}"
    );
    let console = std::fs::read(vm.serial_log()).unwrap();
    let this_boot = String::from_utf8_lossy(&console[boot_starts as usize..]);
    assert!(
        this_boot.contains("Cloud-init v. ") && !this_boot.contains(" login:"),
        "this boot's console has cloud-init's final message and no login prompt: {this_boot}"
    );
    assert!(
        msg.contains("the plug was pulled")
            && msg.contains("after the harness flushed what the test wrote"),
        "the last power cut is described: {msg}"
    );
    // The variant says it was the evidence (the idle guest), not the budget; the time is
    // the boot plus the idle grace.
    assert!(
        started.elapsed() < vm.budgets().power_cycle_recovery,
        "failed after {:?}",
        started.elapsed()
    );
    eprintln!(
        "idle guest reported after {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let run_dir = dir.clone();
    drop(vm);
    assert!(
        run_dir.join("cloud-init.log").exists(),
        "the artifacts outlive the VM"
    );
    std::fs::remove_dir_all(run_dir).unwrap();
}

/// A first boot whose cloud-config fails (a `runcmd` that exits non-zero) fails provisioning
/// with cloud-init's own words, and what explains it is kept: the guest's cloud-init logs and
/// journal beside the serial log and domain XML, while the VM itself is gone.
#[rstest]
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[cfg_attr(not(feature = "e2e"), ignore = "boots a VM: run with --features e2e")]
async fn a_failing_first_boot_keeps_its_artifacts(
    #[future] lab: std::sync::Arc<Lab>,
    arch: VmArchitecture,
) {
    use devicelab::VirtualMachineSpec;
    let lab = lab.await;
    let name = lab.vm_name("cifail", arch);
    // A first boot that fails: cold, whatever DEVICELAB_START says.
    let mut spec =
        VirtualMachineSpec::new(&name, arch).with_start(devicelab::model::spec::Start::Cold);
    spec.first_boot.runcmd = vec!["echo devicelab-runcmd-fails >&2; exit 3".into()];
    let err = lab
        .vm(spec)
        .await
        .expect_err("a failing cloud-config fails provisioning");
    let msg = err.to_string();
    let VmError::Provision { artifacts, .. } = &err else {
        panic!("a provisioning failure names its artifacts: {msg}");
    };
    assert!(
        matches!(err.root(), VmError::CloudInit { .. }),
        "cloud-init's failure, not a timeout: {msg}"
    );
    assert!(msg.contains("status: error"), "{msg}");
    assert!(msg.contains(&artifacts.display().to_string()), "{msg}");
    let read = |f: &str| std::fs::read_to_string(artifacts.join(f)).unwrap_or_default();
    assert!(read("serial.log").contains("Linux version"), "the console");
    assert!(read("domain.xml").contains(&format!("<name>{name}</name>")));
    assert!(
        read("cloud-init-output.log").contains("devicelab-runcmd-fails"),
        "the failing command's own output"
    );
    assert!(read("cloud-init-status.txt").contains("error"));
    assert!(!read("journal.txt").trim().is_empty());
    let lv = devicelab::host::libvirt::Libvirt::open(&lab.config.libvirt_uri).unwrap();
    assert!(lv.domain(&name).is_err(), "the VM itself is gone");
    assert!(
        !artifacts.join("owner.json").exists(),
        "nothing left for the reaper: the VM was removed"
    );
    std::fs::remove_dir_all(artifacts).unwrap();
}

/// A cached image whose bytes rotted on disk: same size, same modification time, so the
/// cache's record still vouches for it. The boot from it fails (here before the VM is defined:
/// the bytes sent to the pool do not hash to the image's digest, so no copy is kept); the
/// failure hashes the image again and says so, and the next fetch downloads a good copy over
/// it.
#[rstest]
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[cfg_attr(not(feature = "e2e"), ignore = "boots a VM: run with --features e2e")]
async fn a_cached_image_whose_bytes_rotted_is_named_and_removed(
    #[future] lab: std::sync::Arc<Lab>,
    arch: VmArchitecture,
) {
    use common::{HttpServer, Route, sha256_hex};
    use std::os::unix::fs::FileExt;
    let lab = lab.await;
    // The configured image, served from 127.0.0.1 as a mirror would, into the download cache;
    // with zeros after its end (which QEMU ignores), so its digest is its own: the pool's copy
    // for the configured image's digest is not this file's.
    let mut bytes = std::fs::read(lab.base_image(arch).await.unwrap().path).unwrap();
    bytes.extend_from_slice(&[0u8; 4096]);
    let sha256 = sha256_hex(&bytes);
    let server = HttpServer::start(vec![("/rot.qcow2", Route::ok(bytes))]).await;
    let mut config = lab.config.clone();
    let overrides = config.overrides.entry(arch).or_default();
    overrides.image = None;
    overrides.image_url = Some((server.url("/rot.qcow2"), sha256.clone()));
    let downloading = Lab::new(config).await.unwrap();
    let cached = downloading.base_image(arch).await.unwrap().path;
    let modified = std::fs::metadata(&cached).unwrap().modified().unwrap();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&cached)
        .unwrap();
    file.write_all_at(&99u32.to_be_bytes(), 4).unwrap();
    file.set_times(std::fs::FileTimes::new().set_modified(modified))
        .unwrap();
    drop(file);

    let spec = devicelab::VirtualMachineSpec::new(downloading.vm_name("rot", arch), arch)
        .with_start(devicelab::Start::Cold);
    let result = downloading.vm(spec).await.map(drop);
    // The next run's fetch: a good copy again, downloaded a second time.
    let next_run = Lab::new(downloading.config.clone()).await.unwrap();
    let again = next_run.base_image(arch).await.map(|i| i.path);
    let good_again = std::fs::read(&cached).map(|b| sha256_hex(&b) == sha256);
    let downloads = server.hits("/rot.qcow2");
    // The file, its record and its lock: nothing of this test stays in the cache.
    let name = cached.file_name().unwrap().to_string_lossy().into_owned();
    for leftover in [
        name.clone(),
        format!(".{name}.verified.json"),
        format!(".{name}.lock"),
    ] {
        let _ = std::fs::remove_file(cached.with_file_name(leftover));
    }
    let err = result.expect_err("a boot from a rotted image fails");
    let msg = err.to_string();
    assert!(matches!(err, VmError::ImageRotted { .. }), "{msg}");
    assert!(
        msg.contains("no longer matches its sha256")
            && msg.contains("the next run downloads a good copy"),
        "{msg}"
    );
    assert_eq!(again.ok().as_ref(), Some(&cached), "the same cache file");
    assert!(
        matches!(good_again, Ok(true)) && downloads == 2,
        "the next run downloaded a good copy ({downloads} downloads)"
    );
}
