//! Where a VM's disk and firmware come from: the cloud image ([`source`]: a local file, or a
//! verified download cached by [`download`]) and the UEFI firmware for aarch64 ([`firmware`]).

pub mod download;
pub mod firmware;
pub mod source;

pub use source::{BaseImage, DiskFormat, ImageError, ImageSource};
