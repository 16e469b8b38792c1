//! One provider, seen from the gateway: its definition ([`provider`]), its health (circuits,
//! probes, quotas), how its host resolves, what is retried, and the supervisor of `spawn:`
//! sidecars.
//!
//! Imports: the plugins crate and `metrics`; never `config` (config builds these types), nor
//! `routing` or `proxy` (which use them).

pub mod exchange;
pub mod health;
pub mod provider;
pub mod resolve;
pub mod retry;
pub mod supervisor;
pub mod tokenize;
