//! The SimpleLocalnet-style master/slave runtime, on top of discovery.
//!
//! This module owns everything between a master and its slaves: [`transport`] (framed,
//! optionally Noise-encrypted TCP with keepalives), `session` (one framed connection
//! for either end: frames in within a deadline, frames out, keepalives), [`protocol`]
//! (the session's frames, node ids, job exits), [`functions`] ([`functions::RemoteTable`]),
//! [`slave`] (serving masters), `jobs` (a slave's command jobs, their input and output),
//! `files` (files a master puts on or gets from a slave),
//! [`logs`] (a slave's log lines redirected to a master), [`master`] (connections to
//! slaves, calls, commands, termination) and [`backend`] (one call to set a node up,
//! then slave or master).

pub mod backend;
pub(crate) mod files;
pub mod functions;
pub(crate) mod jobs;
pub mod logs;
pub mod master;
pub mod protocol;
pub(crate) mod session;
pub mod slave;
pub mod transport;
