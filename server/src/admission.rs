//! The options every session shares, read the same way for every kind of
//! open: the rings' capacity and the wake-up mode.

use crate::accounting::Refusal;
use crate::service::Options;
use shmlink_interfaces::{limits, option, Wakeup};

/// The ring options of an open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RingOptions {
    /// Bytes per ring, rounded up as the rings are made (see
    /// [`shmlink_endpoint::rounded_capacity`]).
    pub capacity: u64,
    /// How each side waits.
    pub wakeup: Wakeup,
}

/// The ring options in `opts` (`capacity`, `wakeup`, `spin-us`), within
/// `max_capacity`.
pub(crate) fn ring_options(opts: &Options, max_capacity: u64) -> Result<RingOptions, Refusal> {
    let capacity = opts
        .u64(option::CAPACITY)?
        // A client that does not ask gets the default, or the maximum if that is lower.
        .unwrap_or(limits::DEFAULT_CAPACITY.min(max_capacity));
    if !(limits::MIN_CAPACITY..=max_capacity).contains(&capacity) {
        return Err(Refusal::InvalidCapacity(format!(
            "capacity {capacity} is not between {} and {} bytes",
            limits::MIN_CAPACITY,
            max_capacity
        )));
    }
    let mode = opts.string(option::WAKEUP)?;
    let spin_us = opts.u64(option::SPIN_US)?;
    let wakeup = Wakeup::from_parts(mode.as_deref(), spin_us)
        .map_err(|e| Refusal::InvalidOption(e.to_string()))?;
    Ok(RingOptions {
        capacity: shmlink_endpoint::rounded_capacity(capacity),
        wakeup,
    })
}
