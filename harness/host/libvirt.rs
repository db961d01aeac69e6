//! The libvirt connection: domains and networks through the `virt` crate. Every call here is a
//! blocking RPC; async code goes through [`Libvirt::run`], which moves it off the runtime. No
//! call waits on a hung libvirtd for long: opening a connection has [`OPEN_BUDGET`], and every
//! call on an open one is ended by libvirt's keepalive ([`KEEPALIVE_INTERVAL`] ×
//! ([`KEEPALIVE_COUNT`] + 1) without an answer).

use crate::host::domain_xml::{RenderedDomain, digest_of_defined};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::enumutil::Enum;
use virt::error::ErrorNumber;
use virt::sys;

#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
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
        "libvirtd at {uri} did not answer {what} within {waited:?}: it is hung, not stopped \
         (a dead one refuses the connection); look at it (`systemctl status libvirtd`, its log, \
         `virsh -c {uri} list`) and restart it"
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

/// A libvirt connection that survives a libvirtd restart: a dead connection is reopened on
/// the next call. Domains and pools are looked up by name per call, never held across calls,
/// since handles from a dead connection stay dead.
#[derive(Clone)]
pub struct Libvirt {
    conn: Arc<Mutex<Arc<Connect>>>,
    pub uri: String,
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

/// libvirt's own wording when its keepalive closes a connection under a waiting call.
const KEEPALIVE_CLOSED: &str = "keepalive timeout";

/// How often libvirt pings libvirtd on a connection, in seconds.
pub const KEEPALIVE_INTERVAL: i32 = 5;
/// How many pings in a row may go unanswered before the connection is closed, failing the call
/// that waits on it.
pub const KEEPALIVE_COUNT: u32 = 3;
/// How long opening a connection may take: a hung libvirtd accepts it and never answers.
pub const OPEN_BUDGET: Duration = Duration::from_secs(20);

pub(crate) fn is_code(e: &virt::error::Error, code: ErrorNumber) -> bool {
    e.code() == Enum::Known(code)
}

impl Libvirt {
    pub fn open(uri: &str) -> Result<Self, LibvirtError> {
        Ok(Self {
            conn: Arc::new(Mutex::new(Arc::new(connect(uri)?))),
            uri: uri.to_owned(),
        })
    }

    /// The live connection, reopened first if libvirtd went away since the last call (a
    /// restart mid-trial); a clear error while it is still down.
    pub fn conn(&self) -> Result<Arc<Connect>, LibvirtError> {
        // The lock only guards the swap: the round trip and a reconnect run without it, so
        // one slow call never holds up every other thread's libvirt calls.
        let current = self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone();
        // A round trip, not virConnectIsAlive: that says "alive" until a call has failed.
        match current.lib_version() {
            Ok(_) => return Ok(current),
            // Hung, not restarted: a new connection would only wait out its own budget.
            Err(e) if e.message().contains(KEEPALIVE_CLOSED) => {
                return Err(call_err("reach libvirtd at", &self.uri)(e));
            }
            Err(_) => {}
        }
        let fresh = Arc::new(connect(&self.uri)?);
        let mut slot = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if Arc::ptr_eq(&slot, &current) {
            *slot = fresh;
            tracing::warn!(
                "the connection to libvirt at {} was lost; reconnected",
                self.uri
            );
        }
        Ok(slot.clone())
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

    /// The host's address on `network`: where guests reach services the harness runs.
    pub fn network_gateway(&self, name: &str) -> Result<Ipv4Addr, LibvirtError> {
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
        let xml = net.xml_desc(0).map_err(call_err("read network", name))?;
        let doc = roxmltree::Document::parse(&xml).map_err(|e| LibvirtError::Call {
            action: "parse the XML of network",
            object: name.to_owned(),
            message: e.to_string(),
        })?;
        doc.descendants()
            .filter(|n| n.has_tag_name("ip"))
            .find_map(|n| n.attribute("address")?.parse::<Ipv4Addr>().ok())
            .ok_or_else(|| LibvirtError::NetworkWithoutIpv4 {
                name: name.to_owned(),
                uri: self.uri.clone(),
            })
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
        match dom.undefine_flags(flags) {
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

    pub fn start(&self, dom: &Domain, name: &str) -> Result<(), LibvirtError> {
        dom.create().map_err(call_err("start domain", name))
    }

    /// Saves the running domain's memory and device state to `to` (libvirt's save): the
    /// domain stops, still defined; its disks are consistent with the saved memory.
    pub fn save(&self, dom: &Domain, name: &str, to: &std::path::Path) -> Result<(), LibvirtError> {
        let path = std::ffi::CString::new(to.as_os_str().as_encoded_bytes()).map_err(|_| {
            LibvirtError::Call {
                action: "save domain",
                object: name.to_owned(),
                message: format!("{} contains a NUL byte", to.display()),
            }
        })?;
        // SAFETY: the domain pointer is valid for `dom`'s lifetime; the path outlives the call;
        // a null dxml keeps the domain's own XML. The `virt` crate does not wrap this call.
        let rc =
            unsafe { sys::virDomainSaveFlags(dom.as_ptr(), path.as_ptr(), std::ptr::null(), 0) };
        if rc < 0 {
            return Err(call_err("save domain", name)(
                virt::error::Error::last_error(),
            ));
        }
        Ok(())
    }

    /// Restores the domain saved in `from` (running, as it was saved), records `owner` in its
    /// metadata and makes it persistent, so a power cycle (destroy, start) boots it again from
    /// its disk. Returns the defined XML.
    pub fn restore(
        &self,
        from: &std::path::Path,
        name: &str,
        owner: &crate::host::domain_xml::RunOwner,
        serial_log: &std::path::Path,
    ) -> Result<String, LibvirtError> {
        let conn = self.conn()?;
        let file = from.display().to_string();
        // The saved XML logs the console to the saved VM's own run dir; this clone logs to its
        // own (the rest of the XML must stay as saved: libvirt checks it is the same machine).
        let saved = conn
            .save_image_xml_desc(&file, sys::VIR_DOMAIN_SAVE_IMAGE_XML_SECURE)
            .map_err(call_err("read the saved XML of", name))?;
        let xml =
            crate::host::domain_xml::with_serial_log(&saved, serial_log).ok_or_else(|| {
                LibvirtError::Call {
                    action: "find the console log in the saved XML of",
                    object: name.to_owned(),
                    message: "no <serial><log file=...> element".into(),
                }
            })?;
        conn.restore_domain_flags(&file, Some(&xml), sys::VIR_DOMAIN_SAVE_RUNNING)
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
        Ok(xml)
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
        let xml = dom.xml_desc(0).map_err(call_err("read domain", name))?;
        let iface = element_text(&xml, "interface").ok_or_else(|| LibvirtError::Call {
            action: "find the network interface of",
            object: name.to_owned(),
            message: "no <interface> in its XML".into(),
        })?;
        let state = if up { "up" } else { "down" };
        let without = remove_element(&iface, "link");
        let at = without.rfind("</interface>").unwrap_or(without.len());
        let changed = format!(
            "{}<link state='{state}'/>\n{}",
            &without[..at],
            &without[at..]
        );
        dom.update_device_flags(&changed, sys::VIR_DOMAIN_AFFECT_LIVE)
            .map_err(call_err("change the link state of", name))
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

/// `xml` without its first `<tag>` element (unchanged if it has none).
fn remove_element(xml: &str, tag: &str) -> String {
    match element_range(xml, tag) {
        Some(r) => format!("{}{}", &xml[..r.start], &xml[r.end..]),
        None => xml.to_owned(),
    }
}

/// Opens a connection within [`OPEN_BUDGET`] and turns libvirt's keepalive on for it.
fn connect(uri: &str) -> Result<Connect, LibvirtError> {
    // libvirt would otherwise print every error to stderr, including the expected ones.
    virt::error::clear_error_callback();
    event_loop();
    // The open runs on a thread of its own, so a hung libvirtd costs the budget, not the
    // caller; a connection opened after the budget is closed when the thread's send fails.
    let (tx, rx) = std::sync::mpsc::channel();
    let target = uri.to_owned();
    let spawned = std::thread::Builder::new()
        .name("devicelab-libvirt-open".into())
        .spawn(move || {
            let _ = tx.send(Connect::open(Some(&target)));
        });
    let opened = match spawned {
        Ok(_) => rx
            .recv_timeout(OPEN_BUDGET)
            .map_err(|_| LibvirtError::NotAnswering {
                uri: uri.to_owned(),
                what: "a new connection",
                waited: OPEN_BUDGET,
            })?,
        Err(_) => Connect::open(Some(uri)),
    };
    let conn = opened.map_err(|e| LibvirtError::Connect {
        uri: uri.to_owned(),
        message: e.message().to_owned(),
    })?;
    if let Err(e) = conn.set_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT) {
        tracing::warn!(
            "libvirt at {uri} refused keepalive ({}): a hung libvirtd would stall calls",
            e.message()
        );
    }
    Ok(conn)
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
            .name("devicelab-libvirt-events".into())
            .spawn(|| {
                loop {
                    if let Err(e) = virt::event::event_run_default_impl() {
                        tracing::warn!("libvirt's event loop failed: {}", e.message());
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("no thread for libvirt's event loop: {e}");
        }
    });
}
