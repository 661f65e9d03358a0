//! The shmlink broker as a library.
//!
//! A service author implements [`Service`] (and a [`SessionHandler`] per
//! session) and hands it to [`Daemon::create`]; the library owns the rest:
//! the D-Bus name and interfaces ([`daemon`]), the session table with its
//! limits and ownership ([`broker`]), and the event loop that moves bytes
//! through the shared-memory rings ([`engine`]). `shmlinkd` is this library
//! plus the built-in services in [`builtin`].
//!
//! ```no_run
//! use shmlink_server::{builtin, config::Config, daemon::{Bus, Daemon}};
//! let daemon = Daemon::create(&Bus::Session, Config::default(), builtin::all())?;
//! daemon.run(None)?;
//! # Ok::<(), shmlink_server::daemon::DaemonError>(())
//! ```
#![deny(missing_docs)]

pub mod broker;
pub mod builtin;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod service;
pub mod signals;
pub mod systemd;

pub use daemon::{Bus, Daemon};
pub use service::{Caller, Options, Outbox, Service, ServiceError, SessionHandler, SessionWaker};
