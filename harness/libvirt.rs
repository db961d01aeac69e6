//! The libvirt connection: domains and networks through the `virt` crate. Every call here is a
//! blocking RPC; async code goes through [`Libvirt::run`], which moves it off the runtime.

use crate::domain_xml::{RenderedDomain, digest_of_defined};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
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
        "libvirt network {name:?} has no IPv4 address, so guests cannot reach services on the host"
    )]
    NetworkWithoutIpv4 { name: String },
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
    move |e| LibvirtError::Call {
        action,
        object,
        message: e.message().to_owned(),
    }
}

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
        if current.lib_version().is_ok() {
            return Ok(current);
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
            })
    }

    /// Defines the domain. A domain of the same name left by an older run is redefined when
    /// its XML differs (libvirt refuses to define over it, and starting it would boot the old
    /// definition); an identical one is reused.
    pub fn define(&self, name: &str, rendered: &RenderedDomain) -> Result<Domain, LibvirtError> {
        let conn = self.conn()?;
        match conn.lookup_domain_by_name(name) {
            Ok(existing) => {
                let defined = existing
                    .xml_desc(0)
                    .map_err(call_err("read domain", name))?;
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

fn connect(uri: &str) -> Result<Connect, LibvirtError> {
    // libvirt would otherwise print every error to stderr, including the expected ones.
    virt::error::clear_error_callback();
    Connect::open(Some(uri)).map_err(|e| LibvirtError::Connect {
        uri: uri.to_owned(),
        message: e.message().to_owned(),
    })
}
