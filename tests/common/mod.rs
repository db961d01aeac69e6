//! What the tests share: a real HTTP/1.1 server on 127.0.0.1 for download tests (serves files
//! with a chosen status, can cut a body short, counts requests per path), a real sshd on
//! 127.0.0.1 (`Sshd`), a libvirtd of the test's own (`PrivateLibvirtd`), and small helpers.
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

/// Whether a domain called `name` exists and runs.
pub fn domain_running(lv: &devicelab::host::libvirt::Libvirt, name: &str) -> bool {
    lv.domain(name)
        .ok()
        .and_then(|d| d.is_active().ok())
        .unwrap_or(false)
}

/// A helper process of the test's, killed (SIGKILL) and waited for when dropped: a test that
/// fails before it kills it on purpose leaves no process behind.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What devicelab left on the host libvirt at `uri` answers for: its domains (`domain <name>`)
/// and its pool's volumes (`volume <name>`), but for what is kept across runs on purpose (a
/// base image per digest, padded firmware CODE). A partition's filter binding goes with its
/// domain. The leak check of a host that lives only as long as its test: empty once every run
/// on it is over.
pub fn leftovers(uri: &str) -> Vec<String> {
    use devicelab::host::pool::{BASE_PREFIX, POOL_NAME};
    use devicelab::image::firmware::PADDED_SUFFIX;
    let libvirt = devicelab::host::libvirt::Libvirt::open(uri).unwrap();
    let conn = libvirt.conn().unwrap();
    let mut left: Vec<String> = conn
        .list_all_domains(0)
        .unwrap()
        .iter()
        .filter_map(|d| d.name().ok())
        .filter(|n| n.starts_with("devicelab-"))
        .map(|n| format!("domain {n}"))
        .collect();
    if let Ok(pool) = conn.lookup_storage_pool_by_name(POOL_NAME) {
        pool.refresh(0).unwrap();
        left.extend(
            pool.list_volumes()
                .unwrap()
                .into_iter()
                .filter(|v| !v.starts_with(BASE_PREFIX) && !v.ends_with(PADDED_SUFFIX))
                .map(|v| format!("volume {v}")),
        );
    }
    left
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

/// A libvirtd of the test's own, so restarting it disturbs nothing else: private mount and
/// network namespaces, its state and config in a temp dir, its socket at `<dir>/run/libvirt-sock`.
/// `<dir>/data` is a directory it shares with the test, or, for
/// [`PrivateLibvirtd::another_host`], one of its own (`<dir>/host-data` seen from the test), as
/// a remote host's files are: nothing written there by the test reaches it.
pub struct PrivateLibvirtd {
    pub dir: tempfile::TempDir,
    child: Option<std::process::Child>,
    apart: bool,
    /// Another host: its loopback up and a network of its own ([`PrivateLibvirtd::another_host`]).
    host: bool,
}

/// The network [`PrivateLibvirtd::another_host`] gives its guests: not this machine's.
pub const ANOTHER_HOST_NETWORK: &str = "192.168.130";

impl PrivateLibvirtd {
    pub fn start() -> Self {
        Self::started(false, false)
    }

    /// A host that boots guests of its own, with a `<dir>/data` of its own: its loopback up,
    /// an isolated network `default` on `192.168.130.0/24` in its network namespace (which
    /// does not route from the test's), QEMU's output to files (there is no virtlogd there).
    /// Its network is destroyed (its dnsmasq stopped) before the daemon stops.
    pub fn another_host() -> Self {
        let this = Self::started(true, true);
        let xml = this.dir.path().join("network.xml");
        std::fs::write(
            &xml,
            format!(
                "<network><name>default</name><bridge name='virbr0'/>\
                 <ip address='{n}.1' netmask='255.255.255.0'><dhcp>\
                 <range start='{n}.10' end='{n}.200'/></dhcp></ip></network>",
                n = ANOTHER_HOST_NETWORK
            ),
        )
        .unwrap();
        let virsh = require("virsh", "apt install libvirt-clients");
        for args in [
            vec!["net-define".to_owned(), xml.display().to_string()],
            vec!["net-start".to_owned(), "default".to_owned()],
        ] {
            let out = std::process::Command::new(&virsh)
                .args(["-c", &this.uri()])
                .args(&args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "virsh {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        this
    }

    fn started(apart: bool, host: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["run", "lib", "cache", "etc", "data", "host-data"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        for conf in ["libvirtd.conf", "qemu.conf"] {
            std::fs::copy(
                std::path::Path::new("/etc/libvirt").join(conf),
                dir.path().join("etc").join(conf),
            )
            .unwrap();
        }
        if host {
            use std::io::Write;
            std::fs::OpenOptions::new()
                .append(true)
                .open(dir.path().join("etc/qemu.conf"))
                .unwrap()
                .write_all(b"\nstdio_handler = \"file\"\n")
                .unwrap();
            // Traversable by libvirt's QEMU user, as a data dir is.
            for d in [dir.path().to_owned(), dir.path().join("host-data")] {
                std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o711))
                    .unwrap();
            }
        }
        let mut this = Self {
            dir,
            child: None,
            apart,
            host,
        };
        this.spawn();
        this
    }

    pub fn uri(&self) -> String {
        format!(
            "qemu:///system?socket={}",
            self.dir.path().join("run/libvirt-sock").display()
        )
    }

    pub fn spawn(&mut self) {
        let d = self.dir.path().display();
        let data = if self.apart {
            format!("mount --bind {d}/host-data {d}/data && ")
        } else {
            String::new()
        };
        let lo = if self.host {
            require("ip", "apt install iproute2");
            "ip link set lo up && "
        } else {
            ""
        };
        let script = format!(
            "{lo}{data}mount --bind {d}/run /run/libvirt && mount --bind {d}/lib /var/lib/libvirt && \
             mount --bind {d}/cache /var/cache/libvirt && mount --bind {d}/etc /etc/libvirt && \
             exec libvirtd -p {d}/libvirtd.pid"
        );
        require(
            "libvirtd",
            "apt install libvirt-daemon-system (fixtures/host/setup.sh)",
        );
        let child = std::process::Command::new(require("unshare", "apt install util-linux"))
            .args(["--mount", "--net", "--propagation", "private", "sh", "-c"])
            .arg(script)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("unshare (util-linux) runs libvirtd");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while devicelab::host::libvirt::Libvirt::open(&self.uri()).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the private libvirtd did not come up"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    pub fn stop(&mut self) {
        if self.host
            && let Some(child) = &self.child
        {
            // libvirtd leaves its domains' QEMU and its network's dnsmasq running when it
            // stops (a test that failed with its VM up): destroy them first (a stopped daemon
            // runs again to answer); if it cannot answer, kill the QEMU its pid files name.
            unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
            let uri = self.uri();
            let virsh = |args: &[&str]| {
                std::process::Command::new("virsh")
                    .args(["-c", &uri])
                    .args(args)
                    .output()
            };
            match virsh(&["list", "--name"]) {
                Ok(listed) if listed.status.success() => {
                    for name in String::from_utf8_lossy(&listed.stdout).split_whitespace() {
                        let _ = virsh(&["destroy", name]);
                    }
                    let _ = virsh(&["net-destroy", "default"]);
                }
                _ => self.kill_by_pid_files(),
            }
        }
        if let Some(mut child) = self.child.take() {
            // A stopped daemon must run again to act on SIGTERM.
            unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            child.wait().unwrap();
        }
    }

    /// Kills the QEMU processes this daemon's pid files name whose command line names its
    /// files (so a reused pid is left alone).
    fn kill_by_pid_files(&self) {
        let ours = self.dir.path().to_string_lossy().into_owned();
        let files = std::fs::read_dir(self.dir.path().join("run/qemu"))
            .into_iter()
            .flatten();
        for file in files.flatten() {
            let Some(pid) = std::fs::read_to_string(file.path())
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.contains("qemu-system") && cmdline.contains(&ours) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }

    /// The daemon's pid (`unshare` execs it: the same process), to enter its namespaces.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the private libvirtd runs").id()
    }

    pub fn signal(&self, signal: i32) {
        let child = self.child.as_ref().expect("the private libvirtd runs");
        assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
    }
}

impl Drop for PrivateLibvirtd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A real OpenSSH sshd on 127.0.0.1, with a host key and an authorized client key of its own.
pub struct Sshd {
    /// Accepts connections on the port the test bound (and keeps) and hands each to
    /// `sshd -i`: no port is picked, freed and bound again later by someone else.
    acceptor: tokio::task::JoinHandle<()>,
    pub addr: std::net::SocketAddr,
    pub host_key: devicelab::ssh::keys::HostKey,
    pub client: devicelab::ssh::keys::ClientKey,
    pub dir: tempfile::TempDir,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

/// The user this test runs as.
pub fn user() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| {
            let out = std::process::Command::new("id")
                .arg("-un")
                .output()
                .unwrap();
            String::from_utf8(out.stdout).unwrap().trim().to_owned()
        })
}

impl Sshd {
    /// Starts it; each session's `sshd -i` runs under `wrap` (a command and its arguments, such as
    /// `nsenter` into another mount namespace), or directly when `wrap` is empty.
    pub async fn start(wrap: &[std::ffi::OsString]) -> Sshd {
        Self::start_with(wrap, "").await
    }

    /// [`Sshd::start`] with `extra` lines of sshd_config.
    pub async fn start_with(wrap: &[std::ffi::OsString], extra: &str) -> Sshd {
        use devicelab::ssh::keys::{ClientKey, HostKey};
        use std::os::unix::fs::PermissionsExt;
        use std::process::{Command, Stdio};
        devicelab::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let host_key = HostKey::generate("test-host").unwrap();
        let host_key_path = dir.path().join("host_ed25519");
        std::fs::write(&host_key_path, &host_key.private_openssh).unwrap();
        std::fs::set_permissions(&host_key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let client = ClientKey::load_or_generate(&dir.path().join("keys")).unwrap();
        let authorized = dir.path().join("authorized_keys");
        std::fs::write(&authorized, format!("{}\n", client.public_line)).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = dir.path().join("sshd_config");
        std::fs::write(
        &config,
        format!(
            "HostKey {}\nAuthorizedKeysFile {}\nPidFile none\n\
             UsePAM no\nStrictModes no\nPasswordAuthentication no\nPermitRootLogin prohibit-password\n{extra}",
            host_key_path.display(),
            authorized.display()
        ),
    )
    .unwrap();
        let _ = std::fs::create_dir_all("/run/sshd"); // privilege separation dir (Debian)
        let sshd = require(
            "sshd",
            "apt install openssh-server (fixtures/host/setup.sh)",
        );
        // Fails here, clearly, if sshd cannot run with this configuration.
        let check = Command::new(&sshd)
            .args(["-t", "-f"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "sshd -t: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let wrap = wrap.to_vec();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        let acceptor = tokio::spawn(async move {
            // Held by the task: aborting it (the drop) kills every sshd it started.
            let mut sessions = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let stream = stream.into_std().unwrap();
                stream.set_nonblocking(false).unwrap();
                let input = stream.try_clone().unwrap();
                // Inetd mode: this connection is sshd's stdin and stdout; it exits with it.
                let mut command = match wrap.split_first() {
                    Some((program, args)) => {
                        let mut c = tokio::process::Command::new(program);
                        c.args(args).arg(&sshd);
                        c
                    }
                    None => tokio::process::Command::new(&sshd),
                };
                let session = command
                    .args(["-i", "-f"])
                    .arg(&config)
                    .stdin(Stdio::from(std::os::fd::OwnedFd::from(input)))
                    .stdout(Stdio::from(std::os::fd::OwnedFd::from(stream)))
                    .stderr(Stdio::null())
                    .kill_on_drop(true)
                    .spawn();
                sessions.extend(session.ok());
            }
        });
        Sshd {
            acceptor,
            addr,
            host_key,
            client,
            dir,
            accepted,
        }
    }

    /// How many connections it has accepted.
    pub fn sessions(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}
