//! SSH to a guest: the session with strict host-key trust ([`session`]), the keys the harness
//! generates ([`keys`]), logging in with a budget ([`login`]), and the route to a guest's ports,
//! direct or through its libvirt host ([`route`]).

pub mod keys;
pub mod login;
pub mod route;
pub mod session;

pub use route::Route;
pub use session::{ExecOutput, SshError, SshSession, SshTarget, shell_quote, user_systemctl};
