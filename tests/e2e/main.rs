//! shmlink's end-to-end tests: one binary, one module per concern, every
//! test against a real dbus-daemon and a real shmlinkd (see `shmlink_tests`).

mod access;
mod async_api;
mod bad_input;
mod bus_queues;
mod channels;
mod concurrency;
mod downstream;
mod echo;
mod freeze;
mod hostile;
mod hostile_server;
mod in_place;
mod introspection;
mod leaks;
mod liveness;
mod memory;
mod providers;
mod registry;
mod scale;
mod soak;
mod streaming;
mod systemd;
