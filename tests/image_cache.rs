//! The image cache against a real HTTP server on 127.0.0.1.

mod common;

use common::{HttpServer, Route, files_in, sha256_hex};
use devicelab::image::download::{Artifact, DownloadError, fetch};
use std::process::Command;

fn image_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

fn artifact(urls: Vec<String>, body: &[u8]) -> Artifact {
    Artifact {
        file_name: "disk.img".into(),
        urls,
        sha256: sha256_hex(body),
        size: Some(body.len() as u64),
    }
}

#[test_log::test(tokio::test)]
async fn miss_downloads_verifies_and_hit_does_not_download_again() {
    let body = image_bytes(3 * 1024 * 1024 + 17);
    let server = HttpServer::start(vec![("/disk.img", Route::ok(body.clone()))]).await;
    let cache = tempfile::tempdir().unwrap();
    let a = artifact(vec![server.url("/disk.img")], &body);

    let path = fetch(cache.path(), &a).await.unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), body);
    assert_eq!(server.hits("/disk.img"), 1);

    let again = fetch(cache.path(), &a).await.unwrap();
    assert_eq!(again, path);
    assert_eq!(server.hits("/disk.img"), 1, "a cache hit must not download");
}

#[test_log::test(tokio::test)]
async fn a_hit_trusts_the_record_but_a_changed_file_is_fetched_again() {
    let body = image_bytes(100_000);
    let server = HttpServer::start(vec![("/disk.img", Route::ok(body.clone()))]).await;
    let cache = tempfile::tempdir().unwrap();
    let a = artifact(vec![server.url("/disk.img")], &body);
    let path = fetch(cache.path(), &a).await.unwrap();
    // Corrupt the cached file behind the harness's back: size and mtime change, so the record
    // no longer vouches for it; the next fetch re-verifies and downloads a good copy.
    std::fs::write(&path, b"corrupted").unwrap();
    let path = fetch(cache.path(), &a).await.unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), body);
    assert_eq!(server.hits("/disk.img"), 2);
}

#[test_log::test(tokio::test)]
async fn sha_mismatch_leaves_nothing_usable() {
    let body = image_bytes(50_000);
    let server = HttpServer::start(vec![("/disk.img", Route::ok(body.clone()))]).await;
    let cache = tempfile::tempdir().unwrap();
    let mut a = artifact(vec![server.url("/disk.img")], &body);
    a.sha256 = sha256_hex(b"something else");
    let err = fetch(cache.path(), &a).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DownloadError::AllMirrorsFailed { .. }));
    assert!(
        msg.contains("sha256 mismatch") && msg.contains(&a.sha256),
        "{msg}"
    );
    assert!(!cache.path().join("disk.img").exists());
    assert!(
        files_in(cache.path()).iter().all(|f| f.ends_with(".lock")),
        "only the lock file may remain: {:?}",
        files_in(cache.path())
    );
}

#[test_log::test(tokio::test)]
async fn truncated_download_is_an_error_and_leaves_nothing() {
    let body = image_bytes(200_000);
    let mut route = Route::ok(body.clone());
    route.cut_after = Some(70_000);
    let server = HttpServer::start(vec![("/disk.img", route)]).await;
    let cache = tempfile::tempdir().unwrap();
    let a = artifact(vec![server.url("/disk.img")], &body);
    let msg = fetch(cache.path(), &a).await.unwrap_err().to_string();
    assert!(
        msg.contains("70000") || msg.contains("interrupted") || msg.contains("truncated"),
        "{msg}"
    );
    assert!(!cache.path().join("disk.img").exists());
    assert!(files_in(cache.path()).iter().all(|f| f.ends_with(".lock")));
}

#[test_log::test(tokio::test)]
async fn a_404_on_the_first_mirror_falls_back_to_the_next() {
    let body = image_bytes(10_000);
    let server = HttpServer::start(vec![("/mirror2/disk.img", Route::ok(body.clone()))]).await;
    let cache = tempfile::tempdir().unwrap();
    let a = artifact(
        vec![
            server.url("/mirror1/disk.img"),
            server.url("/mirror2/disk.img"),
        ],
        &body,
    );
    let path = fetch(cache.path(), &a).await.unwrap();
    assert_eq!(std::fs::read(path).unwrap(), body);
    assert_eq!(server.hits("/mirror1/disk.img"), 1);
}

#[test_log::test(tokio::test)]
async fn all_mirrors_failing_lists_every_attempt() {
    let server = HttpServer::start(vec![("/b/disk.img", Route::status(503))]).await;
    let cache = tempfile::tempdir().unwrap();
    let a = artifact(
        vec![server.url("/a/disk.img"), server.url("/b/disk.img")],
        b"x",
    );
    let msg = fetch(cache.path(), &a).await.unwrap_err().to_string();
    assert!(msg.contains("/a/disk.img: HTTP 404"), "{msg}");
    assert!(msg.contains("/b/disk.img: HTTP 503"), "{msg}");
}

#[test_log::test(tokio::test)]
async fn invalid_pins_are_refused_before_any_request() {
    let cache = tempfile::tempdir().unwrap();
    let mut a = artifact(vec!["http://127.0.0.1:9/x".into()], b"x");
    a.sha256 = "abc".into();
    assert!(
        fetch(cache.path(), &a)
            .await
            .unwrap_err()
            .to_string()
            .contains("64 hex digits")
    );
    let mut a = artifact(vec!["http://127.0.0.1:9/x".into()], b"x");
    a.file_name = "../escape".into();
    assert!(
        fetch(cache.path(), &a)
            .await
            .unwrap_err()
            .to_string()
            .contains("plain name")
    );
}

/// Helper run in child processes by `two_processes_download_once`.
#[test_log::test(tokio::test)]
#[ignore = "helper for two_processes_download_once"]
async fn helper_fetch_from_env() {
    let url = std::env::var("DL_URL").unwrap();
    let a = Artifact {
        file_name: "disk.img".into(),
        urls: vec![url],
        sha256: std::env::var("DL_SHA").unwrap(),
        size: None,
    };
    fetch(
        std::path::Path::new(&std::env::var("DL_CACHE").unwrap()),
        &a,
    )
    .await
    .unwrap();
}

#[test_log::test(tokio::test)]
async fn two_processes_download_once() {
    let body = image_bytes(8 * 1024 * 1024);
    let server = HttpServer::start(vec![("/disk.img", Route::ok(body.clone()))]).await;
    let cache = tempfile::tempdir().unwrap();
    let me = std::env::current_exe().unwrap();
    let spawn = || {
        Command::new(&me)
            .args([
                "--exact",
                "helper_fetch_from_env",
                "--include-ignored",
                "--quiet",
            ])
            .env("DL_URL", server.url("/disk.img"))
            .env("DL_SHA", sha256_hex(&body))
            .env("DL_CACHE", cache.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let (mut a, mut b) = (spawn(), spawn());
    let (sa, sb) = tokio::task::spawn_blocking(move || (a.wait().unwrap(), b.wait().unwrap()))
        .await
        .unwrap();
    assert!(sa.success() && sb.success());
    assert_eq!(
        server.hits("/disk.img"),
        1,
        "the lock makes the second process wait and reuse"
    );
    assert_eq!(std::fs::read(cache.path().join("disk.img")).unwrap(), body);
}

#[test_log::test(tokio::test)]
async fn a_download_cut_mid_stream_restarts_cleanly_on_the_next_mirror() {
    let body = image_bytes(300_000);
    let mut cut = Route::ok(body.clone());
    cut.cut_after = Some(120_000);
    let server = HttpServer::start(vec![
        ("/cut/disk.img", cut),
        ("/good/disk.img", Route::ok(body.clone())),
    ])
    .await;
    let cache = tempfile::tempdir().unwrap();
    let a = artifact(
        vec![server.url("/cut/disk.img"), server.url("/good/disk.img")],
        &body,
    );
    let path = fetch(cache.path(), &a).await.unwrap();
    assert_eq!(
        std::fs::read(&path).unwrap(),
        body,
        "the whole file, not a splice"
    );
    assert_eq!(server.hits("/cut/disk.img"), 1);
    assert_eq!(server.hits("/good/disk.img"), 1);
    let leftovers: Vec<_> = files_in(cache.path())
        .into_iter()
        .filter(|f| f.contains(".tmp") || f.contains(".part"))
        .collect();
    assert!(leftovers.is_empty(), "no partial file left: {leftovers:?}");
}
