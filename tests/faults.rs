//! Faults the harness and the agent must ride out, each against the real part: a NATS server
//! restarted while the agent reports (process mode here; the container mode runs with the e2e
//! suite, which has the NATS image), a domain left defined with other XML by an older run, and
//! one defined by a run that still runs (never touched).

mod common;

use common::{PrivateLibvirtd, system_libvirt};
use devicelab::VmArchitecture;
use devicelab::config::HarnessConfig;
use devicelab::host::domain_xml::{DomainXmlParams, digest_of_defined, mac_for, render};
use devicelab::host::libvirt::{Libvirt, LibvirtError};
use devicelab::lab::run_owner;
use devicelab::model::arch::Accelerator;
use devicelab::nats::{NatsServer, Verdict};
use devicelab_agent::{AgentConfig, DEFAULT_SUBJECT_PREFIX, run};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

/// A server configured from the environment (DEVICELAB_NATS_IMAGE…), with `overrides`.
async fn server(overrides: &[(&str, &str)]) -> NatsServer {
    let mut vars: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("DEVICELAB_"))
        .collect();
    vars.extend(
        overrides
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let config = HarnessConfig::from_vars(vars).unwrap();
    NatsServer::start(&config, Ipv4Addr::LOCALHOST, &run_owner())
        .await
        .unwrap()
}

/// The agent reports every 100 ms; after its fifth report the server goes down for 4 s (longer
/// than the agent waits for an acknowledgement, so reports are retried). Every report must end
/// up in the stream exactly once and in order, and the agent must finish.
async fn restart_while_reporting(mut nats: NatsServer) {
    const REPORTS: u64 = 40;
    let cfg = AgentConfig {
        device_id: "dev-outage".into(),
        nats_url: nats.client_url(),
        interval_ms: 100,
        subject_prefix: DEFAULT_SUBJECT_PREFIX.into(),
        nats_user: nats.credentials().map(|c| c.user.clone()),
        nats_password: nats.credentials().map(|c| c.password.clone()),
        control: None,
    };
    let agent = tokio::spawn(async move { run(&cfg, "boot-outage", Some(REPORTS)).await });
    let log = nats.status_log("dev-outage");
    log.wait_for(0, Duration::from_secs(20), |s| {
        if s.seq >= 5 {
            Verdict::Accept
        } else {
            Verdict::Skip
        }
    })
    .await
    .unwrap();
    nats.restart(Duration::from_secs(4)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), agent)
        .await
        .expect("the agent delivered its backlog after the restart")
        .unwrap()
        .unwrap();

    let log = nats.status_log("dev-outage");
    let mut seqs = Vec::new();
    log.wait_for(0, Duration::from_secs(20), |s| {
        seqs.push(s.seq);
        if s.seq == REPORTS {
            Verdict::Accept
        } else {
            Verdict::Skip
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; seqs so far: {seqs:?}"));
    assert_eq!(
        seqs,
        (1..=REPORTS).collect::<Vec<_>>(),
        "every report once, in order, across the restart"
    );
    assert_eq!(
        log.last_sequence().await.unwrap(),
        REPORTS,
        "no duplicates stored"
    );
}

#[test_log::test(tokio::test(flavor = "multi_thread"))]
async fn a_nats_process_restarted_mid_report_loses_nothing() {
    restart_while_reporting(server(&[("DEVICELAB_NATS", "process")]).await).await;
}

#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs the NATS container image: run with --features e2e"
)]
async fn a_nats_container_restarted_mid_report_loses_nothing() {
    restart_while_reporting(server(&[]).await).await;
}

fn domain_params(name: &str, memory_mib: u64) -> DomainXmlParams {
    let dir = std::env::temp_dir().join(name);
    DomainXmlParams {
        name: name.into(),
        arch: VmArchitecture::X86_64,
        accel: Accelerator::Tcg,
        vcpus: 1,
        memory_mib,
        emulator: PathBuf::from("/usr/bin/qemu-system-x86_64"),
        disk: dir.join("disk.qcow2"),
        seed: dir.join("seed.img"),
        network: "default".into(),
        mac: mac_for(name),
        uefi: None,
        qemu_args: Vec::new(),
        owner: run_owner(),
    }
}

/// Removes the test's domain even when an assertion fails.
struct Undefine<'a>(&'a Libvirt, &'a str);
impl Drop for Undefine<'_> {
    fn drop(&mut self) {
        if let Ok(dom) = self.0.domain(self.1) {
            let _ = self.0.remove_domain(&dom, self.1);
        }
    }
}

#[test]
fn a_domain_left_defined_with_other_xml_is_redefined_not_replayed() {
    let lv = system_libvirt();
    let name = format!(
        "devicelab-fault-stale-{}",
        hex::encode(rand::random::<[u8; 3]>())
    );
    let _cleanup = Undefine(&lv, &name);
    // An older run left this definition behind (another memory size, another digest).
    let old = render(&domain_params(&name, 512));
    lv.conn().unwrap().define_domain_xml(&old.xml).unwrap();

    let new = render(&domain_params(&name, 768));
    assert_ne!(old.digest, new.digest);
    let dom = lv.define(&name, &new).unwrap();
    let defined = dom.xml_desc(0).unwrap();
    assert_eq!(
        digest_of_defined(&defined).as_deref(),
        Some(new.digest.as_str())
    );
    assert!(defined.contains("786432"), "768 MiB in KiB: {defined}");

    // The same XML again is reused as it is: same domain, same UUID.
    let uuid = dom.uuid_string().unwrap();
    let again = lv.define(&name, &new).unwrap();
    assert_eq!(again.uuid_string().unwrap(), uuid);
}

/// A domain whose owner, another process, still runs is never redefined (which would destroy
/// it): the definition is refused with the owner named. (pid 1 stands for the other process.)
#[test]
fn a_domain_of_a_live_run_is_never_redefined() {
    let lv = system_libvirt();
    let name = format!(
        "devicelab-fault-owned-{}",
        hex::encode(rand::random::<[u8; 3]>())
    );
    let _cleanup = Undefine(&lv, &name);
    let mut theirs = domain_params(&name, 512);
    theirs.owner.pid = 1;
    let theirs = render(&theirs);
    lv.conn().unwrap().define_domain_xml(&theirs.xml).unwrap();
    let refused = lv.define(&name, &render(&domain_params(&name, 768)));
    assert!(
        matches!(&refused, Err(LibvirtError::OwnedByLiveRun { pid: 1, .. })),
        "{:?}",
        refused.map(drop)
    );
    assert!(refused.unwrap_err().to_string().contains("another name"));
    let defined = lv.domain(&name).unwrap().xml_desc(0).unwrap();
    assert_eq!(
        digest_of_defined(&defined).as_deref(),
        Some(theirs.digest.as_str()),
        "their definition is untouched"
    );
}

/// Runs `f` on a thread of its own and gives it `limit`: a call that never returns fails the test
/// instead of hanging it.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("the call to a hung libvirtd did not return within {limit:?}"))
}

/// The threads of this process named `name`.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .count()
}

/// A hung libvirtd (stopped, not dead: its socket still accepts connections) ends a call on an
/// open connection through the keepalive and a new connection through the open budget, each
/// error saying it is hung and what to do. A handle keeps one attempt to open in flight: a
/// call after the budget is spent fails at once, and calls add no threads. Once libvirtd
/// answers again the same handle works. (Short timeouts here, the same code as the defaults;
/// the thread counts assume a process of its own, as nextest gives each test.)
#[test]
fn a_hung_libvirtd_fails_every_call_within_its_budget_naming_it() {
    use devicelab::host::libvirt::{LibvirtTimeouts, OPEN_THREAD};
    let timeouts = LibvirtTimeouts {
        keepalive_interval: 1,
        keepalive_count: 2,
        open: Duration::from_secs(3),
    };
    let slack = Duration::from_secs(5);
    let daemon = PrivateLibvirtd::start();
    let lv = Libvirt::open_with(&daemon.uri(), timeouts).unwrap();
    let name = "devicelab-fault-hung";
    assert!(!lv.has_domain(name).unwrap());
    // A dropped handle closes its connection (the close callback would otherwise keep it).
    let fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    let before = fds();
    for _ in 0..5 {
        assert!(
            !Libvirt::open_with(&daemon.uri(), timeouts)
                .unwrap()
                .has_domain(name)
                .unwrap()
        );
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while fds() > before {
        assert!(
            std::time::Instant::now() < deadline,
            "5 dropped handles left {} descriptors open",
            fds() - before
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (lv2, uri) = (lv.clone(), daemon.uri());
    let busy = Libvirt::open_with(&daemon.uri(), timeouts).unwrap();
    daemon.signal(libc::SIGSTOP);
    let stopped = std::time::Instant::now();
    let keepalive = Duration::from_secs(3);
    let hung = |err: LibvirtError| {
        let msg = err.to_string();
        assert!(matches!(err, LibvirtError::Hung { .. }), "{msg}");
        assert!(
            msg.contains("it is hung") && msg.contains("restart it"),
            "{msg}"
        );
    };

    // A call waiting on a connection when the keepalive closes it fails.
    let in_flight = std::thread::spawn(move || {
        within(keepalive * 10, move || busy.has_domain(name)).expect_err("libvirtd is hung")
    });
    // An idle connection is closed by the keepalive too: its next call says why from the
    // connection's close reason alone (libvirt's message then only says the socket is closed).
    std::thread::sleep(keepalive + Duration::from_secs(2));
    let started = std::time::Instant::now();
    let call = lv.clone();
    hung(within(keepalive * 10, move || call.has_domain(name)).expect_err("libvirtd is hung"));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    hung(in_flight.join().unwrap());
    assert!(
        stopped.elapsed() < keepalive + slack,
        "took {:?}",
        stopped.elapsed()
    );

    // The next call, and a new handle, find the connection closed and open a new one: cut off
    // by the open budget (both at once, each on a thread of its own).
    let started = std::time::Instant::now();
    let next_call = std::thread::spawn(move || {
        within(timeouts.open * 10, move || lv2.has_domain(name).map(drop))
    });
    let new_handle = within(timeouts.open * 10, move || {
        Libvirt::open_with(&uri, timeouts).map(drop)
    });
    for err in [next_call.join().unwrap(), new_handle] {
        let err = err.expect_err("libvirtd is still hung");
        assert!(matches!(err, LibvirtError::NotAnswering { .. }), "{err}");
        assert!(err.to_string().contains("restart it"), "{err}");
    }
    let waited = started.elapsed();
    assert!(
        waited >= timeouts.open && waited < timeouts.open + slack,
        "took {waited:?}"
    );

    // Later calls share the attempt in flight: past its budget, they fail at once, and no
    // call adds a thread.
    let opening = threads_named(OPEN_THREAD);
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let call = lv.clone();
        let err = within(timeouts.open * 10, move || call.has_domain(name).map(drop))
            .expect_err("libvirtd is still hung");
        assert!(matches!(err, LibvirtError::NotAnswering { .. }), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }
    assert_eq!(threads_named(OPEN_THREAD), opening, "calls added threads");
    assert!(opening <= 2, "{opening} threads opening connections");

    // Answering again, libvirtd completes the attempt in flight; the handle takes it (no new
    // attempt: the thread count does not rise).
    daemon.signal(libc::SIGCONT);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match lv.has_domain(name) {
            Ok(found) => break assert!(!found),
            Err(e) => assert!(
                std::time::Instant::now() < deadline,
                "the handle still fails 10 s after libvirtd answers again: {e}"
            ),
        }
        assert!(
            threads_named(OPEN_THREAD) <= opening,
            "a new attempt was started"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_libvirtd_restart_mid_run_is_a_clear_error_then_a_reconnect() {
    let mut daemon = PrivateLibvirtd::start();
    let lv = Libvirt::open(&daemon.uri()).unwrap();
    let name = "devicelab-fault-restart";
    let dom = lv.define(name, &render(&domain_params(name, 512))).unwrap();
    assert!(!dom.is_active().unwrap());

    daemon.stop();
    let err = lv.domain(name).expect_err("libvirtd is down");
    let msg = err.to_string();
    assert!(matches!(err, LibvirtError::Connect { .. }), "{msg}");
    assert!(msg.contains("is libvirtd running?"), "{msg}");

    daemon.spawn();
    let dom = lv
        .domain(name)
        .expect("the same handle reconnects to the restarted libvirtd");
    lv.remove_domain(&dom, name).unwrap();
    assert!(lv.domain(name).is_err(), "removed");
}

/// A teardown that cannot tell whether its domain exists (the lookup failed for another reason
/// than "no such domain") removes nothing: the volumes stay, with the error, for a later try,
/// instead of being deleted under a domain that may still run. Once the lookup says there is
/// none, they go. (libvirt's pool, in a private libvirtd.)
#[test]
fn a_teardown_whose_lookup_failed_keeps_the_volumes() {
    use devicelab::host::pool::Pool;
    use devicelab::host::reaper::{remove_looked_up, remove_vm, volume_names};
    let daemon = PrivateLibvirtd::start();
    let lv = Libvirt::open(&daemon.uri()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::ensure(&lv, &dir.path().join("pool")).unwrap();
    let name = "devicelab-fault-lookup";
    let volumes = volume_names(name);
    for v in &volumes {
        std::fs::write(pool.path_of(v), b"disk").unwrap();
    }
    pool.refresh().unwrap();

    let failed = "cannot look up domain devicelab-fault-lookup: internal error".to_owned();
    let errors = remove_looked_up(&lv, &pool, name, Err(failed.clone()));
    assert_eq!(errors, vec![failed]);
    for v in &volumes {
        assert!(
            pool.path_of(v).exists(),
            "{v} was deleted under a domain that may still run"
        );
    }

    assert_eq!(remove_vm(&lv, &pool, name), Vec::<String>::new());
    for v in &volumes {
        assert!(
            !pool.path_of(v).exists(),
            "{v} outlived a domain that is not there"
        );
    }
}
