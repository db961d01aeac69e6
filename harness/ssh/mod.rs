//! SSH to a guest: the session with strict host-key trust ([`session`]), the keys the harness
//! generates ([`keys`]), and logging in with a budget ([`login`]).

pub mod keys;
pub mod login;
pub mod session;

pub use session::{ExecOutput, SshError, SshSession, SshTarget, shell_quote, user_systemctl};
