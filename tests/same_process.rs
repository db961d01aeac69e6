//! Two tests using the `vm` fixture in one test binary, as `cargo test` runs them: threads of
//! one process, each with a VM of its own. Their names differ (`Lab::vm_name` never gives one
//! twice), and with one VM slot (`DEVICELAB_VM_SLOTS=1`) the second test waits for the first
//! one's slot instead of going over the count (a slot is its test's own, not its process's).
//! Boots two VMs: `--features e2e`.

use devicelab::fixtures::*;
use std::sync::Mutex;
use std::time::Instant;

/// Each test's VM: its name (the request's: a warm clone's domain is its saved VM's, which
/// clones one after the other share), and when the test had it.
struct Seen {
    test: &'static str,
    name: String,
    from: Instant,
    until: Option<Instant>,
}

static SEEN: Mutex<Vec<Seen>> = Mutex::new(Vec::new());

async fn runs_alone(test: &'static str, vm: Vm) {
    let name = vm
        .run_dir()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    SEEN.lock().unwrap().push(Seen {
        test,
        name: name.clone(),
        from: Instant::now(),
        until: None,
    });
    // Long enough for the other test's VM to collide with this one, if it could.
    for _ in 0..5 {
        assert!(!vm.succeed("hostname").await.unwrap().trim().is_empty());
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    let until = Instant::now();
    vm.remove().await.unwrap();
    let mut seen = SEEN.lock().unwrap();
    seen.iter_mut()
        .filter(|s| s.test == test)
        .for_each(|s| s.until = Some(until));
    let mine = seen.iter().find(|s| s.test == test).unwrap();
    for other in seen.iter().filter(|s| s.test != test) {
        assert_ne!(other.name, name, "another test's VM had this VM's name");
        let one_slot = std::env::var("DEVICELAB_VM_SLOTS").as_deref() == Ok("1");
        // The test that ends second sees the other's whole time with its VM.
        if let (true, Some(other_until)) = (one_slot, other.until) {
            assert!(
                other_until <= mine.from || until <= other.from,
                "with one VM slot, the two tests' VMs ran at the same time"
            );
        }
    }
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
