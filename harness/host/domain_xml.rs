//! Rendering the libvirt domain XML from fully resolved parameters: one template, no logic
//! beyond choosing the per-architecture fragments.

use crate::model::arch::Accelerator;
use crate::model::arch::VmArchitecture;
use sha2::{Digest, Sha256};
use std::path::PathBuf;

/// The TCG translation cache of an emulated guest, in MiB (QEMU's default is 1 GiB).
pub const TCG_TB_CACHE_MIB: u64 = 256;

/// Namespace of the `<metadata>` element that marks a domain as devicelab's.
pub const METADATA_NS: &str = "https://devicelab.dev/xmlns/run/1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainXmlParams {
    pub name: String,
    pub arch: VmArchitecture,
    pub accel: Accelerator,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub emulator: PathBuf,
    pub disk: PathBuf,
    pub seed: PathBuf,
    pub network: String,
    pub mac: String,
    pub uefi: Option<UefiPflash>,
    /// Extra QEMU arguments passed through `<qemu:commandline>`.
    pub qemu_args: Vec<String>,
    pub owner: RunOwner,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UefiPflash {
    pub code: PathBuf,
    pub vars: PathBuf,
}

/// Which harness run owns the domain: lets a later run reap what a killed one left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOwner {
    pub run_id: String,
    pub pid: u32,
}

/// The metadata element naming a domain's owner, as `Libvirt::restore` records it on a
/// restored domain (the run that restored it, not the one that saved it).
pub fn owner_element(owner: &RunOwner) -> String {
    format!(
        "<run run-id='{}' pid='{}'/>",
        xml_escape(&owner.run_id),
        owner.pid
    )
}

/// The rendered XML and the digest that identifies it (stored in the metadata, so a domain
/// left defined by an older run is recognised as different and redefined).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedDomain {
    pub xml: String,
    pub digest: String,
}

pub fn render(p: &DomainXmlParams) -> RenderedDomain {
    let without_digest = render_with_digest(p, "");
    let digest = hex::encode(Sha256::digest(without_digest.as_bytes()));
    RenderedDomain {
        xml: render_with_digest(p, &digest),
        digest,
    }
}

/// Finds the digest in XML read back from libvirt (which may requote attributes).
pub fn digest_of_defined(xml: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let digest = doc
        .descendants()
        .find(|n| n.has_tag_name((METADATA_NS, "run")))?
        .attribute("xml-sha256")?;
    (digest.len() == 64 && digest.chars().all(|c| c.is_ascii_hexdigit())).then(|| digest.to_owned())
}

/// The run a defined domain's metadata names as its owner, if any.
pub fn owner_of_defined(xml: &str) -> Option<RunOwner> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let run = doc
        .descendants()
        .find(|n| n.has_tag_name((METADATA_NS, "run")))?;
    Some(RunOwner {
        run_id: run.attribute("run-id")?.to_owned(),
        pid: run.attribute("pid")?.parse().ok()?,
    })
}

const QEMU_NS: &str = " xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'";

/// `args` passed to QEMU as they are, through `<qemu:commandline>` (empty without any).
fn qemu_commandline<S: AsRef<str>>(args: &[S]) -> String {
    if args.is_empty() {
        return String::new();
    }
    let args: String = args
        .iter()
        .map(|a| format!("    <qemu:arg value='{}'/>\n", xml_escape(a.as_ref())))
        .collect();
    format!("  <qemu:commandline>\n{args}  </qemu:commandline>\n")
}

/// A transient domain that asks a host's QEMU whether it starts `arch`'s machine with `args`
/// (started paused, no disk, no network: see `Libvirt::qemu_accepts`).
pub fn probe_xml(
    name: &str,
    arch: VmArchitecture,
    emulator: &std::path::Path,
    args: &[&str],
) -> String {
    format!(
        r#"<domain type='qemu'{QEMU_NS}>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='{arch}' machine='{machine}'>hvm</type>
  </os>
  <devices>
    <emulator>{emulator}</emulator>
  </devices>
{commandline}</domain>
"#,
        name = xml_escape(name),
        arch = arch.name(),
        machine = arch.machine(),
        emulator = xml_escape(&emulator.display().to_string()),
        commandline = qemu_commandline(args),
    )
}

fn render_with_digest(p: &DomainXmlParams, digest: &str) -> String {
    let e = |s: &str| xml_escape(s);
    let path = |p: &PathBuf| xml_escape(&p.display().to_string());
    let qemu_ns = if p.qemu_args.is_empty() { "" } else { QEMU_NS };
    let loader = match &p.uefi {
        Some(fw) => format!(
            "    <loader readonly='yes' type='pflash'>{}</loader>\n    <nvram>{}</nvram>\n",
            path(&fw.code),
            path(&fw.vars)
        ),
        None => String::new(),
    };
    let mut features = match p.arch {
        VmArchitecture::X86_64 => "<acpi/>\n    <apic/>",
        VmArchitecture::Aarch64 => "<acpi/>",
    }
    .to_owned();
    if p.accel == Accelerator::Tcg {
        // QEMU's translation cache is 1 GiB by default, resident once filled: capped, a TCG
        // guest costs about its RAM plus this much of the host's memory.
        features += &format!(
            "\n    <tcg>\n      <tb-cache unit='MiB'>{TCG_TB_CACHE_MIB}</tb-cache>\n    </tcg>"
        );
    }
    let cpu = match (p.arch, p.accel) {
        (VmArchitecture::X86_64, Accelerator::Kvm) => "<cpu mode='host-model'/>",
        (VmArchitecture::Aarch64, Accelerator::Kvm) => "<cpu mode='host-passthrough'/>",
        (VmArchitecture::X86_64, Accelerator::Tcg) => {
            "<cpu mode='custom' match='exact' check='none'>\n    <model fallback='forbid'>qemu64</model>\n  </cpu>"
        }
        (VmArchitecture::Aarch64, Accelerator::Tcg) => {
            "<cpu mode='custom' match='exact' check='none'>\n    <model fallback='forbid'>max</model>\n  </cpu>"
        }
    };
    // A generation ID (x86_64: QEMU has no such device for aarch64): libvirt gives a domain a
    // new one at each restore from a saved image, and a guest kernel with the vmgenid driver
    // reseeds its random number generator on the change, so clones of one saved VM do not
    // share the generator's state.
    let genid = match p.arch {
        VmArchitecture::X86_64 => "  <genid/>\n",
        VmArchitecture::Aarch64 => "",
    };
    let qemu_commandline = qemu_commandline(&p.qemu_args);
    format!(
        r#"<domain type='{domain_type}'{qemu_ns}>
  <name>{name}</name>
{genid}  <metadata>
    <devicelab:run xmlns:devicelab='{METADATA_NS}' run-id='{run_id}' pid='{pid}' xml-sha256='{digest}'/>
  </metadata>
  <memory unit='MiB'>{memory}</memory>
  <vcpu placement='static'>{vcpus}</vcpu>
  <os>
    <type arch='{arch}' machine='{machine}'>hvm</type>
{loader}    <boot dev='hd'/>
  </os>
  <features>
    {features}
  </features>
  {cpu}
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{emulator}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{seed}'/>
      <target dev='vdb' bus='virtio'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='{mac}'/>
      <source network='{network}'/>
      <model type='virtio'/>
    </interface>
    <serial type='pty'>
      <target port='0'/>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
    <rng model='virtio'>
      <backend model='random'>/dev/urandom</backend>
    </rng>
  </devices>
{qemu_commandline}</domain>
"#,
        domain_type = p.accel.domain_type(),
        name = e(&p.name),
        run_id = e(&p.owner.run_id),
        pid = p.owner.pid,
        memory = p.memory_mib,
        vcpus = p.vcpus,
        arch = p.arch.name(),
        machine = p.arch.machine(),
        emulator = path(&p.emulator),
        disk = path(&p.disk),
        seed = path(&p.seed),
        mac = e(&p.mac),
        network = e(&p.network),
    )
}

/// Escapes a value for the XML templates (paths, names, arguments).
pub(crate) fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// A locally administered MAC (QEMU's 52:54:00 prefix) derived from `id`: the harness passes
/// each instance's own id, so a reused VM name never inherits an old lease.
pub fn mac_for(name: &str) -> String {
    let h = Sha256::digest(name.as_bytes());
    format!("52:54:00:{:02x}:{:02x}:{:02x}", h[0], h[1], h[2])
}
