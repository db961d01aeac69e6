//! The reaper's logic against libvirt's own `test:///default` driver: domains and a storage
//! pool that libvirt keeps in memory, with no QEMU and no VM. A dead run's domain (and its
//! volumes) go; a live run's, a kept one and another host's stay. Fast: part of the suite without a VM.

use devicelab::host::libvirt::Libvirt;
use devicelab::host::pool::Pool;
use devicelab::host::reaper::{self, DataDirs, OwnerRecord};

const URI: &str = "test:///default";

fn domain_xml(name: &str) -> String {
    format!(
        r#"<domain type='test'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <os><type>hvm</type></os>
</domain>"#
    )
}

/// A run dir for `name` whose owner record names `pid` (a live or a dead process) and the
/// VM's host (`""`: none).
fn run_dir(dirs: &DataDirs, name: &str, pid: u32, kept: bool, host: &str) {
    let mut owner = OwnerRecord::current("reaper-test", name, host);
    owner.pid = pid;
    owner.start_time = reaper::process_start_time(pid).unwrap_or(1);
    owner.kept = kept;
    let dir = dirs.runs.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    owner.write(&dir).unwrap();
}

#[test_log::test]
fn a_dead_runs_domain_is_reaped_and_a_live_kept_or_other_hosts_one_stays() {
    let libvirt = Libvirt::open(URI).unwrap();
    let data = tempfile::tempdir().unwrap();
    let pool = Pool::ensure(&libvirt, &data.path().join("pool")).unwrap();
    let dirs = DataDirs {
        runs: data.path().join("runs"),
        warm: data.path().join("warm"),
    };
    // Where runs claim their VMs' names (a lab makes it at start).
    devicelab::support::lock::private_dir(&dirs.runs.join(".claims")).unwrap();
    let conn = libvirt.conn().unwrap();
    let suffix = std::process::id();
    let (dead, live, kept) = (
        format!("devicelab-dead-{suffix}"),
        format!("devicelab-live-{suffix}"),
        format!("devicelab-kept-{suffix}"),
    );
    for name in [&dead, &live, &kept] {
        let dom = conn.define_domain_xml(&domain_xml(name)).unwrap();
        dom.create().unwrap();
    }
    // A process that has exited: its pid names no process now.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let gone_pid = gone.id();
    gone.wait().unwrap();
    run_dir(&dirs, &dead, gone_pid, false, URI);
    run_dir(&dirs, &live, std::process::id(), false, "");
    run_dir(&dirs, &kept, gone_pid, true, "");
    // A dead run's VM on another host of the same data dir: that host's to reap.
    let elsewhere = format!("devicelab-elsewhere-{suffix}");
    run_dir(&dirs, &elsewhere, gone_pid, false, "qemu+ssh://kvm1/system");

    let reaped = reaper::reap(
        &libvirt,
        &pool,
        &dirs,
        std::path::Path::new("/nonexistent/podman"),
    );

    let exists = |name: &str| conn.lookup_domain_by_name(name).is_ok();
    assert_eq!(reaped.vms, vec![dead.clone()], "{reaped:?}");
    assert!(!exists(&dead) && !dirs.runs.join(&dead).exists());
    assert!(
        exists(&live) && dirs.runs.join(&live).exists(),
        "a live run's VM stays"
    );
    assert!(exists(&kept), "a kept VM stays");
    assert!(
        dirs.runs.join(&elsewhere).exists(),
        "another host's record stays for that host"
    );
    for name in [&live, &kept] {
        let dom = conn.lookup_domain_by_name(name).unwrap();
        let _ = dom.destroy();
        let _ = dom.undefine();
    }
}
