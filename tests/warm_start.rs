//! Warm starts (`Start::Warm`, DEVICELAB_START=warm): a clone of a saved, cloud-init-done VM
//! restored on a fresh overlay. What it must keep true: the clone is fresh (nothing a previous
//! clone wrote), it has a generation ID of its own (x86_64), its clock is the host's
//! (the power-cycle gate compares times), two clones at
//! once never share an identity, a power cycle boots it for real, and the `onboarded` fixture
//! works on it. The first run on a host builds the saved VMs (one cold boot each).
//! The two tests that break a saved VM on purpose break one of their own (its key differs by a
//! first-boot command no other test runs), never one another test may be restoring.
//! `--features e2e`.

mod common;

use common::mac_of;
use devicelab::fixtures::*;
use devicelab::{Start, VirtualMachineSpec};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// The guest's clock minus the host's, in seconds.
async fn clock_skew(vm: &Vm) -> f64 {
    let guest: f64 = vm
        .succeed("date +%s.%N")
        .await
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let host = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    guest - host
}

/// A warm request whose saved VMs are `test`'s alone: the key covers the first-boot commands.
fn own_saved_vm(name: &str, arch: VmArchitecture, test: &str) -> VirtualMachineSpec {
    let mut spec = VirtualMachineSpec::new(name, arch).with_start(Start::Warm);
    spec.first_boot.runcmd.push(format!("true {test}"));
    spec
}

/// The generation ID libvirt gave the clone's domain (`<genid>` of its live XML; x86_64 only:
/// QEMU has no such device for aarch64), and whether its kernel reseeded its random number
/// generator for the VM fork its restore is. libvirt renews the ID at each restore; a guest
/// kernel with the vmgenid driver reseeds when it sees a new one, and says so in its log. Where
/// the guest kernel has no such driver (Debian 12's cloud kernel), the reseed is not checked (said).
async fn generation_id(lab: &Lab, vm: &Vm, arch: VmArchitecture) -> Option<String> {
    if arch != VmArchitecture::X86_64 {
        return None;
    }
    let name = vm.name().to_owned();
    let xml = lab
        .libvirt
        .run(move |lv| lv.domain(&name).map(|d| d.xml_desc(0).unwrap()))
        .await
        .unwrap();
    let id = xml
        .split_once("<genid>")
        .and_then(|(_, rest)| rest.split_once("</genid>"))
        .map(|(id, _)| id.to_owned())
        .unwrap_or_else(|| panic!("{} has a generation ID:\n{xml}", vm.name()));
    let driver = vm
        .succeed("ls -d /sys/bus/*/drivers/vmgenid >/dev/null 2>&1 && echo yes || echo no")
        .await
        .unwrap();
    if driver.trim() == "yes" {
        vm.wait_until_succeeds(
            "sudo -n dmesg | grep -q 'crng reseeded due to virtual machine fork'",
        )
        .await
        .unwrap();
    } else {
        eprintln!(
            "{}: the guest kernel has no vmgenid driver: its reseed is not checked",
            vm.name()
        );
    }
    Some(id)
}

fn restore_time(vm: &Vm) -> f64 {
    vm.timings
        .entries()
        .iter()
        .find(|(p, _)| p == "warm restore → SSH")
        .map(|(_, d)| d.as_secs_f64())
        .expect("a warm VM records its restore")
}

#[rstest]
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[cfg_attr(not(feature = "e2e"), ignore = "boots VMs: run with --features e2e")]
async fn warm_clones_are_fresh_on_time_distinct_side_by_side_and_power_cycle_for_real(
    #[future] lab: Arc<Lab>,
    arch: VmArchitecture,
) {
    let lab = lab.await;
    // Saved VMs of this test's own: a test beside it never takes the one this one checks
    // comes free again.
    let spec = || own_saved_vm(&lab.vm_name("warm", arch), arch, "fresh");

    let first = lab.vm(spec()).await.unwrap();
    assert!(
        first.name().starts_with("devicelab-warm-"),
        "a warm VM runs as its saved VM's clone: {}",
        first.name()
    );
    first
        .succeed("cloud-init status | grep -q 'status: done'")
        .await
        .unwrap();
    let first_id = generation_id(&lab, &first, arch).await;
    first
        .succeed("echo first > ~/written-by-a-clone && sync")
        .await
        .unwrap();
    let (name, mac, ip) = (first.name().to_owned(), mac_of(&first), first.ip().unwrap());
    eprintln!(
        "first clone {name} ({mac}, {ip}): restore → SSH {:.1} s",
        restore_time(&first)
    );
    first.remove().await.unwrap();

    // The next clone of the same saved VM: a fresh overlay, the same identity. The saved VM
    // is at least 15 s old by then (it may have been built just now), so a clock that was not
    // stepped is at least 15 s behind: the skew check below cannot pass by luck.
    tokio::time::sleep(std::time::Duration::from_secs(15)).await;
    let second = lab.vm(spec()).await.unwrap();
    assert_eq!(second.name(), name, "the saved VM came free again");
    let skew = clock_skew(&second).await;
    assert!(
        skew.abs() < 3.0,
        "the clone's clock is stepped to the host's: {skew:.1} s off"
    );
    second.fail("test -e ~/written-by-a-clone").await.unwrap();
    // The same saved memory, restored again: a generation ID of its own.
    let second_id = generation_id(&lab, &second, arch).await;
    assert!(
        first_id.is_none() || first_id != second_id,
        "each restore has its own generation ID: {first_id:?} {second_id:?}"
    );
    eprintln!(
        "second clone: restore → SSH {:.1} s, its clock {skew:+.2} s from the host's",
        restore_time(&second)
    );

    // Side by side: the second of two clones at once is another saved VM, with its own MAC
    // and address (libvirt restores a saved VM only under its own name, UUID and MAC).
    let third = lab.vm(spec()).await.unwrap();
    assert_ne!(third.name(), second.name());
    assert_ne!(
        mac_of(&third),
        mac_of(&second),
        "clones at once never share a MAC"
    );
    assert_ne!(
        third.ip(),
        second.ip(),
        "clones at once never share an address"
    );
    for vm in [&second, &third] {
        vm.succeed("true").await.unwrap();
    }
    third.remove().await.unwrap();

    // A power cycle boots the clone's own disk for real: what it flushed survives, the boot id
    // changes, the clock comes from the (host's) RTC.
    second
        .succeed("echo kept > ~/flushed && sync")
        .await
        .unwrap();
    let old_boot = second.boot_id().await.unwrap();
    second.power_cycle().await.unwrap();
    assert_ne!(second.boot_id().await.unwrap(), old_boot);
    assert_eq!(
        second.succeed("cat ~/flushed").await.unwrap().trim(),
        "kept"
    );
    let skew = clock_skew(&second).await;
    assert!(skew.abs() < 3.0, "after a power cycle: {skew:.1} s off");
}

/// The `onboarded` fixture with DEVICELAB_START=warm: the agent is onboarded on a clone and
/// its first report arrives (the fixture checks it came from this boot, stamped after the
/// onboarding began by the device's clock).
#[rstest]
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[cfg_attr(not(feature = "e2e"), ignore = "boots VMs: run with --features e2e")]
async fn the_onboarded_fixture_starts_warm_when_configured(arch: VmArchitecture) {
    devicelab::init_logging();
    let mut config = devicelab::config::HarnessConfig::from_env().unwrap();
    config.start = Start::Warm;
    let lab = Lab::new(config).await.unwrap();
    let device = devicelab::trials::scenario::onboarded_device_with(
        &lab,
        arch,
        "warmdev",
        &devicelab::reference::agent(),
    )
    .await
    .unwrap();
    assert!(device.vm.name().starts_with("devicelab-warm-"));
    let host_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i128;
    let skew_ms = device.first_report.timestamp_ms as i128 - host_ms;
    assert!(
        skew_ms.abs() < 60_000,
        "the first report is stamped by a clock stepped to the host's: {skew_ms} ms off"
    );
    eprintln!("warm onboarded device: phases {}", device.timings);
}

/// A saved VM that cannot be restored (its memory image rotted: truncated here) is deleted, and
/// the request boots cold instead, saying so; the next warm start builds the saved VM again.
#[rstest]
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[cfg_attr(not(feature = "e2e"), ignore = "boots VMs: run with --features e2e")]
async fn when_a_saved_vm_is_broken_it_is_deleted_and_the_request_boots_cold(
    #[future] lab: Arc<Lab>,
    arch: VmArchitecture,
) {
    let lab = lab.await;
    let spec = || own_saved_vm(&lab.vm_name("rot", arch), arch, "rot");
    // The saved VM this kind of request restores (built now if there is none yet).
    let clone = lab.vm(spec()).await.unwrap();
    let saved = lab.config.warm_dir().join(clone.name());
    clone.remove().await.unwrap();
    let memory = saved.join("memory.save");
    let len = std::fs::metadata(&memory).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&memory)
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    let vm = lab.vm(spec()).await.unwrap();
    vm.succeed("true").await.unwrap();
    assert!(
        !vm.name().starts_with("devicelab-warm-"),
        "the request booted cold, as itself: {}",
        vm.name()
    );
    assert!(
        vm.timings
            .entries()
            .iter()
            .all(|(p, _)| !p.starts_with("warm restore"))
    );
    assert!(
        !saved.exists(),
        "the broken saved VM was deleted: {}",
        saved.display()
    );
    vm.remove().await.unwrap();
}

/// A saved VM that restores but whose clone never answers (its recorded address is tampered
/// with here: the clone runs, the harness cannot reach it) misses the restore budget: the saved
/// VM is deleted, the clone's evidence moves to `runs/<name>.warm-failed`, and the request
/// boots cold. The saved VM is built with the configured budgets; the request that misses runs
/// with them scaled to a quarter, so the restore budget ends in 45 s, not 3 min.
#[rstest]
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[cfg_attr(not(feature = "e2e"), ignore = "boots VMs: run with --features e2e")]
async fn when_a_clone_misses_the_restore_budget_its_saved_vm_is_deleted(
    #[future] lab: Arc<Lab>,
    arch: VmArchitecture,
) {
    let builder = lab.await;
    let spec = |name: &str| own_saved_vm(name, arch, "mute");
    let clone = builder
        .vm(spec(&builder.vm_name("mute", arch)))
        .await
        .unwrap();
    let mut config = builder.config.clone();
    config.budget_scale = (config.budget_scale * 0.25).max(devicelab::config::MIN_BUDGET_SCALE);
    let lab = Lab::new(config).await.unwrap();
    let saved = lab.config.warm_dir().join(clone.name());
    clone.remove().await.unwrap();
    let record = saved.join("saved.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    json["ip"] = "192.0.2.200".into(); // TEST-NET-1: nothing answers there
    std::fs::write(&record, serde_json::to_vec(&json).unwrap()).unwrap();

    let name = lab.vm_name("mute", arch);
    let started = std::time::Instant::now();
    let vm = lab.vm(spec(&name)).await.unwrap();
    vm.succeed("true").await.unwrap();
    let evidence = lab.config.runs_dir().join(format!("{name}.warm-failed"));
    let kept = evidence.join("serial.log").is_file();
    let _ = std::fs::remove_dir_all(&evidence);
    assert!(
        !vm.name().starts_with("devicelab-warm-"),
        "booted cold: {}",
        vm.name()
    );
    assert!(
        !saved.exists(),
        "the saved VM was deleted: {}",
        saved.display()
    );
    assert!(
        kept,
        "the clone's evidence was moved aside to {}",
        evidence.display()
    );
    use std::os::unix::fs::PermissionsExt;
    let warm_mode = std::fs::metadata(lab.config.warm_dir())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        warm_mode & 0o777,
        0o711,
        "warm/: QEMU reaches saved disks, nobody lists it"
    );
    eprintln!(
        "restore budget missed, then a cold boot: {:.0} s",
        started.elapsed().as_secs_f64()
    );
    vm.remove().await.unwrap();
}

/// A machine on the libvirt network with a real DHCP lease: busybox's udhcpc on one end of a
/// veth pair in a network namespace of its own (`dl-lease-<pid>`), the other end on the
/// network's bridge. Dropped, or its test's thread gone: the client releases its lease (SIGTERM
/// with `-R`), and the namespace and the pair go. A namespace left by a killed run is removed
/// by the next.
struct LeaseHolder {
    _netns: Netns,
    client: std::process::Child,
    mac: String,
    ip: std::net::Ipv4Addr,
    _dir: tempfile::TempDir,
}

/// A network namespace, deleted (with the veth end in it) when dropped.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "delete", &self.0])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Runs `ip args…`, failing the test with its stderr; returns its stdout.
fn ip(args: &[&str]) -> String {
    let out = std::process::Command::new(common::require("ip", "apt install iproute2"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl LeaseHolder {
    fn take(bridge: &str) -> Self {
        let busybox = common::require("busybox", "apt install busybox (fixtures/host/setup.sh)");
        // Namespaces of runs that were killed before they could remove theirs.
        for entry in std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name
                .strip_prefix("dl-lease-")
                .and_then(|p| p.parse::<i32>().ok())
                && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                drop(Netns(name));
            }
        }
        let pid = std::process::id();
        let (host_end, guest_end) = (format!("dlh{pid}"), format!("dlg{pid}"));
        // What a killed run of the same pid may have left: its namespace, its host end.
        drop(Netns(format!("dl-lease-{pid}")));
        let _ = std::process::Command::new("ip")
            .args(["link", "delete", &host_end])
            .stderr(std::process::Stdio::null())
            .status();
        let netns = Netns(format!("dl-lease-{pid}"));
        ip(&["netns", "add", &netns.0]);
        ip(&[
            "link", "add", &host_end, "type", "veth", "peer", "name", &guest_end,
        ]);
        ip(&["link", "set", &guest_end, "netns", &netns.0]);
        ip(&["link", "set", &host_end, "master", bridge, "up"]);
        ip(&["-n", &netns.0, "link", "set", &guest_end, "up"]);
        let mac = ip(&["-n", &netns.0, "-br", "link", "show", &guest_end])
            .split_whitespace()
            .nth(2)
            .unwrap()
            .to_owned();
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("event.sh");
        let bound = dir.path().join("bound");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n[ \"$1\" = bound ] || exit 0\nip addr add \"$ip/$mask\" dev \"$interface\"\n\
                 echo \"$ip\" > {}.tmp && mv {0}.tmp {0}\n",
                bound.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut command = std::process::Command::new(common::require("ip", "apt install iproute2"));
        command
            .args(["netns", "exec", &netns.0])
            .arg(&busybox)
            .args(["udhcpc", "-f", "-R", "-t", "30", "-T", "1", "-A", "1"])
            .args(["-i", &guest_end, "-s"])
            .arg(&script)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // SAFETY: prctl is async-signal-safe; the client ends (releasing) with this thread.
        unsafe {
            use std::os::unix::process::CommandExt;
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let client = command.spawn().unwrap();
        let mut this = Self {
            _netns: netns,
            client,
            mac,
            ip: std::net::Ipv4Addr::UNSPECIFIED,
            _dir: dir,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        this.ip = loop {
            if let Ok(text) = std::fs::read_to_string(&bound) {
                break text.trim().parse().unwrap();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "udhcpc got no lease on {bridge} within 60 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        };
        this
    }
}

impl Drop for LeaseHolder {
    fn drop(&mut self) {
        unsafe { libc::kill(self.client.id() as i32, libc::SIGTERM) };
        let _ = self.client.wait();
        // Then `netns` goes, with the pair.
    }
}

/// A clone resumes with the address its saved VM was saved with, without asking the DHCP server;
/// once that lease has expired the server may give the address to another machine. The check a
/// warm restore makes first reads the network's real leases: an address leased to another MAC
/// is not the saved VM's any more (so it is built again), one leased to the saved VM's own MAC
/// or to nobody still is.
#[test]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs a host ready for VMs: run with --features e2e"
)]
fn an_address_leased_to_another_machine_is_not_restored_into() {
    use devicelab::vm::warm::address_still_ours;
    let config = devicelab::config::HarnessConfig::from_env().unwrap();
    let lv = devicelab::host::libvirt::Libvirt::open(&config.libvirt_uri).unwrap();
    let bridge = lv
        .conn()
        .unwrap()
        .lookup_network_by_name(&config.network)
        .unwrap()
        .bridge_name()
        .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let ours = |ip, mac: &str| {
        runtime
            .block_on(address_still_ours(&lv, &config.network, ip, mac))
            .unwrap()
    };
    let holder = LeaseHolder::take(&bridge);
    // libvirt lists a lease once dnsmasq's lease helper has run, just after the client has it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !lv
        .lease_holders(&config.network, holder.ip)
        .unwrap()
        .contains(&holder.mac)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "libvirt does not list {}'s lease of {}",
            holder.mac,
            holder.ip
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let saved_mac = "52:54:00:de:1a:b0";
    assert!(
        !ours(holder.ip, saved_mac),
        "{} is leased to {}: not the saved VM's",
        holder.ip,
        holder.mac
    );
    assert!(ours(holder.ip, &holder.mac), "its own lease");
    let ip = holder.ip;
    drop(holder);
    // The server drops a released lease within moments.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let holders = lv.lease_holders(&config.network, ip).unwrap();
        if holders.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the released lease is still listed: {holders:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    assert!(ours(ip, saved_mac), "an address nobody holds");
}
