//! The status protocol end to end on loopback: the real agent loop publishes to a real
//! nats-server started by the harness, and the harness reads the history back in order.

use devicelab::config::HarnessConfig;
use devicelab::lab::run_owner;
use devicelab::nats::{NatsError, NatsServer, Verdict};
use devicelab_agent::{AgentConfig, DEFAULT_SUBJECT_PREFIX, Status, now_ms, run};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

async fn server() -> NatsServer {
    let vars = BTreeMap::from([("DEVICELAB_NATS".to_owned(), "process".to_owned())]);
    let config = HarnessConfig::from_vars(vars).unwrap();
    NatsServer::start(&config, Ipv4Addr::LOCALHOST, &run_owner())
        .await
        .unwrap()
}

fn agent(nats: &NatsServer, device: &str) -> AgentConfig {
    AgentConfig {
        device_id: device.into(),
        nats_url: nats.client_url(),
        interval_ms: 50,
        subject_prefix: DEFAULT_SUBJECT_PREFIX.into(),
        nats_user: nats.credentials().map(|c| c.user.clone()),
        nats_password: nats.credentials().map(|c| c.password.clone()),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_without_the_run_credentials_can_publish_a_status() {
    let nats = server().await;
    let err = async_nats::connect(nats.client_url()).await.err();
    assert!(err.is_some(), "an anonymous client must be refused");
    let mut cfg = agent(&nats, "dev-x");
    cfg.nats_password = Some("wrong".into());
    let outcome = tokio::time::timeout(Duration::from_secs(3), run(&cfg, "b", Some(1))).await;
    assert!(
        !matches!(outcome, Ok(Ok(()))),
        "a wrong password must not get a report through"
    );
    let got = nats
        .status_log("dev-x")
        .wait_for(0, Duration::from_secs(1), |_| Verdict::Accept)
        .await;
    assert!(matches!(got, Err(NatsError::StatusTimeout { .. })));
}

#[tokio::test(flavor = "multi_thread")]
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

#[tokio::test(flavor = "multi_thread")]
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

#[tokio::test(flavor = "multi_thread")]
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
        msg.contains("dev-t") && msg.contains("boot b seq 2"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_waits_for_a_server_that_comes_up_later() {
    let nats = server().await;
    // Point the agent at a port where nothing listens yet, then start a server there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = agent(&nats, "dev-late");
    cfg.nats_url = format!("nats://127.0.0.1:{port}");
    let agent_task = tokio::spawn(async move { run(&cfg, "boot-late", Some(2)).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !agent_task.is_finished(),
        "the agent must keep trying, not give up"
    );
    let mut late = std::process::Command::new(
        devicelab::config::HarnessConfig::from_vars(BTreeMap::from([(
            "DEVICELAB_NATS".to_owned(),
            "process".to_owned(),
        )]))
        .map(|c| match c.nats {
            devicelab::config::NatsMode::Process { binary } => binary,
            _ => unreachable!(),
        })
        .unwrap(),
    )
    .args([
        "-a",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "--user",
        "devicelab",
    ])
    .args(["--pass", &nats.credentials().unwrap().password])
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    let result = tokio::time::timeout(Duration::from_secs(20), agent_task).await;
    let _ = late.kill();
    let _ = late.wait();
    result
        .expect("agent finished after the server came up")
        .unwrap()
        .unwrap();
}
