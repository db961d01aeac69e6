//! The host a VM runs on: the libvirt connection ([`libvirt`]), the domain XML it is given
//! ([`domain_xml`]) and the network filter that partitions it, the storage pool ([`pool`]), the
//! cross-process VM slots ([`slots`]), the serial console streamed into its log ([`serial`]),
//! the SSH hop to a remote host ([`remote`]), the accelerator ([`accel`]) and QEMU's own probe
//! ([`qemu_probe`]), the host checks ([`doctor`]) and the reaper of what a dead run left
//! ([`reaper`]).
//!
//! Never imports `vm`, `agent`, `nats` or `trials`.

pub mod accel;
pub mod doctor;
pub mod domain_xml;
pub mod libvirt;
pub mod pool;
pub mod qemu_probe;
pub mod reaper;
pub mod remote;
pub mod serial;
pub mod slots;
