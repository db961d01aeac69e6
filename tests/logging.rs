//! The harness's log is captured per test and shown with that test's failure, and RUST_LOG
//! still filters it: this binary runs its own `a_failing_test_that_logs` as a child (plain
//! libtest, output captured), which logs through the harness and fails.

use std::process::Command;

/// The child: reads its configuration from an environment with a variable the harness does
/// not know (the harness warns about it), then fails.
#[test_log::test]
#[ignore = "helper: the tests below run it as their child"]
fn a_failing_test_that_logs() {
    devicelab::config::HarnessConfig::from_env().unwrap();
    panic!("the child fails on purpose");
}

/// Runs the child with `RUST_LOG` set to `filter`; its whole output.
fn child(filter: &str) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_failing_test_that_logs",
            "--include-ignored",
            "--test-threads",
            "1",
        ])
        .env("DEVICELAB_NO_SUCH_SETTING", "1")
        .env("RUST_LOG", filter)
        .output()
        .unwrap();
    assert!(!out.status.success(), "the child fails");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 failed"),
        "the child ran"
    );
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn the_harness_log_is_captured_with_the_failing_test() {
    let out = child("devicelab=info");
    let section = out
        .split("---- a_failing_test_that_logs stdout ----")
        .nth(1)
        .unwrap_or_else(|| panic!("no captured output section: {out}"));
    assert!(
        section.contains("DEVICELAB_NO_SUCH_SETTING") && section.contains("WARN"),
        "the harness's warning is in the failing test's captured output: {out}"
    );
    assert!(
        !out.split("---- a_failing_test_that_logs stdout ----")
            .next()
            .unwrap()
            .contains("DEVICELAB_NO_SUCH_SETTING"),
        "and nowhere else: {out}"
    );
}

#[test]
fn rust_log_still_filters_the_harness_log() {
    let out = child("devicelab=error");
    assert!(out.contains("the child fails on purpose"), "{out}");
    assert!(!out.contains("DEVICELAB_NO_SUCH_SETTING"), "{out}");
}
