//! A real HTTP/1.1 server on 127.0.0.1 for download tests: serves files with a chosen status,
//! can cut a body short, and counts requests per path.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Clone)]
pub struct Route {
    pub status: u16,
    pub body: Vec<u8>,
    /// Send only this many body bytes (with the full Content-Length), then close.
    pub cut_after: Option<usize>,
}

impl Route {
    pub fn ok(body: impl Into<Vec<u8>>) -> Self {
        Self {
            status: 200,
            body: body.into(),
            cut_after: None,
        }
    }
    pub fn status(status: u16) -> Self {
        Self {
            status,
            body: b"nope".to_vec(),
            cut_after: None,
        }
    }
}

pub struct HttpServer {
    pub addr: SocketAddr,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpServer {
    pub async fn start(routes: Vec<(&str, Route)>) -> Self {
        Self::start_on(std::net::Ipv4Addr::LOCALHOST, routes).await
    }

    /// Listening on `ip` (a port the kernel picks): the lab's gateway, for a VM.
    pub async fn start_on(ip: std::net::Ipv4Addr, routes: Vec<(&str, Route)>) -> Self {
        let routes: Arc<HashMap<String, Route>> =
            Arc::new(routes.into_iter().map(|(p, r)| (p.to_owned(), r)).collect());
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits: Arc<Mutex<HashMap<String, usize>>> = Default::default();
        let hits2 = hits.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let routes = routes.clone();
                let hits = hits2.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    let mut req = Vec::new();
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        req.extend_from_slice(&buf[..n]);
                    }
                    let text = String::from_utf8_lossy(&req);
                    // apt asks a flat repository `./` for `/./Packages`.
                    let path = text.split_whitespace().nth(1).unwrap_or("/");
                    let path = path.replace("/./", "/");
                    *hits.lock().unwrap().entry(path.clone()).or_default() += 1;
                    let route = routes.get(&path).cloned().unwrap_or(Route::status(404));
                    let head = format!(
                        "HTTP/1.1 {} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        route.status,
                        route.body.len()
                    );
                    let _ = sock.write_all(head.as_bytes()).await;
                    let body = &route.body[..route
                        .cut_after
                        .unwrap_or(route.body.len())
                        .min(route.body.len())];
                    let _ = sock.write_all(body).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        Self { addr, hits, task }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// Files in `dir` (including hidden ones), sorted.
pub fn files_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The libvirt the fast suite talks to: the default URI (qemu:///system), whatever the
/// environment says, so a test never depends on a user's DEVICELAB_LIBVIRT_URI.
pub fn system_libvirt() -> devicelab::host::libvirt::Libvirt {
    let config = devicelab::config::HarnessConfig::from_vars(Default::default()).unwrap();
    devicelab::host::libvirt::Libvirt::open(&config.libvirt_uri)
        .expect("libvirtd must be running for the fast suite (fixtures/host/setup.sh)")
}

/// The path of a host program a test needs, or a failure at once that names the fix (never a
/// hang, never a bare "No such file or directory").
pub fn require(program: &str, fix: &str) -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin"].map(std::path::PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("this test needs `{program}` on the host: {fix}"))
}

/// A nats-server process of the harness's own, on loopback (no VM will reach it).
pub async fn nats_process_server() -> devicelab::nats::NatsServer {
    let vars =
        std::collections::BTreeMap::from([("DEVICELAB_NATS".to_owned(), "process".to_owned())]);
    let config = devicelab::config::HarnessConfig::from_vars(vars).unwrap();
    devicelab::nats::NatsServer::start(
        &config,
        std::net::Ipv4Addr::LOCALHOST,
        &devicelab::lab::run_owner(),
    )
    .await
    .unwrap()
}

/// The MAC in a VM's domain XML, as libvirt was given it.
pub fn mac_of(vm: &devicelab::Vm) -> String {
    let xml = std::fs::read_to_string(vm.run_dir().join("domain.xml")).unwrap();
    let at = xml.find("<mac address=").expect("a MAC in the domain XML") + 14;
    xml[at..at + 17].to_owned()
}

/// The `devicelab` command, as a user installs it (`--features cli`): the one cargo built for
/// this test run, else built here once (a run without `--features cli` still tests it).
pub fn devicelab_cli() -> std::path::PathBuf {
    if let Some(built) = option_env!("CARGO_BIN_EXE_devicelab") {
        return built.into();
    }
    static BUILT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let status = std::process::Command::new(cargo)
                .args([
                    "build",
                    "--quiet",
                    "--features",
                    "cli",
                    "--bin",
                    "devicelab",
                ])
                .current_dir(root)
                .status()
                .expect("cargo, to build the devicelab command");
            assert!(
                status.success(),
                "cargo build --features cli --bin devicelab failed"
            );
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|| root.join("target"));
            target.join("debug/devicelab")
        })
        .clone()
}
