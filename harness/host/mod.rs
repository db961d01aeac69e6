//! The host a VM runs on: the libvirt connection ([`libvirt`]), the domain XML it is given
//! ([`domain_xml`]), the storage pool ([`pool`]), partitions ([`firewall`]), the cross-process
//! VM slots ([`slots`]), the accelerator ([`accel`]) and QEMU's own probe ([`qemu_probe`]), the
//! host checks ([`doctor`]) and the reaper of what a dead run left ([`reaper`]).
//!
//! Never imports `vm`, `agent`, `nats` or `trials`.

pub mod accel;
pub mod doctor;
pub mod domain_xml;
pub mod firewall;
pub mod libvirt;
pub mod pool;
pub mod qemu_probe;
pub mod reaper;
pub mod slots;
