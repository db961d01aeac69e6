//! Helpers with no harness types, used by every layer above: probes with a budget
//! ([`probe`]), blocking cleanups on threads of their own ([`background`]), finding programs
//! ([`which`]), a loopback TCP relay a test can cut ([`relay`]). Imports nothing else of the
//! crate.

pub mod background;
pub mod lock;
pub mod probe;
pub mod process;
pub mod relay;
pub mod which;
