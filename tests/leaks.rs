//! Nothing leaks: a trial's process killed mid-provisioning leaves a trail the next run reaps
//! (SIGKILL), or cleans up itself and exits non-zero (SIGTERM). Boots (the start of) a VM, so
//! it runs with `--features e2e`.

mod common;

use common::domain_running;

use devicelab::Readiness;
use devicelab::config::HarnessConfig;
use devicelab::host::libvirt::Libvirt;
use devicelab::model::spec::Start;
use devicelab::{Lab, VirtualMachineSpec, VmArchitecture};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn arch() -> VmArchitecture {
    HarnessConfig::from_env()
        .unwrap()
        .arch_filter
        .or_else(VmArchitecture::host)
        .unwrap()
}

/// Runs in a child process: provisions a VM and NATS, and never returns.
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[ignore = "helper for the leak tests"]
async fn helper_provision_and_hang() {
    let name = std::env::var("LEAK_VM_NAME").unwrap();
    let lab = Lab::from_env().await.unwrap();
    let _nats = lab.nats().await.unwrap();
    // Cold: the parent looks for a domain of this name while it provisions.
    let _vm = lab
        .vm(VirtualMachineSpec::new(name, arch()).with_start(devicelab::model::spec::Start::Cold))
        .await;
    std::future::pending::<()>().await;
}

/// Runs in a child process: provisions a VM to SSH, drops the handle on the runtime and
/// returns at once, so the process exits right behind the drop.
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[ignore = "helper for the leak tests"]
async fn helper_drop_and_exit() {
    let (_lab, vm) = helper_vm_to_ssh().await;
    drop(vm);
}

/// The helpers' VM: LEAK_VM_NAME, provisioned to SSH, or with LEAK_START=warm restored from a
/// saved VM (at "cloud-init done"). Prints its domain's name (a warm clone's is its saved VM's).
async fn helper_vm_to_ssh() -> (std::sync::Arc<Lab>, devicelab::Vm) {
    let name = std::env::var("LEAK_VM_NAME").unwrap();
    let lab = Lab::from_env().await.unwrap();
    let spec = VirtualMachineSpec::new(name, arch());
    let spec = if std::env::var("LEAK_START").as_deref() == Ok("warm") {
        spec.with_start(Start::Warm)
    } else {
        spec.ready_when(Readiness::SshLogin)
    };
    let vm = lab.vm(spec).await.unwrap();
    println!("domain {}", vm.name());
    (lab, vm)
}

/// Runs in a child process: provisions a VM to SSH (or restores it: LEAK_START=warm), prints
/// its domain and never returns.
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[ignore = "helper for the leak tests"]
async fn helper_vm_to_ssh_and_hang() {
    let (_lab, _vm) = helper_vm_to_ssh().await;
    std::future::pending::<()>().await;
}

/// Runs in a child process with DEVICELAB_KEEP=1: provisions a VM to SSH and a NATS server,
/// prints their names, drops both and exits.
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[ignore = "helper for the leak tests"]
async fn helper_keep_and_exit() {
    let (lab, vm) = helper_vm_to_ssh().await;
    assert!(lab.config.keep, "run with DEVICELAB_KEEP=1");
    // Left for a human: first boot finished (cloud-init restarts sshd on its way).
    vm.succeed("cloud-init status --wait >/dev/null; true")
        .await
        .unwrap();
    let nats = lab.nats().await.unwrap();
    println!(
        "kept-container {}",
        nats.container_name().expect("container mode")
    );
    println!(
        "kept-nats-dir {}",
        nats.config_path().parent().unwrap().display()
    );
    drop((vm, nats));
}

/// Runs in a child process: provisions a VM to SSH, then fails the way a user's test does.
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[ignore = "helper for the leak tests"]
async fn helper_panic_with_vm_up() {
    let (_lab, vm) = helper_vm_to_ssh().await;
    vm.succeed("echo devicelab-evidence-marker | sudo -n tee /dev/kmsg")
        .await
        .unwrap();
    // sshd goes away for 5 s right as the test fails, as when cloud-init restarts it mid first
    // boot: the evidence is still collected (the collection retries within its budget).
    vm.succeed(
        "sudo -n nohup sh -c 'systemctl stop ssh.service; sleep 5; systemctl start ssh.service' \
         >/dev/null 2>&1 &",
    )
    .await
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    panic!("the user's assertion failed");
}

/// Runs in a child process: registers a cleanup that takes a minute, then hangs.
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[ignore = "helper for the leak tests"]
async fn helper_slow_cleanup_and_hang() {
    let _guard =
        devicelab::host::reaper::on_interrupt(|| std::thread::sleep(Duration::from_secs(60)));
    eprintln!("helper: cleanup registered");
    std::future::pending::<()>().await;
}

/// Runs in a child process: a teardown already running in the background that takes a minute
/// (an artifact collection from a guest that stopped answering), then hangs.
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[ignore = "helper for the leak tests"]
async fn helper_slow_teardown_and_hang() {
    let _guard = devicelab::host::reaper::on_interrupt(|| {});
    devicelab::support::background::in_background("slow".into(), || {
        std::thread::sleep(Duration::from_secs(60))
    });
    eprintln!("helper: cleanup registered");
    std::future::pending::<()>().await;
}

fn spawn_helper(name: &str) -> Child {
    spawn("helper_provision_and_hang", name)
}

/// The domain a helper printed (`domain <name>`).
fn domain_printed(stdout: &[u8]) -> Option<String> {
    String::from_utf8_lossy(stdout)
        .lines()
        .find_map(|l| l.strip_prefix("domain "))
        .map(|d| d.trim().to_owned())
}

/// This binary, to run `helper` alone with LEAK_VM_NAME=`name`.
fn helper(helper: &str, name: &str) -> Command {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args(["--exact", helper, "--include-ignored", "--nocapture"])
        .env("LEAK_VM_NAME", name);
    command
}

fn spawn(name_of_helper: &str, name: &str) -> Child {
    helper(name_of_helper, name)
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

fn libvirt() -> Libvirt {
    Libvirt::open(&HarnessConfig::from_env().unwrap().libvirt_uri).unwrap()
}

fn domain_exists(lv: &Libvirt, name: &str) -> bool {
    lv.domain(name).is_ok()
}

fn containers_of(pid: u32) -> Vec<String> {
    let podman = HarnessConfig::from_env().unwrap().podman;
    let out = Command::new(podman)
        .args([
            "ps",
            "-a",
            "--filter",
            &format!("label=devicelab.pid={pid}"),
            "--format",
            "{{.Names}}",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn volumes_of(name: &str) -> Vec<String> {
    let dir = HarnessConfig::from_env().unwrap().pool_dir();
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|f| f.starts_with(name))
        .collect()
}

/// Waits until the helper's VM runs and its NATS container exists.
fn wait_until_provisioning(lv: &Libvirt, name: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !domain_running(lv, name) || containers_of(child.id()).is_empty() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the helper exited early"
        );
        assert!(Instant::now() < deadline, "the helper never started its VM");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn run_dir(name: &str) -> std::path::PathBuf {
    HarnessConfig::from_env().unwrap().runs_dir().join(name)
}

fn unique(what: &str) -> String {
    format!(
        "devicelab-leak-{what}-{}",
        hex::encode(rand::random::<[u8; 3]>())
    )
}

#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[cfg_attr(not(feature = "e2e"), ignore = "boots a VM: run with --features e2e")]
async fn a_killed_run_is_reaped_by_the_next_one() {
    let lv = libvirt();
    let name = unique("kill");
    let mut child = spawn_helper(&name);
    let pid = child.id();
    wait_until_provisioning(&lv, &name, &mut child);
    child.kill().unwrap(); // SIGKILL: no handler runs
    child.wait().unwrap();
    assert!(
        domain_exists(&lv, &name),
        "the killed run left its VM (the leak the reaper is for)"
    );
    assert!(!containers_of(pid).is_empty());

    let _next_run = Lab::from_env().await.unwrap();
    assert!(!domain_exists(&lv, &name), "the next run reaped the domain");
    assert_eq!(volumes_of(&name), Vec::<String>::new(), "and its volumes");
    assert_eq!(
        containers_of(pid),
        Vec::<String>::new(),
        "and its NATS container"
    );
    assert!(!run_dir(&name).exists(), "and its run dir");
    assert_eq!(nats_dirs_of(pid), Vec::<String>::new(), "and its NATS dir");
}

/// A warm clone's run killed (SIGKILL: the next run reaps it) or interrupted (Ctrl-C: it
/// cleans up itself): the clone's domain, volumes and run dir go, and the saved VM it was
/// restored from stays, free for the next clone.
#[rstest::rstest]
#[case::killed(libc::SIGKILL)]
#[case::ctrl_c(libc::SIGINT)]
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[cfg_attr(not(feature = "e2e"), ignore = "boots a VM: run with --features e2e")]
async fn a_warm_clone_killed_or_interrupted_leaves_its_saved_vm(#[case] signal: i32) {
    let lv = libvirt();
    let name = unique("warmkill");
    let mut child = helper("helper_vm_to_ssh_and_hang", &name)
        .env("LEAK_START", "warm")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Its domain, once it is up (a first warm start on this host builds the saved VM first).
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let domain = std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| domain_printed(l.as_bytes()));
        let _ = tx.send(domain);
    });
    let domain = rx
        .recv_timeout(Duration::from_secs(600))
        .expect("the helper names its domain within 10 min")
        .expect("the helper printed its domain before it ended");
    let config = HarnessConfig::from_env().unwrap();
    let saved = config.warm_dir().join(&domain);
    let clone_lock = config.warm_dir().join(format!("{domain}.lock"));
    assert!(domain_running(&lv, &domain), "the clone runs: {domain}");

    unsafe { libc::kill(pid as i32, signal) };
    let status = child.wait().unwrap();
    if signal == libc::SIGKILL {
        assert!(
            domain_exists(&lv, &domain),
            "the killed run left its clone (the leak the reaper is for)"
        );
        let _next_run = Lab::from_env().await.unwrap();
    } else {
        assert_eq!(status.code(), Some(130), "interrupted runs exit non-zero");
    }
    assert!(!domain_exists(&lv, &domain), "the clone's domain is gone");
    assert_eq!(volumes_of(&domain), Vec::<String>::new(), "and its volumes");
    assert!(!run_dir(&name).exists(), "and its run dir");
    assert_eq!(containers_of(pid), Vec::<String>::new());
    assert!(
        saved.join("saved.json").is_file(),
        "the saved VM stays: {}",
        saved.display()
    );
    // Free for the next clone: not held, or already taken by another test's clone beside this
    // one (the lock file then names that one).
    let holder = devicelab::support::lock::holder_of(&clone_lock);
    assert!(
        !devicelab::support::lock::is_held(&clone_lock)
            || !holder.ends_with(&format!("(pid {pid})")),
        "and is free for the next clone: {holder}"
    );
}

/// The NATS server directories (configuration, store) a process left in the temp dir.
fn nats_dirs_of(pid: u32) -> Vec<String> {
    let prefix = format!("devicelab-nats-{pid}-");
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

/// Interrupts a provisioning run with `signal`: it must clean up and exit with `code`.
fn interrupt_cleans_up(signal: i32, code: i32) {
    let lv = libvirt();
    let name = unique(if signal == libc::SIGINT {
        "int"
    } else {
        "term"
    });
    let mut child = spawn_helper(&name);
    let pid = child.id();
    wait_until_provisioning(&lv, &name, &mut child);
    unsafe { libc::kill(pid as i32, signal) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(code), "interrupted runs exit non-zero");
    assert!(!domain_exists(&lv, &name));
    assert_eq!(volumes_of(&name), Vec::<String>::new());
    assert_eq!(containers_of(pid), Vec::<String>::new());
    assert!(!run_dir(&name).exists());
    assert_eq!(
        nats_dirs_of(pid),
        Vec::<String>::new(),
        "the NATS dir goes too"
    );
}

#[test]
#[cfg_attr(not(feature = "e2e"), ignore = "boots a VM: run with --features e2e")]
fn sigterm_cleans_up_and_exits_non_zero() {
    interrupt_cleans_up(libc::SIGTERM, 143);
}

#[test]
#[cfg_attr(not(feature = "e2e"), ignore = "boots a VM: run with --features e2e")]
fn ctrl_c_cleans_up_and_exits_non_zero() {
    interrupt_cleans_up(libc::SIGINT, 130);
}

/// A handle dropped on a runtime worker hands its teardown to a thread of its own (the drop
/// never blocks the runtime); a process that exits right after still removes the VM, since
/// those threads are joined at exit.
#[test]
#[cfg_attr(not(feature = "e2e"), ignore = "boots a VM: run with --features e2e")]
fn a_vm_dropped_just_before_exit_is_still_removed() {
    let lv = libvirt();
    let name = unique("exit");
    let status = spawn("helper_drop_and_exit", &name).wait().unwrap();
    assert!(status.success(), "the helper passed");
    assert!(!domain_exists(&lv, &name), "the domain is gone");
    assert_eq!(volumes_of(&name), Vec::<String>::new(), "its volumes too");
    assert!(!run_dir(&name).exists(), "and its run dir");
}

/// A second Ctrl-C while the cleanups run exits at once instead of being swallowed: a slow
/// registered cleanup, and a slow teardown already running in the background (which the exit
/// would otherwise wait for).
#[rstest::rstest]
#[case::slow_cleanup("helper_slow_cleanup_and_hang")]
#[case::pending_teardown("helper_slow_teardown_and_hang")]
fn a_second_ctrl_c_exits_at_once(#[case] helper: &str) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", helper, "--include-ignored", "--nocapture"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the helper's line: its cleanup (and so the signal handler) is in place.
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("cleanup registered") {
        line.clear();
        assert!(
            std::io::BufRead::read_line(&mut stderr, &mut line).unwrap() > 0,
            "the helper exited early"
        );
    }
    let pid = child.id() as i32;
    unsafe { libc::kill(pid, libc::SIGINT) };
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    unsafe { libc::kill(pid, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the second Ctrl-C ended the 60 s cleanup ({:?})",
        started.elapsed()
    );
}

/// DEVICELAB_KEEP=1: the VM and the NATS container outlive their handles, and the next run's
/// reaper leaves them alone even though the run that made them is gone (the owner record says
/// kept; the container carries `devicelab.kept=1`; the NATS dir holds the kept mark). Then a
/// human's tools: `devicelab ls` lists them with the ssh command, `devicelab ssh` logs in,
/// and `devicelab clean` removes all three.
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[cfg_attr(not(feature = "e2e"), ignore = "boots a VM: run with --features e2e")]
async fn kept_vm_and_nats_survive_their_run_and_the_next_reaper() {
    let lv = libvirt();
    let name = unique("keep");
    let out = helper("helper_keep_and_exit", &name)
        .env("DEVICELAB_KEEP", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let value = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_owned())
    };
    let (container, nats_dir) = (value("kept-container "), value("kept-nats-dir "));
    // The run is over: its pid is gone, so only the kept marks stand between its leftovers
    // and the reaper.
    let next = Lab::from_env().await.unwrap();
    let vm_running = domain_running(&lv, &name);
    let podman = HarnessConfig::from_env().unwrap().podman;
    let container_running = container.as_deref().is_some_and(|c| {
        let o = Command::new(&podman)
            .args(["container", "inspect", "--format", "{{.State.Running}}", c])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim() == "true"
    });
    let dir_kept = nats_dir
        .as_deref()
        .is_some_and(|d| std::path::Path::new(d).exists());

    // A human's view of it (`devicelab ls`, `devicelab ssh`), then `devicelab clean` removes
    // what was kept, and only that.
    let cli = |args: &[&str]| {
        let o = Command::new(common::devicelab_cli())
            .args(args)
            .output()
            .unwrap();
        let text =
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        (o.status.success(), text)
    };
    let (_, listed) = cli(&["ls"]);
    let (ssh_ok, hostname) = cli(&["ssh", &name, "hostname"]);
    let (clean_ok, cleaned) = cli(&["clean"]);
    let vm_gone = !domain_exists(&lv, &name) && !run_dir(&name).exists();
    let container_gone = container.as_deref().is_some_and(|c| {
        !Command::new(&podman)
            .args(["container", "exists", c])
            .status()
            .unwrap()
            .success()
    });
    let nats_dir_gone = nats_dir
        .as_deref()
        .is_some_and(|d| !std::path::Path::new(d).exists());
    // Whatever the CLI did not remove, so the test leaves nothing behind.
    let errors = devicelab::host::reaper::remove_vm(&lv, &next.pool, &name);
    let _ = std::fs::remove_dir_all(run_dir(&name));
    if let Some(c) = &container {
        let _ = Command::new(&podman)
            .args(["rm", "-f", "-t", "0", c])
            .output();
    }
    if let Some(d) = &nats_dir {
        let _ = std::fs::remove_dir_all(d);
    }
    assert!(
        listed.contains(&format!("VM {name} (running): kept"))
            && listed.contains("ssh: ssh -i ")
            && container.as_deref().is_some_and(|c| listed.contains(c)),
        "devicelab ls shows the kept VM, how to log in, and the container:\n{listed}"
    );
    assert!(
        ssh_ok && hostname.contains(&name),
        "devicelab ssh {name} hostname: {hostname}"
    );
    assert!(clean_ok, "{cleaned}");
    assert!(
        vm_gone,
        "devicelab clean removed the kept VM and its run dir:\n{cleaned}"
    );
    assert!(container_gone, "and the kept container:\n{cleaned}");
    assert!(nats_dir_gone, "and the kept NATS dir:\n{cleaned}");
    assert!(
        out.status.success(),
        "the helper passed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(errors.is_empty(), "{errors:?}");
    assert!(vm_running, "the kept VM still runs, unreaped");
    assert!(
        container_running,
        "the kept NATS container still runs, unreaped"
    );
    assert!(
        dir_kept,
        "the kept NATS dir (configuration, store) is still there"
    );
}

/// A user's own test that panics with its VM up keeps the evidence, as a failed trial does: the
/// guest's journal and cloud-init logs are read before the VM goes, and the run dir stays.
/// Cold and warm alike: a warm clone's evidence is its own (its run dir is its request's, not
/// the saved VM's that every clone shares).
#[rstest::rstest]
#[case::cold("cold")]
#[case::warm("warm")]
#[cfg_attr(not(feature = "e2e"), ignore = "boots a VM: run with --features e2e")]
fn a_test_that_panics_with_its_vm_up_keeps_the_evidence(#[case] start: &str) {
    let lv = libvirt();
    let name = unique("panic");
    let out = helper("helper_panic_with_vm_up", &name)
        .env("LEAK_START", start)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let domain = domain_printed(&out.stdout).unwrap_or_else(|| name.clone());
    let dir = run_dir(&name);
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    let (journal, status, serial) = (
        read("journal.txt"),
        read("cloud-init-status.txt"),
        read("serial.log"),
    );
    let gone = !domain_exists(&lv, &domain) && volumes_of(&domain).is_empty();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success(), "the helper's test failed");
    assert!(
        stderr.contains(&format!("what explains it is kept in {}", dir.display())),
        "the failure names the directory: {stderr}"
    );
    assert!(
        journal.contains("devicelab-evidence-marker"),
        "this boot's journal: {journal}"
    );
    assert!(status.contains("status:"), "cloud-init's status: {status}");
    assert!(serial.contains("Linux version"), "the console");
    assert!(gone, "the VM itself is removed");
}

/// A kept warm clone (DEVICELAB_KEEP=1) outlives its run, and the next warm start of the same
/// kind neither restores into it nor deletes its saved VM: it takes another saved VM, and the
/// kept clone keeps running with its run dir and owner record untouched until `devicelab
/// clean`. Each clone has a run dir of its own (its request's name).
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[cfg_attr(not(feature = "e2e"), ignore = "boots a VM: run with --features e2e")]
async fn a_kept_warm_clone_survives_the_next_warm_start() {
    let lv = libvirt();
    let kept_name = unique("keepwarm");
    let out = helper("helper_drop_and_exit", &kept_name)
        .env("LEAK_START", "warm")
        .env("DEVICELAB_KEEP", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the helper passed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kept = domain_printed(&out.stdout).expect("the helper names its domain");
    let record = |name: &str| std::fs::read_to_string(run_dir(name).join("owner.json")).ok();
    let kept_record = record(&kept_name);

    let lab = Lab::from_env().await.unwrap(); // its reaper runs, too
    let next_name = unique("nextwarm");
    let next = lab
        .vm(VirtualMachineSpec::new(&next_name, arch()).with_start(Start::Warm))
        .await;
    let next_domain = next
        .as_ref()
        .map(|vm| vm.name().to_owned())
        .map_err(|e| e.to_string());
    let next_works = match &next {
        Ok(vm) => vm
            .succeed("true")
            .await
            .map(drop)
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let both_run_dirs = run_dir(&kept_name).is_dir() && run_dir(&next_name).is_dir();
    let kept_running_beside = domain_running(&lv, &kept);
    if let Ok(vm) = next {
        vm.remove().await.unwrap();
    }
    let kept_running_after = domain_running(&lv, &kept);
    let record_after = record(&kept_name);
    let listed = Command::new(common::devicelab_cli())
        .arg("ls")
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();

    let cleaned = Command::new(common::devicelab_cli())
        .arg("clean")
        .output()
        .unwrap();
    let kept_gone = !domain_exists(&lv, &kept) && !run_dir(&kept_name).exists();
    // Whatever the CLI did not remove, so the test leaves nothing behind.
    let errors = devicelab::host::reaper::remove_vm(&lv, &lab.pool, &kept);
    let _ = std::fs::remove_dir_all(run_dir(&kept_name));

    assert!(kept.starts_with("devicelab-warm-"), "a warm clone: {kept}");
    assert!(
        listed.contains(&format!("VM {kept} (running, request {kept_name}): kept")),
        "`devicelab ls` names the clone's request: {listed}"
    );
    assert!(
        next_works.is_ok(),
        "the next warm start works: {next_works:?}"
    );
    assert_ne!(
        next_domain.as_deref().ok(),
        Some(kept.as_str()),
        "the next warm start took another saved VM"
    );
    assert!(both_run_dirs, "each clone has a run dir of its own");
    assert!(
        kept_running_beside && kept_running_after,
        "the kept clone still runs"
    );
    assert!(
        kept_record.is_some() && record_after == kept_record,
        "its owner record is untouched: {kept_record:?} then {record_after:?}"
    );
    assert!(
        cleaned.status.success() && kept_gone,
        "devicelab clean removes it: {}",
        String::from_utf8_lossy(&cleaned.stdout)
    );
    assert!(errors.is_empty(), "{errors:?}");
}

/// A partition is a network filter on the VM's own interface: in place once partitioned, in
/// the domain's definition too (so it outlasts a power cycle, as a network's partition does),
/// healed even while the device is off, and gone with the VM: libvirt leaves no binding of it
/// on the host once the VM's domain is removed (by its teardown, or by the reaper of a killed
/// run, which removes the same way).
#[test_log::test(tokio::test(flavor = "multi_thread"))]
#[cfg_attr(not(feature = "e2e"), ignore = "boots a VM: run with --features e2e")]
async fn a_partition_goes_with_heal_and_with_its_vm() {
    use devicelab::host::libvirt::PARTITION_FILTER;
    let lab = Lab::from_env().await.unwrap();
    let arch = arch();
    let vm = lab
        .vm(VirtualMachineSpec::new(lab.vm_name("part", arch), arch).with_start(Start::Warm))
        .await
        .unwrap();
    // The domain's name (a warm clone's domain has its saved VM's).
    let name = vm.name().to_owned();
    let virsh = |args: &[&str]| {
        let out = Command::new("virsh")
            .args(["-q", "-c", &lab.config.libvirt_uri])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "virsh {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The VM's port on the host, and whether a binding of the partition's filter is on it.
    let port = virsh(&["domiflist", &name])
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let bound = |port: &str| {
        virsh(&["nwfilter-binding-list"])
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == [port, PARTITION_FILTER])
    };
    assert!(!bound(&port) && !vm.is_partitioned().await.unwrap());

    vm.partition().await.unwrap();
    vm.partition().await.unwrap(); // idempotent
    assert!(vm.is_partitioned().await.unwrap() && bound(&port));
    let defined = virsh(&["dumpxml", "--inactive", &name]);
    assert!(
        defined.contains(PARTITION_FILTER),
        "not in the definition: {defined}"
    );
    // A power cycle keeps it: the domain starts with the filter on its new port.
    vm.power_off().await.unwrap();
    assert!(!bound(&port), "a stopped domain keeps no binding");
    vm.power_on().await.unwrap();
    let port = virsh(&["domiflist", &name])
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    assert!(vm.is_partitioned().await.unwrap() && bound(&port));

    vm.heal().await.unwrap();
    assert!(!vm.is_partitioned().await.unwrap() && !bound(&port));
    assert!(!virsh(&["dumpxml", "--inactive", &name]).contains(PARTITION_FILTER));

    // Partitioned, then healed while off: it comes back on whole.
    vm.partition().await.unwrap();
    vm.power_off().await.unwrap();
    vm.heal().await.unwrap();
    vm.power_on().await.unwrap();
    assert!(!vm.is_partitioned().await.unwrap());

    vm.partition().await.unwrap();
    vm.remove().await.unwrap();
    assert!(!bound(&port), "the VM's removal took its partition with it");
}
