//! The agent under test: what it is and how it is installed ([`description`]), devicelab's own
//! reference agent ([`mod@reference`]), building an agent's binary for the guest's architecture
//! ([`build`]) and onboarding it over SSH ([`onboard`]).

#[doc(hidden)]
pub mod build;
pub mod description;
#[doc(hidden)]
pub mod onboard;
pub mod reference;
