//! One NATS identity per device, against a real nats-server: each device logs in as its own
//! user, allowed only what its agent's description implies. The reference agent works under
//! it (reports, desired state, commands); the same credentials cannot publish a report as
//! another device, read another device's desired state, or listen to another's replies or
//! reports: the server refuses each, and nothing lands.

mod common;

use devicelab::VmArchitecture;
use devicelab::description::TemplateValues;
use devicelab::nats::{NatsError, NatsServer, Verdict};
use devicelab::reference;
use devicelab::trials::ControlPlane;
use devicelab::trials::scenario::device_values;
use devicelab_agent::{ApplyMode, CommandReply, Status};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const BUDGET: Duration = Duration::from_secs(20);

async fn values(nats: &NatsServer, device: &str) -> TemplateValues {
    device_values(nats, &reference::agent(), device, VmArchitecture::X86_64)
        .await
        .unwrap()
}

/// A client logged in as `values`' user, and the server's errors it was sent.
async fn client_as(values: &TemplateValues) -> (async_nats::Client, Arc<Mutex<Vec<String>>>) {
    let errors = Arc::new(Mutex::new(Vec::new()));
    let seen = errors.clone();
    let client = async_nats::ConnectOptions::with_user_and_password(
        values.nats_user.clone(),
        values.nats_password.clone(),
    )
    .custom_inbox_prefix(devicelab::description::inbox_prefix(&values.device_id))
    .event_callback(move |event| {
        let seen = seen.clone();
        async move {
            if let async_nats::Event::ServerError(e) = event {
                seen.lock().unwrap().push(e.to_string());
            }
        }
    })
    .connect(&values.nats_url)
    .await
    .unwrap();
    (client, errors)
}

/// Waits for the server to refuse `what` (its error names the subject).
async fn refused(errors: &Mutex<Vec<String>>, what: &str, subject: &str) {
    devicelab::support::probe::poll(BUDGET, || async {
        let errors = errors.lock().unwrap();
        let found = errors.iter().any(|e| {
            let lower = e.to_lowercase();
            lower.contains("permissions violation") && lower.contains(what) && e.contains(subject)
        });
        if found {
            Ok(())
        } else {
            Err(format!("its errors: {errors:?}"))
        }
    })
    .await
    .unwrap_or_else(|last| panic!("the server never refused {what} {subject}; {last}"));
}

#[test_log::test(tokio::test(flavor = "multi_thread"))]
async fn a_device_can_neither_report_as_another_nor_read_anothers_desired_state() {
    let nats = common::nats_process_server().await;
    let (a, b) = (values(&nats, "dev-a").await, values(&nats, "dev-b").await);
    assert_ne!(a.nats_user, b.nats_user);
    assert_ne!(
        a.nats_user,
        nats.credentials().unwrap().user,
        "a device logs in as itself, not as the harness"
    );
    let agent = reference::agent();
    let plane_a = ControlPlane::for_device(&nats, &agent, &a).await.unwrap();
    let plane_b = ControlPlane::for_device(&nats, &agent, &b).await.unwrap();
    plane_b.desire(7, "b's secret").await.unwrap();

    // Under its own user the reference agent does all it needs: reports, reads and applies
    // its desired state, answers a command.
    let dir = tempfile::tempdir().unwrap();
    let mut config = reference::config_applying(&a, ApplyMode::Careful);
    config.interval_ms = 100;
    config.control.as_mut().unwrap().state_path = dir.path().join("state");
    let running = tokio::spawn(async move {
        devicelab_agent::run(&config, "boot-a", None).await.unwrap();
    });
    plane_a.desire(1, "a's own").await.unwrap();
    plane_a.converged(1, BUDGET).await.unwrap();
    let reply = plane_a.command(b"status", BUDGET).await.unwrap();
    match serde_json::from_slice::<CommandReply>(&reply).unwrap() {
        CommandReply::Status(s) => assert_eq!(s.device_id, "dev-a"),
        other => panic!("the status command answered {other:?}"),
    }

    let (client, errors) = client_as(&a).await;
    // a's credentials publishing a report that claims to be b's, on b's subject.
    let b_subject = format!("{}.dev-b", devicelab_agent::DEFAULT_SUBJECT_PREFIX);
    let forged = Status {
        device_id: "dev-b".into(),
        boot_id: "forged".into(),
        seq: 1,
        timestamp_ms: devicelab_agent::now_ms(),
        applied: None,
        applying: None,
        version: None,
    };
    client
        .publish(
            b_subject.clone(),
            serde_json::to_vec(&forged).unwrap().into(),
        )
        .await
        .unwrap();
    client.flush().await.unwrap();
    refused(&errors, "publish", &b_subject).await;

    // a's credentials reading b's desired state: a direct get of b's key.
    let bucket = reference::DESIRED_BUCKET;
    let of = |device: &str| format!("$JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}.{device}");
    let theirs = tokio::time::timeout(
        Duration::from_secs(2),
        client.request(of("dev-b"), "".into()),
    )
    .await;
    assert!(
        !matches!(&theirs, Ok(Ok(m)) if !m.payload.is_empty()),
        "dev-a read dev-b's desired state: {theirs:?}"
    );
    refused(&errors, "publish", &of("dev-b")).await;
    // The same request for its own key is answered: the refusal above is about whose key.
    let own = client.request(of("dev-a"), "".into()).await.unwrap();
    assert!(
        String::from_utf8_lossy(&own.payload).contains("a's own"),
        "{own:?}"
    );

    // Nor can it listen: to b's replies or to every device's reports.
    for subject in ["_INBOX.dev-b.>", "devicelab.status.>"] {
        let _sub = client.subscribe(subject).await.unwrap();
        client.flush().await.unwrap();
        refused(&errors, "subscription", subject).await;
    }

    // Nothing forged landed: b's log holds no report at all (b never ran). The refusals
    // above came after the server handled each message, so a short look is a full one.
    let stored = plane_b
        .reports()
        .wait_for(0, Duration::from_millis(500), |_| Verdict::Accept)
        .await;
    assert!(
        matches!(stored, Err(NatsError::StatusTimeout { .. })),
        "{stored:?}"
    );
    running.abort();
}

#[test_log::test(tokio::test(flavor = "multi_thread"))]
async fn a_device_keeps_its_credentials_and_the_harness_name_is_refused() {
    let nats = common::nats_process_server().await;
    let first = values(&nats, "dev-same").await;
    let again = values(&nats, "dev-same").await;
    assert_eq!(first, again, "asked twice, one device keeps one user");
    let harness = nats.credentials().unwrap().user.clone();
    let err = nats
        .identify(vec![(harness.clone(), Default::default())])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&harness) && err.contains("another id"),
        "{err}"
    );
}
