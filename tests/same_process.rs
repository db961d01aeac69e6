//! Two tests using the `vm` fixture in one test binary, as `cargo test` runs them: threads of
//! one process, each with a VM of its own. Their names differ (`Lab::vm_name` never gives one
//! twice), and the second waits for a VM slot instead of going over the host's count (a slot
//! is its test's own, not its process's). Boots two VMs: `--features e2e`.

use devicelab::fixtures::*;
use std::sync::Mutex;

/// The VMs these tests ran, by test.
static SEEN: Mutex<Vec<(&str, String)>> = Mutex::new(Vec::new());

async fn runs_alone(test: &'static str, vm: Vm) {
    let name = vm.name().to_owned();
    SEEN.lock().unwrap().push((test, name.clone()));
    // Long enough for the other test's VM to collide with this one, if it could.
    for _ in 0..5 {
        let hostname = vm.succeed("hostname").await.unwrap();
        assert!(!hostname.trim().is_empty());
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    let seen = SEEN.lock().unwrap().clone();
    let others: Vec<_> = seen.iter().filter(|(t, _)| *t != test).collect();
    assert!(
        others.iter().all(|(_, n)| *n != name),
        "another test's VM had this VM's name {name}: {seen:?}"
    );
    vm.remove().await.unwrap();
}

#[rstest]
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[cfg_attr(not(feature = "e2e"), ignore = "boots a VM: run with --features e2e")]
async fn first_test_with_a_vm(#[future] vm: Vm) {
    runs_alone("first", vm.await).await;
}

#[rstest]
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[cfg_attr(not(feature = "e2e"), ignore = "boots a VM: run with --features e2e")]
async fn second_test_with_a_vm(#[future] vm: Vm) {
    runs_alone("second", vm.await).await;
}
