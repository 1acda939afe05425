//! The SimpleLocalnet-style master/slave runtime, on top of discovery.
//!
//! This module owns everything between a master and its slaves: [`transport`] (framed,
//! optionally Noise-encrypted TCP with keepalives), [`protocol`] (the session's frames,
//! node ids, job exits, and [`protocol::RemoteTable`]), [`slave`] (serving masters:
//! functions, command jobs, log redirection), [`master`] (connections to slaves, calls,
//! commands, termination) and [`backend`] (one call to set a node up, then slave or
//! master).

pub mod backend;
pub mod master;
pub mod protocol;
pub(crate) mod session;
pub mod slave;
pub mod transport;
