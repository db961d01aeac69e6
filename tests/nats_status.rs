//! The status protocol end to end on loopback: the real agent loop publishes to a real
//! nats-server started by the harness, and the harness reads the history back in order.

mod common;

use devicelab::config::HarnessConfig;
use devicelab::lab::run_owner;
use devicelab::nats::{NatsError, NatsServer, Verdict};
use devicelab_agent::{AgentConfig, DEFAULT_SUBJECT_PREFIX, Status, now_ms, run};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

async fn server() -> NatsServer {
    common::nats_process_server().await
}

fn agent(nats: &NatsServer, device: &str) -> AgentConfig {
    AgentConfig {
        device_id: device.into(),
        nats_url: nats.client_url(),
        interval_ms: 50,
        subject_prefix: DEFAULT_SUBJECT_PREFIX.into(),
        nats_user: nats.credentials().map(|c| c.user.clone()),
        nats_password: nats.credentials().map(|c| c.password.clone()),
        control: None,
    }
}

#[test_log::test(tokio::test(flavor = "multi_thread"))]
async fn nothing_without_the_run_credentials_can_publish_a_status() {
    let nats = server().await;
    let creds = nats.credentials().unwrap().clone();
    let connect = |password: &str| {
        async_nats::ConnectOptions::with_user_and_password(creds.user.clone(), password.to_owned())
            .connect(nats.client_url())
    };
    let anonymous = async_nats::connect(nats.client_url()).await.err();
    let wrong = connect("wrong").await.err();
    for (who, err) in [
        ("an anonymous client", anonymous),
        ("a wrong password", wrong),
    ] {
        let err = err.unwrap_or_else(|| panic!("{who} must be refused"));
        assert!(
            err.to_string().to_lowercase().contains("authorization"),
            "{who} is refused for its credentials, not for anything else: {err}"
        );
    }
    // The same server takes the run's credentials: the refusals above are about them.
    connect(&creds.password)
        .await
        .expect("the run's credentials work");

    // And the agent with a wrong password gets no report into the stream.
    let mut cfg = agent(&nats, "dev-x");
    cfg.nats_password = Some("wrong".into());
    let _ = tokio::time::timeout(Duration::from_secs(3), run(&cfg, "b", Some(1))).await;
    let got = nats
        .status_log("dev-x")
        .wait_for(0, Duration::from_secs(1), |_| Verdict::Accept)
        .await;
    assert!(matches!(got, Err(NatsError::StatusTimeout { .. })));
}

#[test_log::test(tokio::test(flavor = "multi_thread"))]
async fn the_password_is_in_a_private_file_and_the_server_listens_only_where_asked() {
    use std::os::unix::fs::PermissionsExt;
    let nats = server().await;
    let password = nats.credentials().unwrap().password.clone();
    let pid = nats.process_id().expect("process mode");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        !String::from_utf8_lossy(&cmdline).contains(&password),
        "the password is on the server's command line"
    );
    let config = nats.config_path();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&config), 0o600, "{}", config.display());
    assert_eq!(
        mode(config.parent().unwrap()),
        0o700,
        "its directory is private too"
    );
    assert!(
        std::fs::read_to_string(&config)
            .unwrap()
            .contains(&password)
    );

    // Asked to listen on 127.0.0.1 (the gateway here): another local address finds nothing.
    let port = nats.port;
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    let elsewhere = std::net::TcpStream::connect(("127.0.0.2", port));
    assert_eq!(
        elsewhere.map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::ConnectionRefused),
        "the server must not listen on every address"
    );
}

#[test_log::test(tokio::test(flavor = "multi_thread"))]
async fn the_agent_reports_in_order_and_the_harness_reads_them_back() {
    let nats = server().await;
    let before = now_ms();
    run(&agent(&nats, "dev-a"), "boot-1", Some(5))
        .await
        .unwrap();
    // Another device's reports must not show up in dev-a's log.
    run(&agent(&nats, "dev-b"), "boot-9", Some(2))
        .await
        .unwrap();
    let log = nats.status_log("dev-a");
    let mut seen: Vec<Status> = Vec::new();
    let (_, last) = log
        .wait_for(0, Duration::from_secs(10), |s| {
            seen.push(s.clone());
            if s.seq == 5 {
                Verdict::Accept
            } else {
                Verdict::Skip
            }
        })
        .await
        .unwrap();
    assert_eq!(
        seen.iter().map(|s| s.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert!(
        seen.iter()
            .all(|s| s.device_id == "dev-a" && s.boot_id == "boot-1")
    );
    assert!(last.timestamp_ms >= before && last.timestamp_ms <= now_ms());
}

#[test_log::test(tokio::test(flavor = "multi_thread"))]
async fn the_gate_ignores_the_past_and_rejects_the_old_boot_after_it() {
    let nats = server().await;
    let cfg = agent(&nats, "dev-g");
    run(&cfg, "old-boot", Some(3)).await.unwrap();
    let log = nats.status_log("dev-g");
    let gate = log.last_sequence().await.unwrap();
    assert!(gate >= 3);

    // Reports after the gate from the new boot are accepted; the old ones before it are not read.
    run(&cfg, "new-boot", Some(1)).await.unwrap();
    let (seq, status) = log
        .wait_for(gate, Duration::from_secs(10), |s| {
            match s.boot_id.as_str() {
                "old-boot" => Verdict::Reject("old boot after the gate".into()),
                _ => Verdict::Accept,
            }
        })
        .await
        .unwrap();
    assert!(seq > gate);
    assert_eq!(status.boot_id, "new-boot");

    // A report from the old boot after the gate fails the check.
    let gate = log.last_sequence().await.unwrap();
    run(&cfg, "old-boot", Some(1)).await.unwrap();
    let err = log
        .wait_for(gate, Duration::from_secs(10), |s| {
            match s.boot_id.as_str() {
                "old-boot" => Verdict::Reject("old boot after the gate".into()),
                _ => Verdict::Accept,
            }
        })
        .await
        .unwrap_err();
    assert!(matches!(err, NatsError::StatusRejected { .. }), "{err}");
}

/// A report still on its way when the plug is pulled (sent before the cut, stored after it)
/// is the old boot's last word, not a report from the old boot after the cut: the gate taken
/// once the stream is quiet puts it before the gate; a gate read at once would have failed a
/// healthy device on it. Both sides, with the delay explicit: stored 300 ms after the cut.
#[test_log::test(tokio::test(flavor = "multi_thread"))]
async fn a_report_in_flight_at_the_cut_is_before_the_quiet_gate() {
    let nats = server().await;
    let cfg = agent(&nats, "dev-f");
    run(&cfg, "old-boot", Some(2)).await.unwrap();
    let log = nats.status_log("dev-f");
    let old_boot_after = async |gate: u64| {
        log.wait_for(gate, Duration::from_secs(10), |s| {
            match s.boot_id.as_str() {
                "old-boot" => Verdict::Reject("old boot after the gate".into()),
                _ => Verdict::Accept,
            }
        })
        .await
    };
    let in_flight = |cfg: AgentConfig| async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        run(&cfg, "old-boot", Some(1)).await.unwrap();
    };

    // Read at once, the gate lets the in-flight report through after it: a false failure.
    let landing = tokio::spawn(in_flight(cfg.clone()));
    let naive = log.last_sequence().await.unwrap();
    landing.await.unwrap();
    run(&cfg, "new-boot", Some(1)).await.unwrap();
    let err = old_boot_after(naive).await.unwrap_err();
    assert!(matches!(err, NatsError::StatusRejected { .. }), "{err}");

    // Read once the stream is quiet, the gate is after it: the new boot's report decides.
    let landing = tokio::spawn(in_flight(cfg.clone()));
    let gate = log
        .gate_after_cut(Duration::from_secs(3), Duration::from_secs(30))
        .await
        .unwrap();
    landing.await.unwrap();
    run(&cfg, "new-boot", Some(1)).await.unwrap();
    let (_, first) = old_boot_after(gate).await.unwrap();
    assert_eq!(first.boot_id, "new-boot");
}

/// A stream that never goes quiet after a cut (something still reports as the device) is an
/// error within the gate's budget, not a gate.
#[test_log::test(tokio::test(flavor = "multi_thread"))]
async fn a_stream_that_never_goes_quiet_is_an_error() {
    let nats = server().await;
    let cfg = agent(&nats, "dev-q");
    let chatter = tokio::spawn({
        let cfg = cfg.clone();
        async move {
            loop {
                run(&cfg, "still-on", Some(1)).await.unwrap();
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    });
    let log = nats.status_log("dev-q");
    let err = log
        .gate_after_cut(Duration::from_secs(2), Duration::from_secs(5))
        .await
        .unwrap_err();
    chatter.abort();
    assert!(err.to_string().contains("kept arriving"), "{err}");
}

#[test_log::test(tokio::test(flavor = "multi_thread"))]
async fn waiting_for_a_report_that_never_comes_times_out_with_what_was_seen() {
    let nats = server().await;
    run(&agent(&nats, "dev-t"), "b", Some(2)).await.unwrap();
    let err = nats
        .status_log("dev-t")
        .wait_for(0, Duration::from_secs(2), |_| Verdict::Skip)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, NatsError::StatusTimeout { .. }));
    assert!(
        msg.contains("dev-t") && msg.contains("boot_id: \"b\", seq: 2"),
        "{msg}"
    );
}

#[test_log::test(tokio::test(flavor = "multi_thread"))]
async fn the_agent_waits_for_a_server_that_comes_up_later_and_loses_nothing() {
    let mut nats = server().await;
    let cfg = agent(&nats, "dev-late");
    // The agent starts while the server is down, so its first connection attempts fail.
    #[allow(clippy::async_yields_async)] // the agent's handle is awaited after the restart
    let (restarted, agent) = tokio::join!(nats.restart(Duration::from_secs(3)), async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let agent = tokio::spawn(async move { run(&cfg, "boot-late", Some(3)).await });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            !agent.is_finished(),
            "the agent must keep trying while the server is down, not give up"
        );
        agent
    });
    restarted.unwrap();
    tokio::time::timeout(Duration::from_secs(30), agent)
        .await
        .expect("the agent finished after the server came up")
        .unwrap()
        .unwrap();
    // Every report reached the stream, once each and in order: none went out as a message
    // nobody stored.
    let mut seen = Vec::new();
    nats.status_log("dev-late")
        .wait_for(0, Duration::from_secs(10), |s| {
            seen.push(s.seq);
            if s.seq == 3 {
                Verdict::Accept
            } else {
                Verdict::Skip
            }
        })
        .await
        .unwrap();
    assert_eq!(seen, [1, 2, 3]);
}

#[test_log::test(tokio::test(flavor = "multi_thread"))]
async fn keep_leaves_a_process_server_serving_after_the_handle_drops() {
    let vars = BTreeMap::from([
        ("DEVICELAB_NATS".to_owned(), "process".to_owned()),
        ("DEVICELAB_KEEP".to_owned(), "1".to_owned()),
    ]);
    let config = HarnessConfig::from_vars(vars).unwrap();
    let nats = NatsServer::start(&config, Ipv4Addr::LOCALHOST, &run_owner())
        .await
        .unwrap();
    let (pid, url, dir) = (
        nats.process_id().unwrap(),
        nats.client_url(),
        nats.config_path().parent().unwrap().to_owned(),
    );
    let creds = nats.credentials().unwrap().clone();
    drop(nats);
    let served = async_nats::ConnectOptions::with_user_and_password(creds.user, creds.password)
        .connect(url)
        .await;
    // What the printed removal command does, so the test leaves nothing behind.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    std::fs::remove_dir_all(&dir).unwrap();
    served.expect("DEVICELAB_KEEP: the server still serves after its handle dropped");
}

/// "Stored once" needs the stream to remember a report's id for as long as the agent may re-send
/// it: JetStream's default duplicate window (2 minutes) is far shorter than a full backlog.
#[test_log::test(tokio::test(flavor = "multi_thread"))]
async fn the_duplicate_window_covers_the_agents_longest_resend() {
    let nats = server().await;
    let mut stream = async_nats::jetstream::new(nats.client().clone())
        .get_stream(devicelab::nats::STREAM_NAME)
        .await
        .unwrap();
    let window = stream.info().await.unwrap().config.duplicate_window;
    let needed = devicelab_agent::longest_resend(Duration::from_millis(
        devicelab_agent::DEFAULT_INTERVAL_MS,
    ));
    assert!(
        window >= needed,
        "duplicate window {window:?} < the agent's longest resend {needed:?}"
    );
}

/// Another process takes the server's port while the server is down for a restart (its
/// clients know only that port): the restart fails at once with the server's own words and
/// the port, not after the start budget.
#[test_log::test(tokio::test(flavor = "multi_thread"))]
async fn a_port_taken_during_a_restart_fails_it_at_once_naming_the_port() {
    let mut nats = server().await;
    let addr: std::net::SocketAddr = nats
        .client_url()
        .trim_start_matches("nats://")
        .parse()
        .unwrap();
    let started = std::time::Instant::now();
    let (restarted, taken) = tokio::join!(nats.restart(Duration::from_secs(2)), async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        std::net::TcpListener::bind(addr)
    });
    let took = started.elapsed();
    let _taken = taken.expect("the port is free while the server is down");
    let msg = restarted.expect_err("the port is taken").to_string();
    assert!(
        msg.contains(&addr.port().to_string())
            && msg.contains("address already in use")
            && msg.contains("its port is taken by another process"),
        "{msg}"
    );
    assert!(took < Duration::from_secs(15), "failed at once: {took:?}");
}
