//! shmlink's end-to-end tests: one binary, one module per concern, every
//! test against a real dbus-daemon and a real shmlinkd (see `shmlink_tests`).

mod bad_input;
mod concurrency;
mod echo;
mod hostile;
mod introspection;
mod liveness;
mod streaming;
mod systemd;
