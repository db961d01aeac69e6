//! Bad input: each case fails with a clear error that names the fix, and leaves caches clean.
//! (More cases live beside the code they exercise: image_cache.rs, firmware.rs,
//! agent_binary.rs, keys_and_seed.rs, config.rs; docs/troubleshooting.md lists them all.)

mod common;

use common::{HttpServer, Route, files_in, sha256_hex, system_libvirt};
use devicelab::VmArchitecture;
use devicelab::config::HarnessConfig;
use devicelab::host::libvirt::{Libvirt, LibvirtError};
use devicelab::image::download::{Artifact, fetch};
use devicelab::image::source::{ImageError, ImageSource};
use devicelab::lab::run_owner;
use devicelab::nats::{NatsError, NatsServer};
use std::net::Ipv4Addr;

fn config(pairs: &[(&str, &str)]) -> HarnessConfig {
    HarnessConfig::from_vars(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
    .unwrap()
}

fn assert_mentions(err: &dyn std::fmt::Display, needles: &[&str]) {
    let msg = err.to_string();
    for n in needles {
        assert!(msg.contains(n), "{n:?} missing from: {msg}");
    }
}

#[test]
fn unknown_libvirt_network_lists_the_real_ones() {
    let lv = system_libvirt();
    let err = lv.network_gateway("devicelab-no-such-network").unwrap_err();
    assert!(matches!(err, LibvirtError::NoSuchNetwork { .. }));
    assert_mentions(
        &err,
        &["devicelab-no-such-network", "DEVICELAB_NETWORK", "default"],
    );
}

/// A network the VMs could join but that has no IPv4 address (an isolated bridge, created
/// transient here and destroyed again): refused, naming both ways out.
#[test]
fn a_network_without_ipv4_is_refused_naming_the_fix() {
    let lv = system_libvirt();
    let id = std::process::id();
    let name = format!("devicelab-noip-{id}");
    let xml = format!(
        "<network><name>{name}</name><bridge name='dlnoip{}'/></network>",
        id % 100_000
    );
    let net = lv.conn().unwrap().create_network_xml(&xml).unwrap();
    let err = lv.network_gateway(&name);
    net.destroy().unwrap();
    let err = err.unwrap_err();
    assert!(
        matches!(err, LibvirtError::NetworkWithoutIpv4 { .. }),
        "{err}"
    );
    assert_mentions(&err, &[&name, "no IPv4", "net-edit", "DEVICELAB_NETWORK"]);
}

/// The pool of another data dir is already defined: refused, naming both ways out, and
/// nothing is made at the path asked for.
#[test]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "defines devicelab's libvirt pool if it is not there: run with --features e2e"
)]
fn a_pool_defined_at_another_path_is_refused_naming_the_fix() {
    use devicelab::host::pool::{Pool, PoolError};
    let lv = system_libvirt();
    let config = HarnessConfig::from_env().unwrap();
    // The pool as every run defines it, under the lock every run takes for it.
    let _setup = devicelab::lab::pool_setup_lock(&config).unwrap();
    Pool::ensure(&lv, &config.pool_dir()).unwrap();
    let elsewhere =
        std::env::temp_dir().join(format!("devicelab-other-pool-{}", std::process::id()));
    let Err(err) = Pool::ensure(&lv, &elsewhere) else {
        panic!("a second pool path was accepted");
    };
    assert!(matches!(err, PoolError::PathMismatch { .. }), "{err}");
    assert_mentions(
        &err,
        &[
            &config.pool_dir().display().to_string(),
            &elsewhere.display().to_string(),
            "DEVICELAB_DATA_DIR",
            "virsh pool-undefine",
        ],
    );
    assert!(!elsewhere.exists(), "nothing was made there");
}

#[test]
fn libvirtd_not_running_says_how_to_start_it() {
    let err = Libvirt::open("qemu:///system?socket=/nonexistent/libvirt-sock")
        .err()
        .unwrap();
    assert!(matches!(err, LibvirtError::Connect { .. }));
    assert_mentions(
        &err,
        &[
            "is libvirtd running?",
            "systemctl start libvirtd",
            "setup.sh",
        ],
    );
}

#[test_log::test(tokio::test)]
async fn podman_missing_offers_the_process_mode() {
    let c = config(&[("DEVICELAB_PODMAN", "/nonexistent/podman")]);
    let err = NatsServer::start(&c, Ipv4Addr::LOCALHOST, &run_owner())
        .await
        .err()
        .unwrap();
    assert!(matches!(err, NatsError::Missing { .. }));
    assert_mentions(
        &err,
        &[
            "/nonexistent/podman",
            "install podman",
            "DEVICELAB_NATS=process",
        ],
    );
}

#[test_log::test(tokio::test)]
async fn nats_server_missing_names_the_variable() {
    let c = config(&[
        ("DEVICELAB_NATS", "process"),
        ("DEVICELAB_NATS_SERVER", "/nonexistent/nats-server"),
    ]);
    let err = NatsServer::start(&c, Ipv4Addr::LOCALHOST, &run_owner())
        .await
        .err()
        .unwrap();
    assert_mentions(&err, &["/nonexistent/nats-server", "DEVICELAB_NATS_SERVER"]);
}

#[test_log::test(tokio::test)]
async fn a_nats_server_that_dies_at_start_is_reported_at_once_with_its_output() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("nats-server");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho \"nats-server: cannot listen: $*\" >&2\nexit 3\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let c = config(&[
        ("DEVICELAB_NATS", "process"),
        ("DEVICELAB_NATS_SERVER", fake.to_str().unwrap()),
    ]);
    let started = std::time::Instant::now();
    let err = NatsServer::start(&c, Ipv4Addr::LOCALHOST, &run_owner())
        .await
        .err()
        .unwrap();
    assert!(matches!(err, NatsError::Exited { .. }), "{err}");
    assert_mentions(&err, &["exit status: 3", "nats-server: cannot listen: -c"]);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "not after the start budget"
    );
}

#[test_log::test(tokio::test)]
async fn a_missing_nats_image_names_the_ways_out() {
    let c = config(&[(
        "DEVICELAB_NATS_IMAGE",
        "localhost/devicelab-no-such-image:0",
    )]);
    let err = NatsServer::start(&c, Ipv4Addr::LOCALHOST, &run_owner())
        .await
        .err()
        .unwrap();
    assert!(matches!(err, NatsError::ContainerStart { .. }), "{err}");
    assert_mentions(
        &err,
        &[
            "localhost/devicelab-no-such-image:0",
            "DEVICELAB_NATS_IMAGE",
            "build-image.sh",
        ],
    );
}

#[test_log::test(tokio::test)]
async fn an_unreadable_image_override_names_the_variable() {
    let c = config(&[("DEVICELAB_IMAGE_X86_64", "/nonexistent/disk.qcow2")]);
    let cache = tempfile::tempdir().unwrap();
    let err = ImageSource::for_arch(&c, VmArchitecture::X86_64)
        .unwrap()
        .resolve(cache.path())
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::Unreadable { .. }));
    assert_mentions(&err, &["/nonexistent/disk.qcow2", "DEVICELAB_IMAGE_X86_64"]);
}

#[test_log::test(tokio::test)]
async fn an_override_that_is_not_a_disk_image_is_refused() {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), "<html>404</html>").unwrap();
    let path = f.path().display().to_string();
    let c = config(&[("DEVICELAB_IMAGE_AARCH64", &path)]);
    let cache = tempfile::tempdir().unwrap();
    let err = ImageSource::for_arch(&c, VmArchitecture::Aarch64)
        .unwrap()
        .resolve(cache.path())
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::NotAnImage { .. }));
    assert_mentions(&err, &[&path, "DEVICELAB_IMAGE_AARCH64", "qcow2 or raw"]);
}

/// Checked when the configuration is read, before anything boots.
#[test]
fn image_overrides_must_be_complete_and_absolute() {
    let refused = |pairs: &[(&str, &str)]| {
        HarnessConfig::from_vars(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
        .unwrap_err()
    };
    let err = refused(&[("DEVICELAB_IMAGE_URL_X86_64", "http://127.0.0.1/x.img")]);
    assert_mentions(
        &err,
        &[
            "DEVICELAB_IMAGE_URL_X86_64",
            "DEVICELAB_IMAGE_SHA256_X86_64",
        ],
    );
    let err = refused(&[("DEVICELAB_IMAGE_X86_64", "images/x.qcow2")]);
    assert_mentions(&err, &["images/x.qcow2", "absolute"]);
    // Not a digest (here with multi-byte characters, which once panicked the harness).
    for bad in ["abc", "ééééééééééééééééééééééééééééééééé"] {
        let err = refused(&[
            ("DEVICELAB_IMAGE_URL_X86_64", "http://127.0.0.1/x.img"),
            ("DEVICELAB_IMAGE_SHA256_X86_64", bad),
        ]);
        assert_mentions(
            &err,
            &["DEVICELAB_IMAGE_SHA256_X86_64", bad, "64 hex digits"],
        );
    }
}

/// Runs in a child whose file-size limit makes writes fail like a full disk.
#[test_log::test(tokio::test)]
#[ignore = "helper for disk_full_during_download_leaves_nothing"]
async fn helper_download_with_a_tiny_disk() {
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let limit = libc::rlimit {
            rlim_cur: 1 << 20,
            rlim_max: 1 << 20,
        };
        libc::setrlimit(libc::RLIMIT_FSIZE, &limit);
    }
    let body: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
    let server = HttpServer::start(vec![("/big.img", Route::ok(body.clone()))]).await;
    let cache = tempfile::tempdir().unwrap();
    let a = Artifact {
        file_name: "big.img".into(),
        urls: vec![server.url("/big.img")],
        sha256: sha256_hex(&body),
        size: Some(body.len() as u64),
    };
    let err = fetch(cache.path(), &a).await.unwrap_err();
    assert_mentions(
        &err,
        &["is the disk full?", &cache.path().display().to_string()],
    );
    assert!(
        files_in(cache.path()).iter().all(|f| f.ends_with(".lock")),
        "{:?}",
        files_in(cache.path())
    );
}

#[test]
fn disk_full_during_download_leaves_nothing() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_download_with_a_tiny_disk",
            "--include-ignored",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    // A filter that matches nothing passes too: the helper must really have run.
    assert!(
        stdout.contains("test result: ok. 1 passed"),
        "the helper did not run and pass: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A data dir that belongs to another user (who could change what this run boots and read its
/// keys) is refused before anything is written to it, with the fix. (Made here as root and
/// given to uid 65534.)
#[test_log::test(tokio::test)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs a host ready for VMs: run with --features e2e"
)]
async fn a_data_dir_owned_by_another_user_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::os::unix::fs::chown(&data, Some(65534), Some(65534))
        .expect("the test runs as root, to give the dir away");
    let mut vars: std::collections::BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("DEVICELAB_") || k == "ARCH")
        .collect();
    vars.insert("DEVICELAB_DATA_DIR".into(), data.display().to_string());
    let err = match devicelab::Lab::new(HarnessConfig::from_vars(vars).unwrap()).await {
        Ok(_) => panic!("a data dir of uid 65534 was used"),
        Err(e) => e,
    };
    assert!(
        matches!(
            err,
            devicelab::LabError::DataDirNotOurs { owner: 65534, .. }
        ),
        "{err}"
    );
    assert_mentions(&err, &["DEVICELAB_DATA_DIR", "uid 65534"]);
    assert_eq!(files_in(&data), Vec::<String>::new(), "nothing was written");
}

/// `Lab::new` on the data dir `DEVICELAB_DATA_DIR` names (a mount of the caller's making):
/// refused by the preflight with the miss `EXPECT` names, and the fix, with nothing written there.
#[test_log::test(tokio::test)]
#[ignore = "helper for a_read_only_or_full_data_dir_is_refused_naming_the_fix"]
async fn helper_lab_new_on_a_mounted_data_dir() {
    // Run on its own (--include-ignored), without its mount, it has nothing to check.
    let Ok(expect) = std::env::var("EXPECT") else {
        return;
    };
    let config = HarnessConfig::from_env().unwrap();
    let data = config.data_dir.clone();
    let err = match devicelab::Lab::new(config).await {
        Ok(_) => panic!("the data dir {} was used", data.display()),
        Err(e) => e,
    };
    assert!(
        matches!(err, devicelab::LabError::HostNotReady { .. }),
        "{err}"
    );
    match expect.as_str() {
        "read-only" => assert_mentions(
            &err,
            &[
                "is not writable here",
                "Read-only file system",
                "DEVICELAB_DATA_DIR",
            ],
        ),
        "full" => assert_mentions(
            &err,
            &[
                "free disk",
                "0 GiB free",
                "GiB needed",
                "DEVICELAB_DATA_DIR",
            ],
        ),
        other => panic!("EXPECT={other}"),
    }
    assert_eq!(files_in(&data), Vec::<String>::new(), "nothing was written");
    println!("refused as expected: {err}");
}

/// A read-only data dir, and one on a file system with too little room (a 64 MiB tmpfs), are
/// refused by `Lab::new` before anything is written, each with the fix. (Each mount is made in a
/// private mount namespace of a child process, which then runs the helper above.)
#[test]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs a host ready for VMs: run with --features e2e"
)]
fn a_read_only_or_full_data_dir_is_refused_naming_the_fix() {
    for (expect, mount) in [
        (
            "read-only",
            "mount --bind \"$1\" \"$1\" && mount -o remount,bind,ro \"$1\"",
        ),
        (
            "full",
            "mount -t tmpfs -o size=64m,mode=0700 devicelab-full \"$1\"",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let out = std::process::Command::new(common::require("unshare", "apt install util-linux"))
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!(
                "{mount} && exec \"$0\" --exact helper_lab_new_on_a_mounted_data_dir \
                 --include-ignored --nocapture"
            ))
            .arg(std::env::current_exe().unwrap())
            .arg(&data)
            .env("DEVICELAB_DATA_DIR", &data)
            .env("EXPECT", expect)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("test result: ok. 1 passed") && stdout.contains("refused as expected"),
            "{expect}: the helper did not run and pass: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            files_in(&data),
            Vec::<String>::new(),
            "{expect}: nothing was written"
        );
    }
}
