//! The request's vocabulary, pure data: the architecture facts ([`arch`]), the request
//! ([`spec`]) and what it waits for ([`wait`]). Imports nothing else of the crate.

pub mod arch;
pub mod spec;
pub mod wait;
