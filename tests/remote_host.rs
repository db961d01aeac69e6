//! A libvirt host reached the way a remote one is: `qemu+ssh://` through a real sshd, with
//! the harness's key and a pinned `known_hosts`. The host is a libvirtd of the test's own in
//! namespaces of its own, with files of its own; each SSH session runs in its mount namespace,
//! so what answers over SSH is that libvirtd, not this machine's, and a file written here does
//! not reach it. The VM's disks go to its pool through libvirt. A device on a host reached
//! over SSH (here this machine's own libvirtd, behind a real sshd) is reached through that
//! host: its disks, console and guest SSH all go through the one login the URI names.

mod common;

use common::{KillOnDrop, PrivateLibvirtd, Sshd, domain_running, require};
use devicelab::config::HarnessConfig;
use devicelab::fixtures::*;
use devicelab::host::libvirt::Libvirt;
use devicelab::host::pool::{BASE_PREFIX, Pool};
use devicelab::host::remote::{self, RemoteError};
use devicelab::image::{BaseImage, DiskFormat};
use devicelab::model::arch::Accelerator;
use devicelab::model::spec::Start;
use devicelab::nats::Verdict;
use devicelab::ssh::keys::HostKey;
use devicelab::ssh::{Route, SshError, SshSession, shell_quote};
use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

/// `daemon`, and an sshd whose sessions run in its namespaces (`namespaces`: nsenter's flags,
/// `-m` for its mount namespace, `-n` for its network namespace too), with `extra` lines of
/// sshd_config.
async fn behind_sshd(
    daemon: fn() -> PrivateLibvirtd,
    namespaces: &[&str],
    extra: &str,
) -> (PrivateLibvirtd, Sshd) {
    let daemon = tokio::task::spawn_blocking(daemon).await.unwrap();
    let nsenter = require("nsenter", "apt install util-linux");
    let mut wrap: Vec<OsString> =
        vec![nsenter.into(), "-t".into(), daemon.pid().to_string().into()];
    wrap.extend(namespaces.iter().map(OsString::from));
    wrap.push("--".into());
    let sshd = Sshd::start_with(&wrap, extra).await;
    (daemon, sshd)
}

/// The private libvirtd of another host (it starts domains: its QEMU answers the knob probes),
/// and an sshd whose sessions run in its namespaces.
async fn remote() -> (PrivateLibvirtd, Sshd) {
    behind_sshd(PrivateLibvirtd::another_host, &["-m", "-n"], "").await
}

/// `qemu+ssh://` to `sshd`, authenticating with its client key, verifying its host key
/// against a `known_hosts` that pins `pinned`: the harness reads it from the URI, and libvirt's
/// OpenSSH client from the `command` it runs (OpenSSH with that file as its known_hosts).
fn uri(sshd: &Sshd, pinned: &HostKey, dir: &Path) -> String {
    let known_hosts = dir.join("known_hosts");
    std::fs::write(
        &known_hosts,
        format!(
            "[{}]:{} {}\n",
            sshd.addr.ip(),
            sshd.addr.port(),
            pinned.public_line
        ),
    )
    .unwrap();
    // OpenSSH with no configuration of the user's, the pinned file its only known_hosts (ssh
    // expands `%` in it and splits it on blanks: quoted for both).
    let ssh = dir.join("ssh-pinned");
    let known = format!(
        "UserKnownHostsFile=\"{}\"",
        known_hosts.display().to_string().replace('%', "%%")
    );
    std::fs::write(
        &ssh,
        format!(
            "#!/bin/sh\nexec {} -F none -o GlobalKnownHostsFile=/dev/null -o {} -o StrictHostKeyChecking=yes \"$@\"\n",
            shell_quote(&require("ssh", "apt install openssh-client").display().to_string()),
            shell_quote(&known)
        ),
    )
    .unwrap();
    std::fs::set_permissions(&ssh, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    format!(
        "qemu+ssh://root@{}:{}/system?keyfile={}&known_hosts={}&command={}&no_tty=1",
        sshd.addr.ip(),
        sshd.addr.port(),
        sshd.client.path.display(),
        known_hosts.display(),
        ssh.display()
    )
}

#[test_log::test(tokio::test(flavor = "multi_thread"))]
async fn a_host_over_ssh_gets_the_disks_through_libvirt_and_a_wrong_host_key_is_refused() {
    let (daemon, sshd) = remote().await;
    let local = tempfile::tempdir().unwrap();
    let good = uri(&sshd, &sshd.host_key, local.path());
    let pool_dir = daemon.dir.path().join("data/pool");
    let src = tempfile::tempdir().unwrap();
    let bytes: Vec<u8> = (0..2 * 1024 * 1024u32).map(|i| (i % 241) as u8).collect();
    std::fs::write(src.path().join("base.img"), &bytes).unwrap();
    let base = BaseImage {
        path: src.path().join("base.img"),
        format: DiskFormat::Raw,
        cached: false,
        digest: common::sha256_hex(&bytes),
    };
    let (overlay, volumes, local_volumes) = tokio::task::spawn_blocking(move || {
        let lv = Libvirt::open(&good).unwrap_or_else(|e| panic!("{good}: {e}"));
        let pool = Pool::ensure(&lv, &pool_dir).unwrap();
        let overlay = pool.create_overlay("remote-vm.qcow2", &base, 1).unwrap();
        let local = common::system_libvirt()
            .conn()
            .unwrap()
            .lookup_storage_pool_by_name("devicelab")
            .and_then(|p| p.list_volumes())
            .unwrap_or_default();
        // The host is this machine: what its libvirt says about KVM is what this machine
        // shows of itself (its architecture, vmx/svm in /proc/cpuinfo, /dev/kvm).
        let facts = lv.host_facts().unwrap();
        assert_eq!(facts.host_arch, std::env::consts::ARCH, "{facts:?}");
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let flags = cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .unwrap_or_default();
        let cpu_virt = flags.split_whitespace().any(|f| f == "vmx" || f == "svm");
        assert_eq!(facts.cpu_virt, cpu_virt, "{facts:?}\n{flags}");
        assert_eq!(
            facts.kvm.is_ok(),
            Path::new("/dev/kvm").exists(),
            "{facts:?}"
        );
        // Its QEMU is the one its libvirt names (here this machine's binaries),
        // and asked through it which aarch64 knobs it takes: QEMU's own complaint otherwise.
        let x86 = lv
            .host_qemu(VmArchitecture::X86_64, Accelerator::Tcg)
            .unwrap();
        let version = std::process::Command::new(&x86.emulator)
            .arg("--version")
            .output()
            .unwrap();
        let version = String::from_utf8_lossy(&version.stdout).into_owned();
        // The machine type carries the emulator's version (`pc-q35-7.2`).
        let number = x86.machine.rsplit('-').next().unwrap().to_owned();
        assert!(
            x86.machine.starts_with("pc-q35-") && version.contains(&format!("version {number}")),
            "{x86:?}\n{version}"
        );
        require("qemu-system-aarch64", "apt install qemu-system-arm");
        let arm = lv
            .host_qemu(VmArchitecture::Aarch64, Accelerator::Tcg)
            .unwrap();
        assert!(
            arm.emulator.ends_with("qemu-system-aarch64") && arm.machine.starts_with("virt-"),
            "{arm:?}"
        );
        lv.qemu_accepts(
            VmArchitecture::Aarch64,
            &arm.emulator,
            &["-cpu", "max,pauth-impdef=on"],
        )
        .unwrap();
        let refused = lv
            .qemu_accepts(
                VmArchitecture::Aarch64,
                &arm.emulator,
                &["-cpu", "max,no-such-knob=on"],
            )
            .unwrap_err();
        assert!(refused.contains("no-such-knob"), "{refused}");
        (overlay, pool.volumes().unwrap(), local)
    })
    .await
    .unwrap();
    // The host's path for it; the files are where the host keeps them, not at that path here.
    assert!(
        overlay.starts_with(daemon.dir.path().join("data/pool")),
        "{}",
        overlay.display()
    );
    let theirs = daemon.dir.path().join("host-data/pool");
    let mut volumes = volumes;
    volumes.sort();
    assert_eq!(
        volumes.len(),
        2,
        "the overlay and the base image: {volumes:?}"
    );
    assert!(volumes[0].starts_with(BASE_PREFIX), "{volumes:?}");
    assert_eq!(
        std::fs::read(theirs.join(&volumes[0])).unwrap(),
        bytes,
        "the base image, sent over SSH"
    );
    assert!(theirs.join("remote-vm.qcow2").is_file());
    assert!(
        !daemon.dir.path().join("data/pool/remote-vm.qcow2").exists(),
        "nothing of the host's is written on this side"
    );
    assert!(
        !local_volumes.contains(&"remote-vm.qcow2".to_owned()),
        "this machine's libvirt has none of it"
    );

    // The same host behind a host key the known_hosts does not pin: refused, and said why.
    let impostor = HostKey::generate("impostor").unwrap();
    let bad = uri(&sshd, &impostor, local.path());
    let err = tokio::task::spawn_blocking(move || Libvirt::open(&bad).err())
        .await
        .unwrap()
        .expect("a host key that is not the pinned one is refused");
    let msg = err.to_string();
    assert!(
        msg.to_lowercase().contains("host key") || msg.contains("known_hosts"),
        "{msg}"
    );
}

/// The hop a `qemu+ssh://` URI names logs in with the URI's key, checks the host key its
/// `known_hosts` pins, and reaches ports beside the host: open ones answer, closed ones are
/// refused as such; a human's OpenSSH client reaches a guest through it with the login's
/// `ProxyCommand`. A host `known_hosts` does not list, or lists with another key, is refused,
/// each error naming its fix.
#[test_log::test(tokio::test(flavor = "multi_thread"))]
async fn the_hop_a_uri_names_uses_its_key_and_pinned_host_key() {
    let sshd = Sshd::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let good = uri(&sshd, &sshd.host_key, dir.path());
    let hop = remote::ssh_hop(&good)
        .unwrap()
        .expect("a remote URI has a hop")
        .target;
    assert_eq!((hop.addr, hop.user.as_str()), (sshd.addr, "root"));
    let session = SshSession::connect(&hop, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(session.exec("echo host").await.unwrap().stdout, "host\n");

    // A port that listens beside the host, and one that does not (bound, then closed).
    let listening = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let route = Route::through(hop.clone(), None);
    let before = sshd.sessions();
    route.probe(listening.local_addr().unwrap()).await.unwrap();
    let refused = route.probe(closed).await.unwrap_err();
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{refused}"
    );
    assert_eq!(
        sshd.sessions(),
        before + 1,
        "both probes went through the host, on one session"
    );

    // A human's OpenSSH client takes the same way, through the command the login gives.
    let guest = Sshd::start(&[]).await;
    let guest_known_hosts = dir.path().join("guest_known_hosts");
    std::fs::write(
        &guest_known_hosts,
        format!(
            "[{}]:{} {}\n",
            guest.addr.ip(),
            guest.addr.port(),
            guest.host_key.public_line
        ),
    )
    .unwrap();
    // Its files under a name with a blank and a `%`, which ssh would split and expand.
    let odd = dir.path().join("a b%h");
    std::fs::create_dir(&odd).unwrap();
    std::fs::copy(dir.path().join("known_hosts"), odd.join("known_hosts")).unwrap();
    std::fs::copy(&sshd.client.path, odd.join("key")).unwrap();
    std::fs::set_permissions(
        odd.join("key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let encoded = |p: std::path::PathBuf| {
        p.display()
            .to_string()
            .replace('%', "%25")
            .replace(' ', "%20")
    };
    let odd_uri = format!(
        "qemu+ssh://root@{}:{}/system?keyfile={}&known_hosts={}",
        sshd.addr.ip(),
        sshd.addr.port(),
        encoded(odd.join("key")),
        encoded(odd.join("known_hosts"))
    );
    let proxy = remote::login_of(&odd_uri).unwrap().unwrap().proxy_command();
    let ssh = require("ssh", "apt install openssh-client");
    let out = tokio::process::Command::new(ssh)
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-i",
        ])
        .arg(&guest.client.path)
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            guest_known_hosts.display()
        ))
        .args(["-o", &format!("ProxyCommand={proxy}")])
        .args(["-p", &guest.addr.port().to_string()])
        .arg(format!("root@{}", guest.addr.ip()))
        .arg("echo guest")
        .output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "guest\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!((guest.sessions(), sshd.sessions()), (1, before + 2));

    let impostor = uri(&sshd, &HostKey::generate("impostor").unwrap(), dir.path());
    let hop = remote::ssh_hop(&impostor).unwrap().unwrap().target;
    let err = SshSession::connect(&hop, Duration::from_secs(10))
        .await
        .err()
        .expect("a host key that is not the pinned one is refused");
    assert!(matches!(err, SshError::HostKeyMismatch { .. }), "{err}");

    std::fs::write(dir.path().join("known_hosts"), "").unwrap();
    let Err(err) = remote::ssh_hop(&good) else {
        panic!("a host known_hosts does not list has no hop")
    };
    assert!(
        matches!(err, RemoteError::NotPinned { .. }) && err.to_string().contains("ssh-keyscan"),
        "{err}"
    );
}

/// A service here (NATS, for the device tests) is offered beside a remote host, at the address
/// asked for, through a port the host's sshd forwards back over SSH; an sshd that forwards on
/// its loopback only is named with the setting that fixes it. A local host needs no forward.
#[test_log::test(tokio::test(flavor = "multi_thread"))]
async fn a_service_here_is_offered_beside_a_host_through_its_sshd() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An echo server here (the forward's check connects once and sends nothing).
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let here = echo.local_addr().unwrap();
    let server = tokio::spawn(async move {
        loop {
            let (mut stream, _) = echo.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    // An address of the host that is not its loopback's 127.0.0.1.
    let beside = std::net::Ipv4Addr::new(127, 0, 0, 2);
    let budget = Duration::from_secs(20);
    assert!(
        Route::Direct
            .forward_here(beside, here, budget)
            .await
            .unwrap()
            .is_none()
    );

    let dir = tempfile::tempdir().unwrap();
    let sshd = Sshd::start_with(&[], "GatewayPorts clientspecified\n").await;
    let host = remote::ssh_hop(&uri(&sshd, &sshd.host_key, dir.path())).unwrap();
    let route = Route::through(host.unwrap().target, None);
    let forward = route
        .forward_here(beside, here, budget)
        .await
        .unwrap()
        .expect("a remote host gets a forward");
    assert_eq!(forward.addr.ip(), beside);
    let mut guest = tokio::net::TcpStream::connect(forward.addr).await.unwrap();
    guest.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tokio::time::timeout(budget, guest.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"ping");
    drop(forward);

    let loopback_only = Sshd::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let host = remote::ssh_hop(&uri(&loopback_only, &loopback_only.host_key, dir.path()));
    let route = Route::through(host.unwrap().unwrap().target, None);
    let Err(err) = route.forward_here(beside, here, budget).await else {
        panic!("an sshd that forwards on its loopback only is refused")
    };
    assert!(
        err.to_string().contains("GatewayPorts clientspecified"),
        "{err}"
    );
    server.abort();
}

/// This machine's libvirt alone (whatever DEVICELAB_HOSTS says, its configuration `tune`d) and
/// another host's: a libvirtd in namespaces of its own with a network of its own, behind its
/// sshd, reached over `qemu+ssh://`, its runs in a data dir of their own. Dropped in field
/// order: the sshd stops before its libvirtd.
struct TwoHosts {
    here: HarnessConfig,
    there: HarnessConfig,
    _dir: tempfile::TempDir,
    sshd: Sshd,
    daemon: PrivateLibvirtd,
}

/// This machine's configuration for a test of two hosts (whatever DEVICELAB_HOSTS says, then
/// `tune`d), and the other host's: the same, at `uri` with its runs in `data_dir`.
fn here_and_there(
    uri: String,
    data_dir: std::path::PathBuf,
    tune: impl FnOnce(&mut HarnessConfig),
) -> (HarnessConfig, HarnessConfig) {
    let mut here = HarnessConfig::from_env().unwrap();
    here.hosts.clear();
    tune(&mut here);
    let mut there = here.clone();
    there.libvirt_uri = uri;
    there.data_dir = data_dir;
    (here, there)
}

async fn two_hosts(tune: impl FnOnce(&mut HarnessConfig)) -> TwoHosts {
    let (daemon, sshd) = behind_sshd(
        PrivateLibvirtd::another_host,
        &["-m", "-n"],
        "GatewayPorts clientspecified\n",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (here, there) = here_and_there(
        uri(&sshd, &sshd.host_key, dir.path()),
        daemon.dir.path().join("data"),
        tune,
    );
    TwoHosts {
        here,
        there,
        _dir: dir,
        sshd,
        daemon,
    }
}

/// A device on a libvirt host reached over SSH: the whole onboarding, a power cycle and a
/// partition, with
/// its disks, console, guest SSH and NATS through the host's login (the sshd carries the
/// libvirt connection, the probes' session, each guest session's hop and the NATS forward),
/// started warm: its saved VM built on that host, its memory and disk kept as volumes of the
/// host's pool (only the record and console here), removed as `devicelab clean --warm` removes
/// them.
#[rstest]
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[cfg_attr(not(feature = "e2e"), ignore = "boots a VM: run with --features e2e")]
async fn a_device_on_a_host_over_ssh_starts_warm_and_survives_a_power_cycle_and_a_partition(
    arch: VmArchitecture,
) {
    devicelab::init_logging();
    let sshd = Sshd::start_with(&[], "GatewayPorts clientspecified\n").await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = HarnessConfig::from_env().unwrap();
    config.libvirt_uri = uri(&sshd, &sshd.host_key, dir.path());
    config.start = Start::Warm;
    let lab = Lab::new(config).await.unwrap();
    assert!(matches!(lab.route, Route::Through(_)));
    // This host is this machine's libvirtd: whatever happens, its saved VMs go with the test
    // (unless DEVICELAB_KEEP keeps its clone running on them).
    let _gone = (!lab.config.keep).then(|| SavedVmsGone {
        dir: lab.config.warm_dir(),
        pool: lab.pool.clone(),
    });
    let device = devicelab::trials::scenario::onboarded_device_with(
        &lab,
        arch,
        "overssh",
        &devicelab::reference::agent(),
    )
    .await
    .unwrap();
    let vm = &device.vm;
    // A clone of a saved VM of that host: its memory and disks are the host's volumes; this
    // side keeps the record and the console only.
    assert!(vm.name().starts_with("devicelab-warm-"), "{}", vm.name());
    let record = lab.config.warm_dir().join(vm.name());
    let mut kept: Vec<String> = std::fs::read_dir(&record)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    kept.sort();
    assert_eq!(kept, ["saved.json", "serial.log"], "{}", record.display());
    let saved_volumes =
        devicelab::vm::warm::saved_volume_names(&lab.config.warm_dir(), vm.name()).unwrap();
    let on_host = {
        let pool = lab.pool.clone();
        tokio::task::spawn_blocking(move || pool.volumes().unwrap())
            .await
            .unwrap()
    };
    for v in [&saved_volumes[0], &saved_volumes[1], &saved_volumes[3]] {
        assert!(on_host.contains(v), "{v} on the host: {on_host:?}");
    }
    assert!(
        device.nats.guest_url() != device.nats.client_url(),
        "the guests reach NATS through the host's forward: {}",
        device.nats.guest_url()
    );
    let before = vm.boot_id().await.unwrap();
    let reports = device.reports();
    vm.power_off().await.unwrap();
    let gate = reports.gate().await.unwrap();
    let sessions = sshd.sessions();
    vm.power_on().await.unwrap();
    vm.wait_for_ssh().await.unwrap();
    let after = vm.boot_id().await.unwrap();
    assert!(
        sshd.sessions() > sessions,
        "the new boot's SSH login went through the host"
    );
    assert_ne!(before, after, "a power cycle is a new boot");
    reports
        .wait_for(gate, vm.budgets().first_status, |r| {
            match r.boot_marker.as_deref() {
                Some(b) if b == after => Verdict::Accept,
                Some(b) if b == before => {
                    Verdict::Reject(format!("a report from the old boot after the gate: {r:?}"))
                }
                _ => Verdict::Skip,
            }
        })
        .await
        .unwrap();
    // A partition there (a network filter on that host): nothing the device sends crosses it
    // while it lasts, and its reports come again once healed.
    vm.partition().await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await; // a report already on its way lands
    let gate = reports.gate().await.unwrap();
    let crossed = reports
        .wait_for(gate, Duration::from_secs(15), |_| Verdict::Accept)
        .await;
    assert!(
        crossed.is_err(),
        "a report crossed the partition: {crossed:?}"
    );
    vm.heal().await.unwrap();
    reports
        .wait_for(gate, vm.budgets().first_status, |_| Verdict::Accept)
        .await
        .unwrap();
    // A human's `devicelab ssh` goes through the host too (OpenSSH's client, `ssh -W`).
    let sessions = sshd.sessions();
    let cli = tokio::task::spawn_blocking(common::devicelab_cli)
        .await
        .unwrap();
    let out = tokio::process::Command::new(cli)
        .args(["ssh", vm.name(), "hostname"])
        .env("DEVICELAB_LIBVIRT_URI", &lab.config.libvirt_uri)
        .env_remove("DEVICELAB_HOSTS")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success() && !out.stdout.is_empty(),
        "devicelab ssh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        sshd.sessions() > sessions,
        "devicelab ssh went through the host"
    );
    // And so does the command a VM prints for a human, pasted into a shell.
    let sessions = sshd.sessions();
    let pasted = tokio::process::Command::new("sh")
        .args(["-c", &format!("{} hostname", vm.ssh_command())])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(
        pasted.status.success() && !pasted.stdout.is_empty(),
        "{}: {}",
        vm.ssh_command(),
        String::from_utf8_lossy(&pasted.stderr)
    );
    assert!(
        sshd.sessions() > sessions,
        "the printed command went through the host"
    );
    let console = std::fs::read_to_string(vm.serial_log()).unwrap();
    assert!(
        console.contains("login:") || console.contains("cloud-init"),
        "the console came through the host:\n{console}"
    );
    // Removed through the host while this test's sshd still runs (a handle dropped at the end
    // would be torn down after it stopped, and left to the next run's reaper); then its saved
    // VM, as `devicelab clean --warm` removes it (not run here: it also reaps every ended
    // run's VMs and containers).
    let saved = vm.name().to_owned();
    let saved_at = |dir: std::path::PathBuf, name: String| async move {
        tokio::task::spawn_blocking(move || {
            devicelab::vm::warm::saved_vms(&dir)
                .into_iter()
                .find(|s| s.name == name)
                .map(|s| s.saved_at_unix)
        })
        .await
        .unwrap()
    };
    let built_at = saved_at(lab.config.warm_dir(), saved.clone()).await;
    assert!(built_at.is_some(), "{saved} has a record");
    device.vm.remove().await.unwrap();
    // The next request of that kind restores the same saved VM on that host: no cold boot.
    let again = lab
        .vm(
            devicelab::VirtualMachineSpec::new(lab.vm_name("overssh-again", arch), arch)
                .with_start(Start::Warm),
        )
        .await
        .unwrap();
    assert_eq!(again.name(), saved);
    again.remove().await.unwrap();
    assert_eq!(
        saved_at(lab.config.warm_dir(), saved.clone()).await,
        built_at,
        "the same saved VM restored, not built again"
    );
    let (on_host, removed) = {
        let (pool, dir) = (lab.pool.clone(), lab.config.warm_dir());
        tokio::task::spawn_blocking(move || {
            let removed = devicelab::vm::warm::remove_unused(&dir, Some(&pool)).unwrap();
            (pool.volumes().unwrap(), removed)
        })
        .await
        .unwrap()
    };
    assert_eq!(removed, [saved]);
    for v in &saved_volumes {
        assert!(
            !on_host.contains(v),
            "{v} removed from the host: {on_host:?}"
        );
    }
    assert!(!record.exists(), "{} removed", record.display());
    // Nothing else of that host's is kept here but the owner of its volumes (its clone lock
    // went with its clone).
    let left: Vec<_> = std::fs::read_dir(lab.config.warm_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["owner"]);
}

/// Removes the saved VMs whose records are in `dir`, and their volumes on `pool`'s host, when
/// dropped (a failed test's too: no run owns them, and no reaper looks for them), once their
/// clones' teardowns are done (within a budget); then `dir`.
struct SavedVmsGone {
    dir: std::path::PathBuf,
    pool: Pool,
}

impl Drop for SavedVmsGone {
    fn drop(&mut self) {
        let (dir, pool) = (self.dir.clone(), self.pool.clone());
        // A thread of its own: libvirt calls, never on a runtime worker.
        let _ = std::thread::spawn(move || {
            let started = std::time::Instant::now();
            while started.elapsed() < Duration::from_secs(120) {
                let _ = devicelab::vm::warm::remove_unused(&dir, Some(&pool));
                if devicelab::vm::warm::saved_vms(&dir).is_empty() {
                    let _ = std::fs::remove_dir_all(&dir);
                    return;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            eprintln!(
                "saved VMs left in {}: their clones still run",
                dir.display()
            );
        })
        .join();
    }
}

/// Two hosts of one VM slot each (this machine's libvirtd and one on another host, reached
/// over SSH), a fleet of four real devices: each host onboards one device at a time, the two
/// hosts at once, a device placed wherever a slot comes free first; every device reports to
/// the one NATS server, its guests on each host reaching it their own way. The devices start
/// warm, each a clone of a saved VM built on its own host (a host's second device, its first
/// still running, gets the next saved VM: clones of one never run side by side).
#[rstest]
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[cfg_attr(not(feature = "e2e"), ignore = "boots VMs: run with --features e2e")]
async fn a_fleet_across_two_hosts_onboards_one_device_per_host_slot(arch: VmArchitecture) {
    devicelab::init_logging();
    // One slot each; nothing kept (the other host is checked to keep nothing).
    let hosts = two_hosts(|here| {
        here.vm_slots = Some(1);
        here.keep = false;
    })
    .await;
    let (daemon, sshd) = (&hosts.daemon, &hosts.sshd);
    let (here, there) = (hosts.here.clone(), hosts.there.clone());
    let remote_uri = there.libvirt_uri.clone();
    let (local, remote) = (
        Lab::new(here).await.unwrap(),
        Lab::new(there).await.unwrap(),
    );
    let fleet = Fleet::of(&devicelab::reference::agent())
        .real(4, arch, "spread")
        .start_as(Start::Warm)
        .start_across(&[&local, &remote])
        .await
        .unwrap();
    let all = fleet.group(Select::All);
    let budget = arch
        .budgets(local.accel(arch).accel)
        .scaled(local.config.budget_scale)
        .power_cycle_recovery;
    let reporting = fleet.reporting(&all, budget).await;
    println!("{}", fleet.table());
    assert_eq!(reporting.passed, 4, "{reporting}");
    // Each device's time on its host's one slot: from the slot to its first report.
    let windows = |uri: &str| {
        let mut on: Vec<(Duration, Duration)> = fleet
            .members
            .iter()
            .filter(|m| m.host.as_deref() == Some(uri))
            .map(|m| (m.slot_after, m.slot_after + m.started_in))
            .collect();
        on.sort();
        on
    };
    let (on_local, on_remote) = (windows(&local.config.libvirt_uri), windows(&remote_uri));
    assert_eq!(on_local.len() + on_remote.len(), 4);
    for on in [&on_local, &on_remote] {
        assert!(
            !on.is_empty(),
            "both hosts carry devices: {on_local:?} {on_remote:?}"
        );
        for pair in on.windows(2) {
            assert!(pair[1].0 >= pair[0].1, "one at a time on a host: {on:?}");
        }
    }
    let (first_local, first_remote) = (on_local[0], on_remote[0]);
    assert!(
        first_local.0 < first_remote.1 && first_remote.0 < first_local.1,
        "the two hosts onboard at once: {on_local:?} {on_remote:?}"
    );
    for m in &fleet.members {
        let devicelab::trials::fleet::Device::Real(device) = &m.device else {
            unreachable!("real devices only")
        };
        let ip = device.vm.ip().unwrap();
        let remote_guest = ip.to_string().starts_with(common::ANOTHER_HOST_NETWORK);
        assert_eq!(
            remote_guest,
            m.host.as_deref() == Some(remote_uri.as_str()),
            "{} at {ip} runs on the host it was placed on",
            m.device_id()
        );
        if remote_guest {
            // Only that host reaches its guests: they reported, and were provisioned and
            // onboarded, through its SSH login.
            let direct = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::net::TcpStream::connect((ip, 22)),
            )
            .await;
            assert!(
                !matches!(direct, Ok(Ok(_))),
                "{ip} does not route from here: only the host reaches it"
            );
        }
    }
    // The guests of each host reach the one server their own way: the other host's at their
    // own gateway, forwarded by its sshd.
    let forwarded = fleet.nats.guest_url_on(&remote_uri);
    assert!(
        forwarded.contains(&format!("{}.1:", common::ANOTHER_HOST_NETWORK)),
        "{forwarded}"
    );
    assert_ne!(
        forwarded,
        fleet.nats.guest_url_on(&local.config.libvirt_uri)
    );
    // `devicelab ls` lists each host's devices under it, and `devicelab ssh` finds a device's
    // host, with both hosts in DEVICELAB_HOSTS.
    let hosts = format!("{} {remote_uri}", local.config.libvirt_uri);
    let cli = tokio::task::spawn_blocking(common::devicelab_cli)
        .await
        .unwrap();
    let devicelab = |args: &[&str]| {
        let mut command = tokio::process::Command::new(&cli);
        command
            .args(args)
            .env_remove("DEVICELAB_LIBVIRT_URI")
            .env("DEVICELAB_HOSTS", &hosts);
        command
    };
    let listed = devicelab(&["ls"]).output().await.unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned()
        + &String::from_utf8_lossy(&listed.stderr);
    let under = |uri: &str| {
        let from = listed
            .find(&format!("host {uri}:"))
            .unwrap_or_else(|| panic!("a heading for {uri}:\n{listed}"));
        let rest = &listed[from + 1..];
        rest[..rest.find("\nhost ").unwrap_or(rest.len())].to_owned()
    };
    let on_remote = fleet
        .members
        .iter()
        .find(|m| m.host.as_deref() == Some(remote_uri.as_str()))
        .unwrap();
    for m in &fleet.members {
        let host = m.host.as_deref().unwrap();
        let devicelab::trials::fleet::Device::Real(device) = &m.device else {
            unreachable!("real devices only")
        };
        assert!(
            // A warm clone is listed as its saved VM's domain (with the request's name where
            // its run dir is in this data dir: the other host's lab keeps its own).
            under(host).contains(device.vm.name()),
            "{} ({}) is listed under its host:\n{listed}",
            m.device_id(),
            device.vm.name()
        );
    }
    // That host's lab keeps its run dirs and key in its own data dir (see above).
    let sessions = sshd.sessions();
    let out = devicelab(&["ssh", on_remote.device_id(), "hostname"])
        .env("DEVICELAB_DATA_DIR", &remote.config.data_dir)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success() && sshd.sessions() > sessions,
        "devicelab ssh reached {} through its host: {}",
        on_remote.device_id(),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every device is a clone of a saved VM of its own host, and that host lists them.
    let saved_on = |uri: &str| {
        let mut names: Vec<String> = fleet
            .members
            .iter()
            .filter(|m| m.host.as_deref() == Some(uri))
            .map(|m| match &m.device {
                devicelab::trials::fleet::Device::Real(device) => device.vm.name().to_owned(),
                _ => unreachable!("real devices only"),
            })
            .collect();
        names.sort();
        names.dedup();
        names
    };
    let saved_there = saved_on(&remote_uri);
    for names in [&saved_there, &saved_on(&local.config.libvirt_uri)] {
        assert!(
            !names.is_empty() && names.iter().all(|n| n.starts_with("devicelab-warm-")),
            "{names:?}"
        );
    }
    let on_that_host = |args: &[&str]| {
        let mut command = tokio::process::Command::new(&cli);
        command
            .args(args)
            .env_remove("DEVICELAB_HOSTS")
            .env("DEVICELAB_LIBVIRT_URI", &remote_uri)
            .env("DEVICELAB_DATA_DIR", &remote.config.data_dir);
        command
    };
    let listed = on_that_host(&["ls"]).output().await.unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    for name in &saved_there {
        assert!(
            listed.contains(&format!(
                "saved VM {name} (volumes of the host's pool, a clone is running)"
            )),
            "{listed}"
        );
    }
    // Removed through the other host while its sshd still runs; then its saved VMs, as
    // `devicelab clean --warm` removes them (not run here: it also reaps every ended run's
    // containers on this machine). One has lost its record, as with a data dir not kept:
    // its volumes are found by their names and removed too.
    fleet.remove().await.unwrap();
    let lost = remote.config.warm_dir().join(&saved_there[0]);
    std::fs::remove_dir_all(&lost).unwrap();
    let removed = {
        let (dir, pool) = (remote.config.warm_dir(), remote.pool.clone());
        tokio::task::spawn_blocking(move || {
            devicelab::vm::warm::remove_unused(&dir, Some(&pool)).unwrap()
        })
        .await
        .unwrap()
    };
    let mut removed = removed;
    removed.sort();
    assert_eq!(removed, saved_there, "each removed, its record or not");
    assert_eq!(
        common::leftovers(&daemon.uri()),
        Vec::<String>::new(),
        "nothing of devicelab's is left on the other host"
    );
}

/// Runs in a child process: a lab on this machine's libvirt and one on the host
/// `REAP_REMOTE_URI` names (its runs in `REAP_REMOTE_DATA`), a cold VM on each
/// (`REAP_VM_NAME`, `-here` and `-there`); never returns.
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[ignore = "helper for the killed-run test"]
async fn helper_a_vm_on_each_host_and_hang() {
    let var = |name: &str| std::env::var(name).unwrap();
    let name = var("REAP_VM_NAME");
    let (here, there) = here_and_there(
        var("REAP_REMOTE_URI"),
        var("REAP_REMOTE_DATA").into(),
        |_| {},
    );
    let (local, remote) = (
        Lab::new(here).await.unwrap(),
        Lab::new(there).await.unwrap(),
    );
    let spec = |side: &str| {
        devicelab::VirtualMachineSpec::new(format!("{name}-{side}"), arch()).with_start(Start::Cold)
    };
    let (_here, _there) =
        tokio::try_join!(local.vm(spec("here")), remote.vm(spec("there"))).unwrap();
    std::future::pending::<()>().await;
}

/// A run killed (SIGKILL: no handler runs) while it provisions a VM on each of two hosts leaves
/// both behind; the next run on each host reaps the VM there, and neither host keeps a domain,
/// a volume or a run dir of it.
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[cfg_attr(not(feature = "e2e"), ignore = "boots VMs: run with --features e2e")]
async fn a_run_killed_with_a_vm_on_each_host_is_reaped_on_both() {
    devicelab::init_logging();
    let hosts = two_hosts(|_| {}).await;
    let daemon = &hosts.daemon;
    let (here, there) = (hosts.here.clone(), hosts.there.clone());
    let name = format!("devicelab-reap-{}", hex::encode(rand::random::<[u8; 3]>()));
    let (on_here, on_there) = (format!("{name}-here"), format!("{name}-there"));
    let mut child = KillOnDrop(
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "helper_a_vm_on_each_host_and_hang",
                "--include-ignored",
                "--nocapture",
            ])
            .env("REAP_VM_NAME", &name)
            .env("REAP_REMOTE_URI", &there.libvirt_uri)
            .env("REAP_REMOTE_DATA", &there.data_dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Each host's libvirt, looked at directly (the other host's through its own socket).
    let (lv_here, lv_there) = (
        Libvirt::open(&here.libvirt_uri).unwrap(),
        Libvirt::open(&daemon.uri()).unwrap(),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    while !(domain_running(&lv_here, &on_here) && domain_running(&lv_there, &on_there)) {
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "the helper exited before both its VMs ran"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the helper's VMs never both ran"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(child); // SIGKILL: no handler runs
    assert!(
        lv_here.has_domain(&on_here).unwrap() && lv_there.has_domain(&on_there).unwrap(),
        "the killed run left a VM on each host (the leak the reaper is for)"
    );

    // (Another test's lab starting meanwhile may reap the local VM first: either way it goes.)
    let next_here = Lab::new(here).await.unwrap();
    assert!(
        !lv_here.has_domain(&on_here).unwrap(),
        "this host's next run reaped its VM"
    );
    assert!(
        !next_here.config.runs_dir().join(&on_here).exists(),
        "and its run dir"
    );
    let next_there = Lab::new(there).await.unwrap();
    assert_eq!(
        common::leftovers(&daemon.uri()),
        Vec::<String>::new(),
        "the other host's next run reaped its VM and volumes"
    );
    assert!(
        !next_there.config.runs_dir().join(&on_there).exists(),
        "and its run dir"
    );
    let local_left: Vec<String> = common::leftovers(&lv_here.uri)
        .into_iter()
        .filter(|l| l.contains(&name))
        .collect();
    assert_eq!(local_left, Vec::<String>::new(), "and this host's volumes");
}
