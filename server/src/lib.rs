//! The shmlink broker as a library.
//!
//! A service author implements [`Service`] (and a [`SessionHandler`] per
//! session) and hands it to [`Daemon::create`]; the library owns the rest:
//! the D-Bus name and interfaces, the accounting of sessions against the
//! limits of the [`config`], and the worker threads that move bytes through
//! the shared-memory rings. `shmlinkd` (its own crate) is this library plus
//! the built-in services in [`builtin`].
//!
//! ```no_run
//! use shmlink_server::{builtin, config::Config, Bus, Daemon};
//! let daemon = Daemon::create(&Bus::Session, Config::default(), builtin::all())?;
//! daemon.run(None)?;
//! # Ok::<(), shmlink_server::DaemonError>(())
//! ```
#![deny(missing_docs)]

mod accounting;
mod admission;
pub mod builtin;
pub mod config;
mod daemon;
mod dbus;
mod engine;
mod links;
mod log_bounds;
mod main_loop;
mod names;
mod provider;
mod service;
mod sessions;
pub mod signals;

pub use daemon::{Bus, Daemon, DaemonError};
pub use names::{Names, NamesError};
pub use provider::{
    Provider, ProviderBuilder, ProviderError, DEFAULT_OBJECT_PATH, PROVIDER_FD_RESERVE,
};

/// Locks `m`, going on with the data if a thread panicked while holding it:
/// a panicking session is ended alone, and the state it shares stays usable.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
pub use service::{
    prop, Caller, Charge, Memory, Message, Options, Outbox, Service, ServiceError, SessionHandler,
    SessionWaker, StateView,
};
/// A stretch of a message written in place (see [`Outbox::send_with`]).
pub use shmlink_endpoint::frame::Piece;
