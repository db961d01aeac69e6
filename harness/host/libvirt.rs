//! The libvirt connection: domains and networks through the `virt` crate. Every call here is a
//! blocking RPC; async code goes through [`Libvirt::run`], which moves it off the runtime. No
//! call waits on a hung libvirtd for long ([`LibvirtTimeouts`]): opening a connection has its
//! budget, and every call on an open one is ended by libvirt's keepalive.
//!
//! The keepalive needs an event loop: the first connection registers libvirt's default one for
//! the process and runs it on a thread of its own (`dl-libvirt-loop`). A process that
//! uses the `virt` crate beside devicelab shares that loop (libvirt has one per process).

use crate::host::domain_xml::{RenderedDomain, digest_of_defined};
use crate::host::serial;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, SystemTime};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::enumutil::Enum;
use virt::error::ErrorNumber;
use virt::sys;

#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    /// A URI refused before connecting (see [`crate::host::remote::RemoteError::Stalls`]).
    #[error(transparent)]
    Refused(#[from] crate::host::remote::RemoteError),
    #[error(
        "cannot connect to libvirt at {uri}: {message}\n  is libvirtd running? (systemctl start libvirtd, or \
         `libvirtd -d` where systemd is not PID 1; fixtures/host/setup.sh installs it)"
    )]
    Connect { uri: String, message: String },
    #[error(
        "libvirt has no network {name:?} (networks: {available}): set DEVICELAB_NETWORK to one of them, \
         or create it (virsh net-define, net-start)"
    )]
    NoSuchNetwork { name: String, available: String },
    #[error("libvirt network {name:?} is not active: run `virsh -c {uri} net-start {name}`")]
    NetworkInactive { name: String, uri: String },
    #[error(
        "libvirt network {name:?} has no IPv4 address, so guests cannot reach services on the \
         host: give it one with DHCP (`virsh -c {uri} net-edit {name}`: <ip address=... netmask=...> \
         with a <dhcp> range), or set DEVICELAB_NETWORK to a network that has one, such as \
         libvirt's `default`"
    )]
    NetworkWithoutIpv4 { name: String, uri: String },
    #[error(
        "domain {name} belongs to run {run_id} (pid {pid}), which is still running: it was not \
         touched; give this VM another name, or stop that run first"
    )]
    OwnedByLiveRun {
        name: String,
        run_id: String,
        pid: u32,
    },
    /// libvirtd accepted the connection but did not answer: it is hung (stopped, stuck on a
    /// lock, its disk full), not dead.
    #[error(
        "libvirtd at {uri} has not answered {what} for {waited:?}: it is hung (stopped or stuck: \
         the kernel still queues connections to it) or, on a remote URI, waiting for a password; \
         look at it (`systemctl status libvirtd`, its log, `virsh -c {uri} list`) and restart it"
    )]
    NotAnswering {
        uri: String,
        what: &'static str,
        waited: Duration,
    },
    /// A call was cut off by libvirt's keepalive: libvirtd stopped answering mid-call.
    #[error(
        "libvirt failed to {action} {object}: libvirtd stopped answering ({message}): it is hung; \
         look at it (`systemctl status libvirtd`, its log) and restart it"
    )]
    Hung {
        action: &'static str,
        object: String,
        message: String,
    },
    #[error("libvirt failed to {action} {object}: {message}")]
    Call {
        action: &'static str,
        object: String,
        message: String,
    },
}

/// A libvirt host's QEMU for one architecture, as its libvirt describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostQemu {
    /// The system emulator's path on that host.
    pub emulator: std::path::PathBuf,
    /// The machine type the architecture's machine resolves to there, its QEMU's version in
    /// it (`pc-q35-7.2`, `virt-7.2`).
    pub machine: String,
}

/// The network filter that partitions a VM ([`Libvirt::set_partitioned`]): every frame to and
/// from its interface dropped on the host (no reset, no ICMP: TCP keeps waiting).
pub const PARTITION_FILTER: &str = "devicelab-partition";

const PARTITION_FILTER_XML: &str = r#"<filter name='devicelab-partition' chain='root'>
  <rule action='drop' direction='inout' priority='-1000'/>
</filter>"#;

/// A libvirt connection that survives a libvirtd restart: a dead connection is reopened on
/// the next call. Domains and pools are looked up by name per call, never held across calls,
/// since handles from a dead connection stay dead.
#[derive(Clone)]
pub struct Libvirt {
    conn: Arc<Mutex<Arc<Live>>>,
    /// The one attempt to open a connection in flight, if any: callers share it, so a hung
    /// libvirtd holds one thread, not one per call.
    opening: Arc<Mutex<Option<Arc<OpenAttempt>>>>,
    timeouts: LibvirtTimeouts,
    pub uri: String,
}

/// How long libvirt calls may wait on a libvirtd that does not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LibvirtTimeouts {
    /// How often the keepalive pings libvirtd, in seconds.
    pub keepalive_interval: i32,
    /// How many pings in a row may go unanswered before the connection is closed, failing the
    /// calls that wait on it (after about `interval × (count + 1)`).
    pub keepalive_count: u32,
    /// How long opening a connection may take (a hung libvirtd accepts it, never answers).
    pub open: Duration,
}

impl Default for LibvirtTimeouts {
    /// A ping every 5 s, 6 unanswered ones close the connection (virsh's own values: libvirtd
    /// answers pings from its event loop, even while its workers are busy); 20 s to open.
    fn default() -> Self {
        Self {
            keepalive_interval: 5,
            keepalive_count: 6,
            open: Duration::from_secs(20),
        }
    }
}

/// An open connection, and why libvirt closed it, once it has (a `VIR_CONNECT_CLOSE_REASON_*`;
/// -1 while open; `CLIENT` once a keepalive close was reported). Dropped: closed.
pub struct Live {
    conn: Connect,
    closed: Arc<std::sync::atomic::AtomicI32>,
    /// Whether the close callback is registered: libvirt holds the connection while it is, so
    /// it is unregistered first, or dropping would not close the connection.
    registered: bool,
}

impl Drop for Live {
    fn drop(&mut self) {
        if self.registered {
            // SAFETY: `conn` is open until its own drop, after this one; unregistering makes
            // libvirt call `release_reason` once (or not at all if it already did).
            unsafe {
                sys::virConnectUnregisterCloseCallback(self.conn.as_ptr(), Some(record_reason));
            }
        }
    }
}

impl std::ops::Deref for Live {
    type Target = Connect;
    fn deref(&self) -> &Connect {
        &self.conn
    }
}

impl Live {
    /// Whether libvirt's keepalive closed this connection (libvirtd stopped answering) and it
    /// was not said yet: true once.
    fn hung_news(&self, failure: &virt::error::Error) -> bool {
        let before = self.closed.swap(
            sys::VIR_CONNECT_CLOSE_REASON_CLIENT as i32,
            std::sync::atomic::Ordering::SeqCst,
        );
        before == sys::VIR_CONNECT_CLOSE_REASON_KEEPALIVE as i32
            || (before != sys::VIR_CONNECT_CLOSE_REASON_CLIENT as i32
                && failure.message().contains(KEEPALIVE_CLOSED))
    }
}

/// One attempt to open a connection, on a thread of its own; its outcome, once there.
struct OpenAttempt {
    started: std::time::Instant,
    outcome: Mutex<Option<Result<Arc<Live>, String>>>,
    done: std::sync::Condvar,
}

impl OpenAttempt {
    fn failed(&self) -> bool {
        matches!(
            *self.outcome.lock().unwrap_or_else(|p| p.into_inner()),
            Some(Err(_))
        )
    }
}

/// [`serial::tap`] on a connection of the console's own, its failure a
/// [`LibvirtError::Call`] naming the domain. Own, because a thread blocked reading a stream
/// holds its connection's I/O: every other call on that connection would wait for the
/// keepalive's next tick to be sent (up to its interval, 5 s, for a pause that takes
/// milliseconds).
fn tap(
    uri: &str,
    timeouts: LibvirtTimeouts,
    dom: &Domain,
    name: &str,
    serial_log: &std::path::Path,
) -> Result<(), LibvirtError> {
    // Opened within the budget, as every connection: a start never hangs on it.
    let own = connect(&Mutex::default(), uri, timeouts)?;
    let uuid = dom
        .uuid_string()
        .map_err(call_err("read the UUID of", name))?;
    let dom = own
        .lookup_domain_by_uuid_string(&uuid)
        .map_err(call_err("look up domain", name))?;
    serial::tap(&own, own.clone(), &dom, name, serial_log).map_err(|e| LibvirtError::Call {
        action: e.action,
        object: name.to_owned(),
        message: e.message,
    })
}

/// The name of the threads that open connections (at most one per [`Libvirt`] at a time for its
/// calls, and one per console being opened).
pub const OPEN_THREAD: &str = "dl-libvirt-open";

fn parse_network<'a>(xml: &'a str, name: &str) -> Result<roxmltree::Document<'a>, LibvirtError> {
    parse_xml(xml, "parse the XML of network", name)
}

fn parse_xml<'a>(
    xml: &'a str,
    action: &'static str,
    object: &str,
) -> Result<roxmltree::Document<'a>, LibvirtError> {
    roxmltree::Document::parse(xml).map_err(|e| LibvirtError::Call {
        action,
        object: object.to_owned(),
        message: e.to_string(),
    })
}

/// `<bridge stp='…'>` of a network's XML (libvirt's default is on), if libvirt makes the
/// bridge: no `<forward>`, or one of mode `nat`, `route` or `open`.
fn bridge_stp(doc: &roxmltree::Document) -> Option<bool> {
    let mode = doc
        .descendants()
        .find(|n| n.has_tag_name("forward"))
        .map(|f| f.attribute("mode").unwrap_or("nat"));
    if !matches!(mode, None | Some("nat" | "route" | "open")) {
        return None;
    }
    let stp = doc
        .descendants()
        .find(|n| n.has_tag_name("bridge"))
        .and_then(|b| b.attribute("stp"));
    Some(stp != Some("off"))
}

/// Runs `call` (a pause or a resume) and returns the middle of it: when the guest's vCPUs
/// stopped or ran again, off by at most half the call.
fn midpoint_of(
    call: impl FnOnce() -> Result<(), LibvirtError>,
) -> Result<SystemTime, LibvirtError> {
    let before = SystemTime::now();
    call()?;
    let took = SystemTime::now().duration_since(before).unwrap_or_default();
    Ok(before + took / 2)
}

pub(crate) fn call_err(
    action: &'static str,
    object: &str,
) -> impl FnOnce(virt::error::Error) -> LibvirtError {
    let object = object.to_owned();
    move |e| {
        let message = e.message().to_owned();
        if message.contains(KEEPALIVE_CLOSED) {
            LibvirtError::Hung {
                action,
                object,
                message,
            }
        } else {
            LibvirtError::Call {
                action,
                object,
                message,
            }
        }
    }
}

/// libvirt's own (English) wording when its keepalive closes a connection under a waiting
/// call; the connection's close reason says it in any locale (see [`Libvirt::conn`]).
const KEEPALIVE_CLOSED: &str = "keepalive timeout";

pub(crate) fn is_code(e: &virt::error::Error, code: ErrorNumber) -> bool {
    e.code() == Enum::Known(code)
}

impl Libvirt {
    /// Connects to libvirt at `uri` with the default [`LibvirtTimeouts`].
    pub fn open(uri: &str) -> Result<Self, LibvirtError> {
        Self::open_with(uri, LibvirtTimeouts::default())
    }

    /// Connects to libvirt at `uri`: within `timeouts.open`, or [`LibvirtError::NotAnswering`].
    /// A URI over a transport whose client stalls and crashes is refused before anything
    /// connects ([`LibvirtError::Refused`]).
    pub fn open_with(uri: &str, timeouts: LibvirtTimeouts) -> Result<Self, LibvirtError> {
        crate::host::remote::refuse_stalling_transport(uri)?;
        let opening = Arc::default();
        let live = connect(&opening, uri, timeouts)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(live)),
            opening,
            timeouts,
            uri: uri.to_owned(),
        })
    }

    /// The live connection, reopened first if libvirtd went away since the last call (a
    /// restart mid-trial); a clear error while it is still down, and
    /// [`LibvirtError::Hung`] if the keepalive closed it (libvirtd stopped answering).
    pub fn conn(&self) -> Result<Arc<Live>, LibvirtError> {
        // The lock only guards the swap: the round trip and a reconnect run without it, so
        // one slow call never holds up every other thread's libvirt calls.
        let current = self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone();
        // A round trip, not virConnectIsAlive: that says "alive" until a call has failed.
        match current.lib_version() {
            Ok(_) => return Ok(current),
            // Hung, not restarted: reported once, from the connection's close reason (any
            // locale); the calls after it try a new connection, within its budget.
            Err(e) if current.hung_news(&e) => {
                return Err(LibvirtError::Hung {
                    action: "reach",
                    object: format!("libvirtd at {}", self.uri),
                    message: e.message().to_owned(),
                });
            }
            Err(_) => {}
        }
        let fresh = connect(&self.opening, &self.uri, self.timeouts)?;
        let mut slot = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        // The connection given up on is dropped outside the lock (closing it is a call).
        let replaced = if Arc::ptr_eq(&slot, &current) {
            tracing::warn!(
                "the connection to libvirt at {} was lost; reconnected",
                self.uri
            );
            Some(std::mem::replace(&mut *slot, fresh))
        } else {
            None
        };
        let live = slot.clone();
        drop(slot);
        drop(replaced);
        Ok(live)
    }

    /// The domain called `name`, looked up afresh.
    pub fn domain(&self, name: &str) -> Result<Domain, LibvirtError> {
        self.conn()?
            .lookup_domain_by_name(name)
            .map_err(call_err("look up domain", name))
    }

    /// Whether a domain called `name` is defined (running or not).
    pub fn has_domain(&self, name: &str) -> Result<bool, LibvirtError> {
        match self.conn()?.lookup_domain_by_name(name) {
            Ok(_) => Ok(true),
            Err(e) if is_code(&e, ErrorNumber::NoDomain) => Ok(false),
            Err(e) => Err(call_err("look up domain", name)(e)),
        }
    }

    /// Runs a blocking libvirt call on tokio's blocking pool.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Libvirt) -> T + Send + 'static,
    ) -> T {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&this))
            .await
            .expect("libvirt task panicked")
    }

    /// The host's size as libvirt reports it: its active CPUs and its memory in MiB.
    pub fn node_size(&self) -> Result<(usize, u64), LibvirtError> {
        let info = self
            .conn()?
            .node_info()
            .map_err(call_err("read the node info of", &self.uri))?;
        Ok((info.cpus as usize, info.memory / 1024))
    }

    /// What this libvirt host says about running guests under KVM: its architecture and CPU
    /// features (the host's capabilities, the CPU's model expanded), and its domain
    /// capabilities for KVM guests of its own architecture.
    pub fn host_facts(&self) -> Result<crate::host::accel::HostFacts, LibvirtError> {
        let conn = self.conn()?;
        let caps = conn
            .capabilities()
            .map_err(call_err("read the capabilities of", &self.uri))?;
        let doc = parse_xml(&caps, "parse the capabilities of", &self.uri)?;
        let cpu = doc
            .descendants()
            .find(|n| n.has_tag_name("host"))
            .and_then(|h| h.children().find(|n| n.has_tag_name("cpu")));
        let host_arch = cpu
            .and_then(|c| c.children().find(|n| n.has_tag_name("arch")))
            .and_then(|a| a.text())
            .unwrap_or_default()
            .trim()
            .to_owned();
        // On x86_64, a CPU model stands for its features (AMD's models include svm):
        // expanded, every feature is listed.
        // (A libvirt that cannot expand it: the features it lists.)
        let listed = cpu.map_or("", |c| &caps[c.range()]);
        let expanded = cpu
            .filter(|_| host_arch == "x86_64")
            .and_then(|_| {
                conn.baseline_cpu(&[listed], sys::VIR_CONNECT_BASELINE_CPU_EXPAND_FEATURES)
                    .ok()
            })
            .unwrap_or_else(|| listed.to_owned());
        let cpu_virt = host_arch == "x86_64"
            && parse_xml(&expanded, "parse the CPU features of", &self.uri).is_ok_and(|d| {
                d.descendants().any(|f| {
                    f.has_tag_name("feature")
                        && f.attribute("policy") != Some("disable")
                        && matches!(f.attribute("name"), Some("vmx" | "svm"))
                })
            });
        let kvm = conn
            .domain_capabilities(None, Some(&host_arch), None, Some("kvm"), 0)
            .map(drop)
            .map_err(|e| e.message().to_owned());
        Ok(crate::host::accel::HostFacts {
            host_arch,
            cpu_virt,
            kvm,
        })
    }

    /// The QEMU system emulator this libvirt host runs `arch`'s guests with under `accel`, and
    /// the machine type it resolves `arch`'s (`q35`, `virt`) to, which carries that emulator's
    /// version (`pc-q35-7.2`): both from its domain capabilities.
    pub fn host_qemu(
        &self,
        arch: crate::model::arch::VmArchitecture,
        accel: crate::model::arch::Accelerator,
    ) -> Result<HostQemu, LibvirtError> {
        let conn = self.conn()?;
        let object = format!("{arch} guests on {}", self.uri);
        let caps = conn
            .domain_capabilities(
                None,
                Some(arch.name()),
                Some(arch.machine()),
                Some(match accel {
                    crate::model::arch::Accelerator::Kvm => "kvm",
                    crate::model::arch::Accelerator::Tcg => "qemu",
                }),
                0,
            )
            .map_err(call_err("read the domain capabilities for", &object))?;
        let doc = parse_xml(&caps, "parse the domain capabilities for", &object)?;
        let text = |tag: &str| {
            doc.root_element()
                .children()
                .find(|n| n.has_tag_name(tag))
                .and_then(|n| n.text())
                .map(|t| t.trim().to_owned())
                .ok_or_else(|| LibvirtError::Call {
                    action: "read the domain capabilities for",
                    object: object.clone(),
                    message: format!("they name no <{tag}>"),
                })
        };
        Ok(HostQemu {
            emulator: std::path::PathBuf::from(text("path")?),
            machine: text("machine")?,
        })
    }

    /// Does this host's QEMU start `arch`'s `virt` machine with `args`? Asked by starting a
    /// transient domain paused (its vCPUs never run) with `args` through `<qemu:commandline>`,
    /// destroyed at once, and by libvirt when this connection closes (a killed process leaves
    /// none). `Err` is QEMU's own complaint, as libvirt relays it.
    pub fn qemu_accepts(
        &self,
        arch: crate::model::arch::VmArchitecture,
        emulator: &std::path::Path,
        args: &[&str],
    ) -> Result<(), String> {
        static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Unique among this host's domains while it lives (two machines' processes may share
        // a pid, not also the nanosecond).
        let nanos = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let name = format!("devicelab-probe-{}-{nanos}-{n}", std::process::id());
        let xml = crate::host::domain_xml::probe_xml(&name, arch, emulator, args);
        let conn = self.conn().map_err(|e| e.to_string())?;
        let dom = conn
            .create_domain_xml(
                &xml,
                sys::VIR_DOMAIN_START_PAUSED | sys::VIR_DOMAIN_START_AUTODESTROY,
            )
            .map_err(|e| e.message().to_owned())?;
        if let Err(e) = dom.destroy() {
            tracing::warn!(
                "{name}: the probe domain stays (paused) until this connection to {} closes: {e}",
                self.uri
            );
        }
        Ok(())
    }

    /// The host's address on `network`: where guests reach services the harness runs.
    pub fn network_gateway(&self, name: &str) -> Result<Ipv4Addr, LibvirtError> {
        let xml = self.active_network_xml(name)?;
        let doc = parse_network(&xml, name)?;
        doc.descendants()
            .filter(|n| n.has_tag_name("ip"))
            .find_map(|n| n.attribute("address")?.parse::<Ipv4Addr>().ok())
            .ok_or_else(|| LibvirtError::NetworkWithoutIpv4 {
                name: name.to_owned(),
                uri: self.uri.clone(),
            })
    }

    /// Whether `network`'s bridge runs the spanning tree protocol (libvirt's `<bridge stp>`,
    /// on unless it says `off`), for a network whose bridge libvirt makes (NAT, routed,
    /// open or isolated); `None` for one on a bridge or device libvirt does not manage. With
    /// it on, the kernel holds every newly plugged interface for twice the bridge's forward
    /// delay, 2 s at least whatever `delay` says, before it passes traffic: a restored VM's
    /// interface is plugged at its restore.
    pub fn network_stp(&self, name: &str) -> Result<Option<bool>, LibvirtError> {
        let xml = self.active_network_xml(name)?;
        let doc = parse_network(&xml, name)?;
        Ok(bridge_stp(&doc))
    }

    /// The XML of `network`, which must exist and be active.
    fn active_network_xml(&self, name: &str) -> Result<String, LibvirtError> {
        let conn = self.conn()?;
        let net = conn.lookup_network_by_name(name).map_err(|e| {
            if is_code(&e, ErrorNumber::NoNetwork) {
                let available = conn
                    .list_all_networks(0)
                    .map(|nets| {
                        nets.iter()
                            .filter_map(|n| n.name().ok())
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default();
                LibvirtError::NoSuchNetwork {
                    name: name.to_owned(),
                    available: if available.is_empty() {
                        "none".into()
                    } else {
                        available
                    },
                }
            } else {
                call_err("look up network", name)(e)
            }
        })?;
        if !net.is_active().map_err(call_err("query network", name))? {
            return Err(LibvirtError::NetworkInactive {
                name: name.to_owned(),
                uri: self.uri.clone(),
            });
        }
        net.xml_desc(0).map_err(call_err("read network", name))
    }

    /// Defines the domain. A domain of the same name left by an older run is redefined when
    /// its XML differs (libvirt refuses to define over it, and starting it would boot the old
    /// definition); an identical one is reused. One whose owner, another process, still runs
    /// is never touched: [`LibvirtError::OwnedByLiveRun`].
    pub fn define(&self, name: &str, rendered: &RenderedDomain) -> Result<Domain, LibvirtError> {
        let conn = self.conn()?;
        match conn.lookup_domain_by_name(name) {
            Ok(existing) => {
                let defined = existing
                    .xml_desc(0)
                    .map_err(call_err("read domain", name))?;
                if let Some(owner) = crate::host::domain_xml::owner_of_defined(&defined)
                    && owner.pid != std::process::id()
                    && crate::support::process::is_alive(owner.pid, 0)
                {
                    return Err(LibvirtError::OwnedByLiveRun {
                        name: name.to_owned(),
                        run_id: owner.run_id,
                        pid: owner.pid,
                    });
                }
                if digest_of_defined(&defined).as_deref() == Some(rendered.digest.as_str()) {
                    tracing::info!(domain = name, "reusing the identical existing definition");
                    return Ok(existing);
                }
                tracing::warn!(
                    domain = name,
                    "a domain with this name has different XML: redefining it"
                );
                self.remove_domain(&existing, name)?;
            }
            Err(e) if is_code(&e, ErrorNumber::NoDomain) => {}
            Err(e) => return Err(call_err("look up domain", name)(e)),
        }
        conn.define_domain_xml(&rendered.xml)
            .map_err(call_err("define domain", name))
    }

    /// Powers off (if running) and undefines, NVRAM included: aarch64 domains cannot be
    /// undefined without the NVRAM flag.
    pub fn remove_domain(&self, dom: &Domain, name: &str) -> Result<(), LibvirtError> {
        self.power_off(dom, name)?;
        let flags = sys::VIR_DOMAIN_UNDEFINE_NVRAM
            | sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA;
        let undefined = match dom.undefine_flags(flags) {
            // A driver without these flags (libvirt's test driver) has no NVRAM, managed save
            // or snapshot to remove: a plain undefine is the same there.
            Err(e) if is_code(&e, ErrorNumber::InvalidArg) => dom.undefine(),
            other => other,
        };
        match undefined {
            Ok(()) => Ok(()),
            Err(e) if is_code(&e, ErrorNumber::NoDomain) => Ok(()),
            Err(e) => Err(call_err("undefine domain", name)(e)),
        }
    }

    /// Hard power off: like pulling the plug.
    pub fn power_off(&self, dom: &Domain, name: &str) -> Result<(), LibvirtError> {
        match dom.is_active() {
            Ok(true) => match dom.destroy() {
                Ok(()) => Ok(()),
                Err(e) if is_code(&e, ErrorNumber::OperationInvalid) => Ok(()), // already off
                Err(e) => Err(call_err("destroy domain", name)(e)),
            },
            Ok(false) => Ok(()),
            Err(e) if is_code(&e, ErrorNumber::NoDomain) => Ok(()),
            Err(e) => Err(call_err("query domain", name)(e)),
        }
    }

    /// Starts the domain with its serial console streamed into `serial_log` from its first
    /// byte: started paused, the console opened, then resumed.
    pub fn start(
        &self,
        dom: &Domain,
        name: &str,
        serial_log: &std::path::Path,
    ) -> Result<(), LibvirtError> {
        dom.create_with_flags(sys::VIR_DOMAIN_START_PAUSED)
            .map_err(call_err("start domain", name))?;
        self.resume_with_console(dom, name, serial_log).map(drop)
    }

    /// Resumes a domain started or restored paused, its serial console streamed into
    /// `serial_log` first; if either fails, the domain is destroyed (not left paused).
    /// Returns when the guest's vCPUs ran again: the middle of the resume call.
    pub fn resume_with_console(
        &self,
        dom: &Domain,
        name: &str,
        serial_log: &std::path::Path,
    ) -> Result<SystemTime, LibvirtError> {
        let resumed = tap(&self.uri, self.timeouts, dom, name, serial_log)
            .and_then(|()| midpoint_of(|| dom.resume().map_err(call_err("resume domain", name))));
        if resumed.is_err() {
            let _ = dom.destroy();
        }
        resumed
    }

    /// Pauses the running domain, then saves its memory and device state to `to` (libvirt's
    /// save): the domain stops, still defined; its disks are consistent with the saved memory.
    /// Returns when the guest's vCPUs (and so its clock) stopped: the middle of the pause call.
    pub fn pause_and_save(
        &self,
        dom: &Domain,
        name: &str,
        to: &std::path::Path,
    ) -> Result<SystemTime, LibvirtError> {
        let path = std::ffi::CString::new(to.as_os_str().as_encoded_bytes()).map_err(|_| {
            LibvirtError::Call {
                action: "save domain",
                object: name.to_owned(),
                message: format!("{} contains a NUL byte", to.display()),
            }
        })?;
        let paused = midpoint_of(|| dom.suspend().map_err(call_err("suspend domain", name)))?;
        // SAFETY: the domain pointer is valid for `dom`'s lifetime; the path outlives the call;
        // a null dxml keeps the domain's own XML. The `virt` crate does not wrap this call.
        let rc =
            unsafe { sys::virDomainSaveFlags(dom.as_ptr(), path.as_ptr(), std::ptr::null(), 0) };
        if rc < 0 {
            return Err(call_err("save domain", name)(
                virt::error::Error::last_error(),
            ));
        }
        Ok(paused)
    }

    /// Restores the domain saved in `from`, paused (see [`Libvirt::resume_with_console`]),
    /// records `owner` in its metadata and makes it persistent, so a power cycle (destroy,
    /// start) boots it again from its disk. Returns the domain and its defined XML.
    pub fn restore(
        &self,
        from: &std::path::Path,
        name: &str,
        owner: &crate::host::domain_xml::RunOwner,
    ) -> Result<(Domain, String), LibvirtError> {
        let conn = self.conn()?;
        let file = from.display().to_string();
        conn.restore_domain_flags(&file, None, sys::VIR_DOMAIN_SAVE_PAUSED)
            .map_err(call_err("restore domain", name))?;
        let dom = conn
            .lookup_domain_by_name(name)
            .map_err(call_err("look up domain", name))?;
        dom.set_metadata(
            sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
            Some(&crate::host::domain_xml::owner_element(owner)),
            Some("devicelab"),
            Some(crate::host::domain_xml::METADATA_NS),
            sys::VIR_DOMAIN_AFFECT_LIVE,
        )
        .map_err(call_err("record the owner of", name))?;
        let xml = dom
            .xml_desc(sys::VIR_DOMAIN_XML_INACTIVE | sys::VIR_DOMAIN_XML_SECURE)
            .map_err(call_err("read domain", name))?;
        conn.define_domain_xml(&xml)
            .map_err(call_err("define the restored domain", name))?;
        Ok((dom, xml))
    }

    /// The MACs that `network`'s DHCP server has leased `ip` to (unexpired leases).
    pub fn lease_holders(&self, network: &str, ip: Ipv4Addr) -> Result<Vec<String>, LibvirtError> {
        let net = self
            .conn()?
            .lookup_network_by_name(network)
            .map_err(call_err("look up network", network))?;
        let mut leases: *mut sys::virNetworkDHCPLeasePtr = std::ptr::null_mut();
        // SAFETY: `net` is valid for the call; libvirt allocates the array and each lease,
        // which are read here and freed with libvirt's own functions (the `virt` crate does
        // not wrap this call).
        let n =
            unsafe { sys::virNetworkGetDHCPLeases(net.as_ptr(), std::ptr::null(), &mut leases, 0) };
        if n < 0 {
            return Err(call_err("read the DHCP leases of", network)(
                virt::error::Error::last_error(),
            ));
        }
        let text = |p: *mut std::os::raw::c_char| {
            if p.is_null() {
                String::new()
            } else {
                // SAFETY: non-null strings in a lease are NUL-terminated, owned by the lease.
                unsafe { std::ffi::CStr::from_ptr(p) }
                    .to_string_lossy()
                    .into_owned()
            }
        };
        let mut holders = Vec::new();
        for i in 0..n as usize {
            // SAFETY: libvirt returned `n` valid lease pointers in `leases`.
            let lease = unsafe { *leases.add(i) };
            let (addr, mac) = unsafe { (text((*lease).ipaddr), text((*lease).mac)) };
            if addr.parse::<Ipv4Addr>().ok() == Some(ip) {
                holders.push(mac.to_ascii_lowercase());
            }
            unsafe { sys::virNetworkDHCPLeaseFree(lease) };
        }
        // SAFETY: the array itself was allocated by libvirt with malloc.
        unsafe { libc::free(leases.cast()) };
        Ok(holders)
    }

    /// Sets the link state of the domain's network interface, live: down is a pulled cable
    /// (the guest sees carrier loss), up plugs it back.
    pub fn set_link(&self, dom: &Domain, name: &str, up: bool) -> Result<(), LibvirtError> {
        let state = if up { "up" } else { "down" };
        change_interface(
            dom,
            name,
            (0, sys::VIR_DOMAIN_AFFECT_LIVE),
            "link",
            Some(&format!("<link state='{state}'/>")),
            "change the link state of",
        )
    }

    /// Cuts the domain's interface off (`on`) or lets it through again: the network filter
    /// [`PARTITION_FILTER`] referenced from the interface, in the domain's definition and, while
    /// it runs, live; so the partition lasts across the device's power cycles, as a network's
    /// does, can be healed while the device is off, and goes with the domain (libvirt removes
    /// an interface's filters with it: nothing is left on the host by a run that dies).
    /// Idempotent. Needs libvirt's nwfilter driver (ebtables where libvirtd runs).
    pub fn set_partitioned(&self, dom: &Domain, name: &str, on: bool) -> Result<(), LibvirtError> {
        if on {
            self.define_partition_filter()?;
        }
        let running = dom.is_active().map_err(call_err("read domain", name))?;
        let persistent = dom.is_persistent().map_err(call_err("read domain", name))?;
        let live = (0, sys::VIR_DOMAIN_AFFECT_LIVE);
        let defined = (
            sys::VIR_DOMAIN_XML_INACTIVE | sys::VIR_DOMAIN_XML_SECURE,
            sys::VIR_DOMAIN_AFFECT_CONFIG,
        );
        let changes = running
            .then_some(live)
            .into_iter()
            .chain(persistent.then_some(defined));
        let filterref = format!("<filterref filter='{PARTITION_FILTER}'/>");
        for change in changes {
            change_interface(
                dom,
                name,
                change,
                "filterref",
                on.then_some(filterref.as_str()),
                "change the network filter of",
            )?;
        }
        Ok(())
    }

    /// Whether the domain's interface references [`PARTITION_FILTER`] (live while it runs,
    /// else in its definition).
    pub fn is_partitioned(&self, dom: &Domain, name: &str) -> Result<bool, LibvirtError> {
        let xml = dom.xml_desc(0).map_err(call_err("read domain", name))?;
        Ok(element_text(&xml, "filterref").is_some_and(|f| {
            [
                format!("'{PARTITION_FILTER}'"),
                format!("\"{PARTITION_FILTER}\""),
            ]
            .iter()
            .any(|quoted| f.contains(quoted.as_str()))
        }))
    }

    /// How many network filters libvirt's nwfilter driver lists: an error where the driver is
    /// missing (a partition needs it).
    pub fn network_filters(&self) -> Result<usize, LibvirtError> {
        self.conn()?
            .conn
            .list_nw_filters()
            .map(|f| f.len())
            .map_err(call_err("list the network filters of", "this host"))
    }

    /// Defines [`PARTITION_FILTER`] on this host unless it is there (one definition serves
    /// every VM; it is the host's, like the storage pool).
    fn define_partition_filter(&self) -> Result<(), LibvirtError> {
        let live = self.conn()?;
        let no_driver = |e: virt::error::Error| LibvirtError::Call {
            action: "use the network filters of",
            object: "this host".into(),
            message: format!(
                "{e} (a partition needs libvirt's nwfilter driver: install and start \
                 virtnwfilterd, or a libvirtd built with it, and ebtables)"
            ),
        };
        let defined = live.conn.list_nw_filters().map_err(no_driver)?;
        if defined.iter().any(|f| f == PARTITION_FILTER) {
            return Ok(());
        }
        match live.conn.define_nwfilter_xml(PARTITION_FILTER_XML) {
            Ok(_filter) => Ok(()),
            Err(e) => {
                // Another process may have defined it meanwhile: that is what was wanted.
                let now = live.conn.list_nw_filters().map_err(no_driver)?;
                if now.iter().any(|f| f == PARTITION_FILTER) {
                    Ok(())
                } else {
                    Err(LibvirtError::Call {
                        action: "define the network filter",
                        object: PARTITION_FILTER.to_owned(),
                        message: e.to_string(),
                    })
                }
            }
        }
    }

    /// Pauses the whole domain (vCPUs stop; its clock stops with them) or resumes it.
    pub fn set_paused(&self, dom: &Domain, name: &str, paused: bool) -> Result<(), LibvirtError> {
        if paused {
            dom.suspend().map_err(call_err("suspend domain", name))
        } else {
            dom.resume().map_err(call_err("resume domain", name))
        }
    }

    /// The real-time clock the domain boots with from its next start: `offset_s` seconds from
    /// the host's (`None`: the host's UTC). A board without a battery-backed RTC comes back
    /// with a wrong clock after a power loss; this makes the VM do the same.
    pub fn set_rtc_offset(
        &self,
        dom: &Domain,
        name: &str,
        offset_s: Option<i64>,
    ) -> Result<(), LibvirtError> {
        let xml = dom
            .xml_desc(sys::VIR_DOMAIN_XML_INACTIVE | sys::VIR_DOMAIN_XML_SECURE)
            .map_err(call_err("read domain", name))?;
        let clock = match offset_s {
            None => "<clock offset='utc'/>".to_owned(),
            Some(s) => format!("<clock offset='variable' adjustment='{s}' basis='utc'/>"),
        };
        let range = element_range(&xml, "clock").ok_or_else(|| LibvirtError::Call {
            action: "find the clock of",
            object: name.to_owned(),
            message: "no <clock> in its XML".into(),
        })?;
        let changed = format!("{}{clock}{}", &xml[..range.start], &xml[range.end..]);
        self.conn()?
            .define_domain_xml(&changed)
            .map(drop)
            .map_err(call_err("redefine the clock of", name))
    }

    /// The guest's IPv4 address from the network's DHCP leases, if it has one yet.
    /// A lease is not readiness: after a power cycle the old lease is listed at once.
    pub fn lease_ipv4(&self, dom: &Domain, name: &str) -> Result<Option<Ipv4Addr>, LibvirtError> {
        let ifaces = dom
            .interface_addresses(sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, 0)
            .map_err(call_err("read DHCP leases of", name))?;
        Ok(ifaces
            .iter()
            .flat_map(|i| &i.addrs)
            .find_map(|a| a.addr.parse::<Ipv4Addr>().ok()))
    }
}

/// Where the first `<tag>` element of `xml` starts and ends (as text).
fn element_range(xml: &str, tag: &str) -> Option<std::ops::Range<usize>> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    Some(doc.descendants().find(|n| n.has_tag_name(tag))?.range())
}

/// The first `<tag>` element of `xml`, as text.
fn element_text(xml: &str, tag: &str) -> Option<String> {
    element_range(xml, tag).map(|r| xml[r].to_owned())
}

/// Changes the domain's network interface as read with `(read, affect)`'s XML flags and
/// applied with its update flags: its `<tag>` element removed, and `element` (if any) put in
/// its place (last in the interface).
fn change_interface(
    dom: &Domain,
    name: &str,
    (read, affect): (u32, u32),
    tag: &str,
    element: Option<&str>,
    action: &'static str,
) -> Result<(), LibvirtError> {
    let xml = dom.xml_desc(read).map_err(call_err("read domain", name))?;
    let iface = element_text(&xml, "interface").ok_or_else(|| LibvirtError::Call {
        action: "find the network interface of",
        object: name.to_owned(),
        message: "no <interface> in its XML".into(),
    })?;
    let mut changed = remove_element(&iface, tag);
    if let Some(element) = element {
        let at = changed.rfind("</interface>").unwrap_or(changed.len());
        changed.insert_str(at, &format!("{element}\n"));
    }
    dom.update_device_flags(&changed, affect)
        .map_err(call_err(action, name))
}

/// `xml` without its first `<tag>` element (unchanged if it has none).
fn remove_element(xml: &str, tag: &str) -> String {
    match element_range(xml, tag) {
        Some(r) => format!("{}{}", &xml[..r.start], &xml[r.end..]),
        None => xml.to_owned(),
    }
}

/// A new connection that answers, within the open budget: the attempt in flight if there is
/// one (a hung libvirtd holds one thread, and a caller arriving after the budget is spent fails
/// at once), else a new attempt on a thread of its own. One that finished while nobody waited
/// may have died since: it is checked, and replaced once.
fn connect(
    opening: &Mutex<Option<Arc<OpenAttempt>>>,
    uri: &str,
    timeouts: LibvirtTimeouts,
) -> Result<Arc<Live>, LibvirtError> {
    let live = connect_once(opening, uri, timeouts)?;
    if live.lib_version().is_ok() {
        return Ok(live);
    }
    connect_once(opening, uri, timeouts)
}

/// One attempt's connection (see [`connect`]).
fn connect_once(
    opening: &Mutex<Option<Arc<OpenAttempt>>>,
    uri: &str,
    timeouts: LibvirtTimeouts,
) -> Result<Arc<Live>, LibvirtError> {
    let attempt = {
        let mut slot = opening.lock().unwrap_or_else(|p| p.into_inner());
        match &*slot {
            // One still in flight, or done and not yet taken: shared. One that failed is not
            // reused: libvirtd may be back since.
            Some(attempt) if !attempt.failed() => attempt.clone(),
            _ => {
                let attempt = Arc::new(OpenAttempt {
                    started: std::time::Instant::now(),
                    outcome: Mutex::new(None),
                    done: std::sync::Condvar::new(),
                });
                let (mine, target) = (attempt.clone(), uri.to_owned());
                std::thread::Builder::new()
                    .name(OPEN_THREAD.into())
                    .spawn(move || {
                        let outcome = std::panic::catch_unwind(|| open_live(&target, timeouts))
                            .unwrap_or_else(|_| Err("opening the connection panicked".into()));
                        *mine.outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(outcome);
                        mine.done.notify_all();
                    })
                    .map_err(|e| LibvirtError::Connect {
                        uri: uri.to_owned(),
                        message: format!("no thread to open the connection on: {e}"),
                    })?;
                *slot = Some(attempt.clone());
                attempt
            }
        }
    };
    let deadline = attempt
        .started
        .checked_add(timeouts.open)
        .unwrap_or(attempt.started + Duration::from_secs(365 * 24 * 3600));
    let mut outcome = attempt.outcome.lock().unwrap_or_else(|p| p.into_inner());
    while outcome.is_none() {
        let now = std::time::Instant::now();
        if now >= deadline {
            return Err(LibvirtError::NotAnswering {
                uri: uri.to_owned(),
                what: "a new connection",
                waited: attempt.started.elapsed(),
            });
        }
        outcome = attempt
            .done
            .wait_timeout(outcome, deadline - now)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    let result = outcome.clone().expect("checked above");
    drop(outcome);
    // Done: the next reconnect starts an attempt of its own.
    let mut slot = opening.lock().unwrap_or_else(|p| p.into_inner());
    if slot.as_ref().is_some_and(|a| Arc::ptr_eq(a, &attempt)) {
        *slot = None;
    }
    result.map_err(|message| LibvirtError::Connect {
        uri: uri.to_owned(),
        message,
    })
}

/// Opens a connection (blocking, unbounded: [`connect`] bounds it), turns libvirt's
/// keepalive on for it and records why libvirt closes it.
fn open_live(uri: &str, timeouts: LibvirtTimeouts) -> Result<Arc<Live>, String> {
    // libvirt would otherwise print every error to stderr, including the expected ones.
    virt::error::clear_error_callback();
    event_loop();
    let conn = Connect::open(Some(uri)).map_err(|e| e.message().to_owned())?;
    let closed = Arc::new(std::sync::atomic::AtomicI32::new(-1));
    // The callback owns one count of `closed`, given back by `release_reason` (a driver
    // without close callbacks accepts the registration and never calls either: that count,
    // one integer, stays).
    let opaque = Arc::into_raw(closed.clone()) as *mut std::ffi::c_void;
    // SAFETY: `conn` is open; libvirt calls `record_reason` with `opaque` until the callback
    // is unregistered (`Live::drop`) or fires, then `release_reason` once.
    let registered = unsafe {
        sys::virConnectRegisterCloseCallback(
            conn.as_ptr(),
            Some(record_reason),
            opaque,
            Some(release_reason),
        )
    };
    if registered < 0 {
        // SAFETY: libvirt did not take it: the count is ours to give back.
        unsafe { release_reason(opaque) };
    }
    if let Err(e) = conn.set_keep_alive(timeouts.keepalive_interval, timeouts.keepalive_count) {
        tracing::warn!(
            "libvirt at {uri} refused keepalive ({}): a hung libvirtd would stall calls",
            e.message()
        );
    }
    Ok(Arc::new(Live {
        conn,
        closed,
        registered: registered >= 0,
    }))
}

/// libvirt's close callback: records why the connection closed.
unsafe extern "C" fn record_reason(
    _conn: sys::virConnectPtr,
    reason: std::os::raw::c_int,
    opaque: *mut std::ffi::c_void,
) {
    // SAFETY: `opaque` is the `Arc` given in `open_live`, alive until `release_reason`.
    let closed = unsafe { &*(opaque as *const std::sync::atomic::AtomicI32) };
    closed.store(reason, std::sync::atomic::Ordering::SeqCst);
}

/// Gives back the count of the close reason the callback held.
unsafe extern "C" fn release_reason(opaque: *mut std::ffi::c_void) {
    // SAFETY: made by `Arc::into_raw` in `open_live`, released once.
    drop(unsafe { Arc::from_raw(opaque as *const std::sync::atomic::AtomicI32) });
}

/// libvirt's default event loop, on a thread of its own for the life of the process: the
/// keepalive needs one to send its pings and notice they go unanswered.
fn event_loop() {
    static STARTED: Once = Once::new();
    STARTED.call_once(|| {
        if let Err(e) = virt::event::event_register_default_impl() {
            tracing::warn!(
                "libvirt's event loop could not be registered: {}",
                e.message()
            );
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("dl-libvirt-loop".into())
            .spawn(|| {
                let mut failed = false;
                loop {
                    if let Err(e) = virt::event::event_run_default_impl() {
                        if !failed {
                            tracing::warn!("libvirt's event loop failed: {}", e.message());
                            failed = true;
                        }
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("no thread for libvirt's event loop: {e}");
        }
    });
}
