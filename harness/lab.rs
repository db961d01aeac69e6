//! The lab, the facade a test talks to: configuration, the libvirt connection, the storage pool, the SSH key
//! and the cached images, shared by every VM a test process starts.

use crate::agent::description::AgentDescription;
use crate::config::{ConfigError, HarnessConfig};
use crate::host::accel::{self, AccelDecision};
use crate::host::doctor;
use crate::host::domain_xml::RunOwner;
use crate::host::libvirt::{Libvirt, LibvirtError};
use crate::host::pool::{Pool, PoolError};
use crate::host::qemu_probe;
use crate::host::reaper;
use crate::host::remote::{self, RemoteError};
use crate::host::slots::SlotCount;
use crate::image::firmware::{self, FirmwareError, FirmwarePair};
use crate::image::source::{BaseImage, ImageError, ImageSource};
use crate::model::arch::Accelerator;
use crate::model::arch::VmArchitecture;
use crate::model::spec::{Start, VirtualMachineSpec};
use crate::nats::{NatsError, NatsServer};
use crate::ssh::Route;
use crate::ssh::keys::{ClientKey, KeyError};
use crate::ssh::route::ForwardError;
use crate::support::lock;
use crate::vm::plan::{self, Plan};
use crate::vm::run;
use crate::vm::{Vm, VmError};
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// Why a [`Lab`] could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The configuration (the `DEVICELAB_*` variables, `ARCH`) is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// libvirt could not be reached, or refused a request.
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    /// The libvirt storage pool could not be made ready.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The harness's SSH key could not be made or read.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The libvirt URI names a remote host the guests cannot be reached through.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// The data dir could not be created, given its permissions, or locked: set
    /// DEVICELAB_DATA_DIR to a directory you can write.
    #[error(
        "cannot prepare the data dir {dir}: {source} (set DEVICELAB_DATA_DIR to a directory you can write)"
    )]
    DataDir {
        /// The data dir.
        dir: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The data dir belongs to another user: whoever owns it can change what this run boots
    /// and reads its keys. Set DEVICELAB_DATA_DIR to a directory of your own.
    #[error(
        "the data dir {dir} belongs to uid {owner}, not to you (uid {me}): set DEVICELAB_DATA_DIR \
         to a directory of your own (or, if it is yours, `sudo chown -R {me} {dir}`)"
    )]
    DataDirNotOurs {
        /// The data dir.
        dir: PathBuf,
        /// Its owner's uid.
        owner: u32,
        /// This process's effective uid.
        me: u32,
    },
    /// Another run held the storage pool's setup lock for the whole budget.
    #[error(
        "the storage pool's setup lock {path} was held by {holder} for {waited:.0?}: is that run \
         hung? (it is released when that process exits)"
    )]
    PoolLock {
        /// The lock file.
        path: PathBuf,
        /// What the lock file says about its holder.
        holder: String,
        /// How long this run waited.
        waited: std::time::Duration,
    },
    /// The setup task on a blocking thread panicked or was cancelled.
    #[error("the lab's setup task failed: {0}")]
    Task(String),
    /// The host lacks something every run needs: install what `misses` names (`devicelab
    /// doctor` shows every check; `fixtures/host/setup.sh` installs what is missing).
    #[error(
        "this host is not ready for devicelab; every miss, with its fix:\n{misses}  \
         (`devicelab doctor` shows every check; `fixtures/host/setup.sh` installs what is missing)"
    )]
    HostNotReady {
        /// Every failed check, one a line, with its fix.
        misses: String,
    },
}

/// The lab a test talks to: the configuration, the libvirt connection, the storage pool, the
/// SSH key and the cached base images, shared by every VM the process starts. Made by
/// [`Lab::from_env`] or [`Lab::new`]; asked for VMs ([`Lab::vm`]) and NATS servers
/// ([`Lab::nats`]).
pub struct Lab {
    /// The harness's configuration.
    pub config: HarnessConfig,
    /// The connection to libvirt.
    pub libvirt: Libvirt,
    /// The libvirt storage pool that holds the VMs' volumes (disk, seed, NVRAM).
    pub pool: Pool,
    /// The harness's SSH key, authorized on every VM it boots (kept in the data dir).
    pub client_key: ClientKey,
    /// How the guests' ports are reached: directly for a local libvirt host, through its SSH
    /// login (the URI's user, key and `known_hosts`) for a remote one.
    pub route: Route,
    /// This process's run identity, recorded on everything it creates, so that what a dead
    /// run left behind can be told apart and removed.
    pub owner: RunOwner,
    /// Whose VM slots this lab's requests count as their own: its test's (see
    /// [`slot_group`]).
    slot_group: String,
    images: tokio::sync::Mutex<HashMap<VmArchitecture, BaseImage>>,
    accels: Mutex<HashMap<VmArchitecture, AccelDecision>>,
    qemu: Arc<Mutex<HashMap<VmArchitecture, QemuOnHost>>>,
    /// A remote host's size (cores, memory in MiB) as its libvirt reports it; `None` on this
    /// machine, whose own size counts.
    remote_size: Option<(usize, u64)>,
    /// Architectures whose host pieces passed the preflight.
    ready_archs: Mutex<std::collections::HashSet<VmArchitecture>>,
}

/// Runs the doctor's checks for `scope` off the runtime; logs the warnings, and returns the
/// misses, if any.
async fn preflight(config: &HarnessConfig, scope: doctor::Scope) -> Result<(), String> {
    let config = config.clone();
    let report = tokio::task::spawn_blocking(move || doctor::check(&config, &scope))
        .await
        .map_err(|e| format!("  the preflight task failed: {e}\n"))?;
    for c in report
        .checks
        .iter()
        .filter(|c| c.status == doctor::Status::Warn)
    {
        tracing::warn!("{c}");
    }
    if report.passed() {
        Ok(())
    } else {
        Err(report.misses())
    }
}

/// `arch`'s QEMU on a lab's host, read once per lab.
#[derive(Clone)]
struct QemuOnHost {
    emulator: PathBuf,
    /// Another host's QEMU version: the machine type its libvirt resolves the architecture's
    /// to (this machine's is asked of the binary itself when a saved VM's key needs it).
    version: Option<String>,
    /// Extra QEMU arguments: for emulated aarch64 the knobs of
    /// `qemu_probe::AARCH64_TCG_KNOBS` the host's QEMU accepts (each choice logged).
    args: Vec<String>,
}

/// `arch`'s QEMU on the host `libvirt` reaches: this machine's from the usual install
/// locations, probed here; another host's as its libvirt names it, probed through that
/// libvirt. Blocking.
fn qemu_on_host(
    libvirt: &Libvirt,
    route: &Route,
    arch: VmArchitecture,
    accel: Accelerator,
) -> Result<QemuOnHost, VmError> {
    let (emulator, version) = match route {
        Route::Direct => (
            doctor::find_emulator(arch)
                .unwrap_or_else(|| Path::new("/usr/bin").join(arch.emulator_binary())),
            None,
        ),
        Route::Through(_) => {
            let qemu = libvirt.host_qemu(arch, accel)?;
            tracing::info!(
                "{}: {arch} guests run on {} (machine {})",
                libvirt.uri,
                qemu.emulator.display(),
                qemu.machine
            );
            (qemu.emulator, Some(qemu.machine))
        }
    };
    let args = if arch == VmArchitecture::Aarch64 && accel == Accelerator::Tcg {
        qemu_probe::accepted_args(
            &emulator,
            qemu_probe::AARCH64_TCG_KNOBS,
            |args| match route {
                Route::Direct => qemu_probe::probe(&emulator, args),
                Route::Through(_) => libvirt.qemu_accepts(arch, &emulator, args),
            },
        )
    } else {
        Vec::new()
    };
    Ok(QemuOnHost {
        emulator,
        version,
        args,
    })
}

/// The accelerator for each architecture on the libvirt host `config` names, from what its
/// libvirt says (logged); TCG, with the reason, if it says nothing. Blocking.
fn remote_accels(
    libvirt: &Libvirt,
    config: &HarnessConfig,
) -> HashMap<VmArchitecture, AccelDecision> {
    let host = crate::config::uri_host(&config.libvirt_uri).unwrap_or_default();
    let facts = libvirt.host_facts().map_err(|e| e.to_string());
    VmArchitecture::ALL
        .into_iter()
        .map(|arch| {
            let d = accel::decide_from_libvirt(arch, config.accel, &host, &facts);
            tracing::info!("{host}: {arch}: accelerator {} ({})", d.accel, d.reason);
            (arch, d)
        })
        .collect()
}

/// How long `Lab::new` waits for another run's pool setup (and reaping): seconds, normally.
const POOL_LOCK_BUDGET: std::time::Duration = std::time::Duration::from_secs(300);

/// The lock one process at a time holds while it sets up the storage pool and reaps what dead
/// runs left (`Lab::new`, `devicelab clean`), waited for within a budget. Blocking.
pub fn pool_setup_lock(config: &HarnessConfig) -> Result<lock::FileLock, LabError> {
    let path = config.data_dir.join(".pool.lock");
    lock::lock_within(&path, "setting up the pool", POOL_LOCK_BUDGET).map_err(|e| match e {
        lock::WaitError::Io(source) => LabError::DataDir {
            dir: config.data_dir.clone(),
            source,
        },
        lock::WaitError::Timeout { holder, waited } => LabError::PoolLock {
            path: path.clone(),
            holder,
            waited,
        },
    })
}

/// The test this lab belongs to, as far as VM slots go: libtest runs each test on a thread
/// named after it (`cargo test` runs a binary's tests as threads of one process), and every
/// fixture of a test makes its lab on that thread. Elsewhere (nextest's one test per process,
/// a `main`, a runtime's worker) the process is the test.
fn slot_group() -> String {
    let pid = std::process::id();
    match std::thread::current().name() {
        Some(name) if name != "main" && !name.starts_with("tokio-") => {
            format!("test {name} (pid {pid})")
        }
        _ => format!("pid {pid}"),
    }
}

/// A number no earlier call in this process returned.
fn next_instance() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// This process's run identity, recorded on everything it creates.
pub fn run_owner() -> RunOwner {
    static OWNER: OnceLock<RunOwner> = OnceLock::new();
    OWNER
        .get_or_init(|| RunOwner {
            run_id: hex::encode(rand::random::<[u8; 4]>()),
            pid: std::process::id(),
        })
        .clone()
}

/// Makes the data dir: ours, traversable, not listable. (The preflight checked it is writable
/// and has room.) Blocking.
fn prepare_data_dir(data: &Path) -> Result<(), LabError> {
    use std::os::unix::fs::MetadataExt;
    let data_err = |source| LabError::DataDir {
        dir: data.to_owned(),
        source,
    };
    std::fs::create_dir_all(data).map_err(data_err)?;
    let owner = std::fs::metadata(data).map_err(data_err)?.uid();
    let me = rustix::process::geteuid().as_raw();
    if owner != me {
        return Err(LabError::DataDirNotOurs {
            dir: data.to_owned(),
            owner,
            me,
        });
    }
    // Traversable (libvirt's qemu user reaches images through it), not listable.
    std::fs::set_permissions(data, std::fs::Permissions::from_mode(0o711)).map_err(data_err)
}

impl Lab {
    /// [`Lab::new`] with the configuration the environment gives (the `DEVICELAB_*`
    /// variables, `ARCH`).
    pub async fn from_env() -> Result<Arc<Self>, LabError> {
        Self::new(HarnessConfig::from_env()?).await
    }

    /// Checks the host (every miss at once), prepares the data dir, connects to libvirt,
    /// makes sure the storage pool exists, removes what dead runs left behind, and loads (or
    /// makes) the SSH key. Every libvirt call has a budget against a hung libvirtd (its
    /// keepalive runs on libvirt's event loop, which the first connection starts on a thread of
    /// the process: see `LibvirtError::Hung`).
    pub async fn new(config: HarnessConfig) -> Result<Arc<Self>, LabError> {
        crate::install_crypto_provider();
        // Everything the run needs, checked at once: a miss fails here, naming every other
        // miss too, not one at a time minutes into the run. The architectures a run boots
        // (unless ARCH names one) are checked when their first VM is planned.
        let scope = doctor::Scope {
            host_wide: true,
            archs: config.arch_filter.into_iter().collect(),
            qemu_knobs: false,
            cargo_agent: false,
        };
        preflight(&config, scope)
            .await
            .map_err(|misses| LabError::HostNotReady { misses })?;
        let config2 = config.clone();
        let (libvirt, pool, route, remote_size, accels) =
            tokio::task::spawn_blocking(move || -> Result<_, LabError> {
                // A remote host the guests cannot be reached through fails before anything is made.
                let route = match remote::ssh_hop(&config2.libvirt_uri)? {
                    None => Route::Direct,
                    Some(host) => Route::through(host.target, Some(host.login.proxy_command())),
                };
                prepare_data_dir(&config2.data_dir)?;
                let libvirt = Libvirt::open(&config2.libvirt_uri)?;
                // Several test processes start at once: one defines the pool, the others find it.
                let _lock = pool_setup_lock(&config2)?;
                let pool = Pool::ensure(&libvirt, &config2.pool_dir())?;
                // Runs killed with SIGKILL left VMs and containers behind: clean up after them.
                let dirs = reaper::DataDirs::of(&config2);
                let reaped = reaper::reap(&libvirt, &pool, &dirs, &config2.podman);
                if reaped != reaper::Reaped::default() {
                    tracing::warn!(
                        "reaped leftovers of dead runs: VMs {:?}, containers {:?}",
                        reaped.vms,
                        reaped.containers
                    );
                }
                // Only what derives the slots: a host whose libvirt does not say falls back to
                // this machine's size, with a warning.
                let remote_size = match route {
                    Route::Through(_) if config2.slots_set().is_none() => libvirt
                        .node_size()
                        .inspect_err(|e| {
                            tracing::warn!(
                                "{}: its VM slots are derived from this machine's size: {e}",
                                config2.libvirt_uri
                            )
                        })
                        .ok(),
                    _ => None,
                };
                // Another host's accelerator is what its libvirt says, not this machine's.
                let accels: HashMap<_, _> = match route {
                    Route::Through(_) => remote_accels(&libvirt, &config2),
                    Route::Direct => HashMap::new(),
                };
                Ok((libvirt, pool, route, remote_size, accels))
            })
            .await
            .map_err(|e| LabError::Task(e.to_string()))??;
        let client_key = ClientKey::load_or_generate(&config.keys_dir())?;
        Ok(Arc::new(Self {
            config,
            libvirt,
            pool,
            client_key,
            route,
            remote_size,
            owner: run_owner(),
            slot_group: slot_group(),
            images: Default::default(),
            accels: Mutex::new(accels),
            qemu: Default::default(),
            ready_archs: Default::default(),
        }))
    }

    /// A lab on each host of DEVICELAB_HOSTS, in its order; on `config`'s host alone without
    /// it. Each lab checks its host as [`Lab::new`] does.
    pub async fn on_each_host(config: HarnessConfig) -> Result<Vec<Arc<Self>>, LabError> {
        Self::open_each(config.host_configs()).await
    }

    /// A lab on each host of DEVICELAB_HOSTS but this lab's own: what a fleet spreads to.
    pub async fn other_hosts(&self) -> Result<Vec<Arc<Self>>, LabError> {
        let others = self
            .config
            .host_configs()
            .into_iter()
            .filter(|c| c.libvirt_uri != self.config.libvirt_uri)
            .collect();
        Self::open_each(others).await
    }

    async fn open_each(configs: Vec<HarnessConfig>) -> Result<Vec<Arc<Self>>, LabError> {
        let mut labs = Vec::with_capacity(configs.len());
        for config in configs {
            labs.push(Self::new(config).await?);
        }
        Ok(labs)
    }

    /// The accelerator for `arch` (this machine's probed once per process, another host's read
    /// from its libvirt when the lab opened; the choice is logged).
    pub fn accel(&self, arch: VmArchitecture) -> AccelDecision {
        self.accels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(arch)
            .or_insert_with(|| {
                let d = accel::decide(arch, self.config.accel);
                tracing::info!("{arch}: accelerator {} ({})", d.accel, d.reason);
                d
            })
            .clone()
    }

    /// The base image `arch`'s VMs boot from, resolved once per process (found in the image
    /// cache, or downloaded into it).
    pub async fn base_image(&self, arch: VmArchitecture) -> Result<BaseImage, ImageError> {
        let mut images = self.images.lock().await;
        if let Some(image) = images.get(&arch) {
            return Ok(image.clone());
        }
        let image = ImageSource::for_arch(&self.config, arch)?
            .resolve(&self.config.image_cache_dir())
            .await?;
        images.insert(arch, image.clone());
        Ok(image)
    }

    /// `arch`'s QEMU on this lab's host (see [`qemu_on_host`]), read once per lab.
    async fn qemu(&self, arch: VmArchitecture) -> Result<QemuOnHost, VmError> {
        let accel = self.accel(arch).accel;
        let (cache, libvirt, route) = (self.qemu.clone(), self.libvirt.clone(), self.route.clone());
        tokio::task::spawn_blocking(move || {
            let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(qemu) = cache.get(&arch) {
                return Ok(qemu.clone());
            }
            let qemu = qemu_on_host(&libvirt, &route, arch, accel)?;
            cache.insert(arch, qemu.clone());
            Ok(qemu)
        })
        .await
        .map_err(|e| VmError::Task(e.to_string()))?
    }

    /// The QEMU system emulator `arch`'s VMs run on: this machine's from the usual install
    /// locations, or the one another host's libvirt names.
    pub async fn emulator(&self, arch: VmArchitecture) -> Result<PathBuf, VmError> {
        Ok(self.qemu(arch).await?.emulator)
    }

    /// The extra QEMU arguments `arch`'s VMs get on this lab's host: for emulated aarch64, the
    /// knobs of `qemu_probe::AARCH64_TCG_KNOBS` its QEMU accepts; none otherwise.
    pub async fn qemu_args(&self, arch: VmArchitecture) -> Result<Vec<String>, VmError> {
        Ok(self.qemu(arch).await?.args)
    }

    /// `arch`'s host pieces (QEMU, firmware), checked before its first VM: every miss at once.
    async fn preflight_arch(&self, arch: VmArchitecture) -> Result<(), VmError> {
        if self
            .ready_archs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&arch)
        {
            return Ok(());
        }
        let scope = doctor::Scope {
            host_wide: false,
            archs: vec![arch],
            qemu_knobs: false,
            cargo_agent: false,
        };
        preflight(&self.config, scope)
            .await
            .map_err(|misses| VmError::HostNotReady { arch, misses })?;
        self.ready_archs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(arch);
        Ok(())
    }

    /// How `spec`'s VM comes up: its own choice, else the configuration's.
    fn start_for(&self, spec: &VirtualMachineSpec) -> Start {
        spec.start.unwrap_or(self.config.start)
    }

    /// Resolves `spec` into everything a run needs (architecture facts, accelerator,
    /// budgets, image, emulator, QEMU arguments, firmware), before anything is created.
    pub async fn plan(&self, spec: VirtualMachineSpec) -> Result<Plan, VmError> {
        spec.validate()?;
        let arch = spec.arch;
        self.preflight_arch(arch).await?;
        let accel = self.accel(arch);
        let image = self.base_image(arch).await?;
        let qemu = self.qemu(arch).await?;
        let configured = self.config.uefi.clone();
        let firmware = tokio::task::spawn_blocking(move || {
            plan::firmware_for(arch.firmware(), configured.as_ref())
        })
        .await
        .map_err(|e| VmError::Task(e.to_string()))??;
        let slots = self.slot_count(accel.accel, &spec);
        Ok(Plan {
            slot_group: self.slot_group.clone(),
            start: self.start_for(&spec),
            slots,
            slots_dir: self.config.slots_dir(),
            slot_budget: self.config.host_budgets().vm_slot,
            warm_dir: self.config.warm_dir(),
            budgets: arch.budgets(accel.accel).scaled(self.config.budget_scale),
            waits: spec.waits(),
            spec,
            accel,
            image,
            emulator: qemu.emulator,
            qemu_version: qemu.version,
            qemu_args: qemu.args,
            firmware,
            libvirt: self.libvirt.clone(),
            pool: self.pool.clone(),
            network: self.config.network.clone(),
            route: self.route.clone(),
            client_key: self.client_key.clone(),
            owner: self.owner.clone(),
            runs_dir: self.config.runs_dir(),
            keep: self.config.keep,
        })
    }

    /// The aarch64 UEFI firmware as VMs boot it: CODE padded to the 64 MiB a `virt` pflash
    /// needs (a volume of the pool), and the VARS template each VM's NVRAM is uploaded from.
    pub async fn firmware(&self) -> Result<FirmwarePair, PoolError> {
        let pool = self.pool.clone();
        let configured = self.config.uefi.clone();
        tokio::task::spawn_blocking(move || {
            let fw = firmware::discover(configured.as_ref())?;
            Ok(FirmwarePair {
                code: pool.firmware_code(&fw)?,
                vars: fw.vars,
            })
        })
        .await
        .map_err(|e| {
            PoolError::Firmware(FirmwareError::Io {
                path: PathBuf::from("(firmware task)"),
                source: std::io::Error::other(e),
            })
        })?
    }

    /// Provisions a VM and waits until it is ready (the spec's wait strategies).
    pub async fn vm(&self, spec: VirtualMachineSpec) -> Result<Vm, VmError> {
        Box::pin(run::run(self.plan(spec).await?)).await
    }

    /// Starts a NATS server reachable from this lab's VMs.
    pub async fn nats(&self) -> Result<NatsServer, LabNatsError> {
        self.nats_with("").await
    }

    /// A NATS server offering what `agent` asks of it (its description's `nats_config`).
    pub async fn nats_for(&self, agent: &AgentDescription) -> Result<NatsServer, LabNatsError> {
        self.nats_with(&agent.nats_config).await
    }

    async fn nats_with(&self, extra: &str) -> Result<NatsServer, LabNatsError> {
        Self::nats_across(&[self], extra).await
    }

    /// One NATS server for the guests of every lab of `labs` (`extra`: server configuration
    /// appended to the run's). With a local host among them it listens on that host's network
    /// gateway, where the test and its guests both reach it; else on this machine's loopback.
    /// A remote host's guests reach it at their own gateway, through a port the host's sshd
    /// forwards back here ([`NatsServer::guest_url_on`]).
    pub async fn nats_across(labs: &[&Lab], extra: &str) -> Result<NatsServer, LabNatsError> {
        let Some(first) = labs.first() else {
            return Err(LabNatsError::NoHost);
        };
        let listen = match labs.iter().find(|l| matches!(l.route, Route::Direct)) {
            Some(local) => local.gateway().await?,
            None => std::net::Ipv4Addr::LOCALHOST,
        };
        let mut nats = NatsServer::start_with(&first.config, listen, &first.owner, extra).await?;
        nats.home = first.config.libvirt_uri.clone();
        let here = std::net::SocketAddr::from((nats.gateway, nats.port));
        for lab in labs {
            let Route::Through(_) = lab.route else {
                continue;
            };
            let uri = lab.config.libvirt_uri.clone();
            let forward = lab
                .route
                .forward_here(
                    lab.gateway().await?,
                    here,
                    lab.config.host_budgets().nats_start,
                )
                .await
                .map_err(|source| LabNatsError::Forward {
                    uri: uri.clone(),
                    source,
                })?;
            if let Some(forward) = forward {
                nats.for_guests.insert(uri.clone(), forward);
            }
            tracing::info!(
                "NATS: the guests of {uri} reach it at {}, forwarded by the host's sshd",
                nats.guest_url_on(&uri)
            );
        }
        Ok(nats)
    }

    /// The host's address on the lab's network: where a service the VMs use listens (the NATS
    /// server; a test's own apt mirror).
    pub async fn gateway(&self) -> Result<std::net::Ipv4Addr, crate::host::libvirt::LibvirtError> {
        let network = self.config.network.clone();
        self.libvirt
            .run(move |lv| lv.network_gateway(&network))
            .await
    }

    /// How many VMs of `arch` (of the default size) this host runs at once: what a fleet
    /// onboards at a time.
    pub fn vm_slots(&self, arch: VmArchitecture) -> crate::host::slots::SlotCount {
        self.slot_count(
            self.accel(arch).accel,
            &VirtualMachineSpec::new("slots", arch),
        )
    }

    /// How many VMs of `spec`'s size this host runs at once: as configured, else derived
    /// from its size (this machine's, or what a remote host's libvirt reports).
    fn slot_count(&self, accel: Accelerator, spec: &VirtualMachineSpec) -> SlotCount {
        SlotCount::for_size(
            self.config.slots_set(),
            self.remote_size,
            accel,
            spec.vcpus,
            spec.memory_mib,
        )
    }

    /// A VM name no other call gives, in this process or another:
    /// `devicelab-<what>-<arch>-<run id>-<n>`, with `<arch>` in Debian's naming (`amd64`,
    /// `arm64`) and `<n>` counting this process's calls.
    pub fn vm_name(&self, what: &str, arch: VmArchitecture) -> String {
        format!(
            "devicelab-{what}-{}-{}-{}",
            arch.debian_name(),
            self.owner.run_id,
            next_instance()
        )
    }
}

/// Why the lab could not start a NATS server.
#[derive(Debug, thiserror::Error)]
pub enum LabNatsError {
    /// The address the server must listen on (the libvirt network's gateway) could not be
    /// read.
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    /// The server could not be started.
    #[error(transparent)]
    Nats(#[from] NatsError),
    /// A server for the guests of no lab was asked for.
    #[error("a NATS server for no host: give Lab::nats_across at least one lab")]
    NoHost,
    /// The server could not be offered to the guests of a remote host.
    #[error("cannot offer the NATS server to the guests of {uri}: {source}")]
    Forward {
        /// The libvirt URI of the guests' host.
        uri: String,
        /// What went wrong.
        source: ForwardError,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    /// The size of the future `f` returns, read from its type (nothing is called).
    fn future_of<A, B, F: Future>(_: impl Fn(A, B) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// [`future_of`] for a function of one argument.
    fn future_of_1<A, F: Future>(_: impl Fn(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A test awaits these inline, on its own thread's stack (2 MiB unless RUST_MIN_STACK
    /// says), and a debug build keeps a copy of each layer's child future in each poll frame:
    /// the layers below box what they await, so what a test holds stays small.
    #[test]
    fn the_futures_a_test_awaits_stay_small() {
        // A trial's future, which holds the lab's calls, and each layer's below it.
        const TRIAL: usize = 20 * 1024;
        const LAYER: usize = 12 * 1024;
        let sizes = [
            ("Lab::vm", LAYER, future_of(Lab::vm)),
            ("run::run", LAYER, future_of_1(run::run)),
            ("Vm::power_cycle", LAYER, future_of_1(Vm::power_cycle)),
            ("Vm::wait_for_ssh", LAYER, future_of_1(Vm::wait_for_ssh)),
            (
                "SshSession::connect",
                LAYER,
                future_of(crate::ssh::SshSession::connect),
            ),
            ("ssh_login", LAYER, future_of(crate::ssh::login::ssh_login)),
            (
                "scenario::power_cycle",
                TRIAL,
                future_of(crate::trials::scenario::power_cycle),
            ),
            (
                "scenario::e2e",
                TRIAL,
                future_of(crate::trials::scenario::e2e),
            ),
        ];
        for (name, most, size) in sizes {
            assert!(
                size <= most,
                "{name}'s future is {size} bytes, over {most}: box what it awaits"
            );
        }
    }
}
