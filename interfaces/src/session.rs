//! What a session is opened with, as plain data: the wake-up mode, the
//! negotiated parameters and who opened it; and what it carried. Their D-Bus encodings live in
//! the `dbus` feature (module `dict`).

use crate::{limits, option, wakeup};
use std::borrow::Cow;
use std::time::Duration;

/// Bytes of a caller-supplied string an error message quotes; the rest is
/// replaced by a marker that says how long it was.
const QUOTED: usize = 200;

/// `s` if it is at most `max` bytes, else its first `max` bytes (at a
/// character boundary) followed by a marker that says how long it was: how
/// a string a peer sent is quoted in an error or a log line.
pub fn cut(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…[cut: {} bytes in all]", &s[..end], s.len()))
}

/// How a blocked side waits for the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wakeup {
    /// Sleep on the eventfd right away (lowest CPU use).
    Park,
    /// Busy-poll the ring for up to this long before sleeping (lowest latency).
    Spin(Duration),
}

/// Why a `wakeup` / `spin-us` pair names no wake-up mode. `Display` gives
/// the text `OpenSession` refuses the options with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WakeupError {
    /// `spin-us` came with `wakeup` absent or `park`.
    SpinWithoutSpin,
    /// `spin-us` is above [`limits::MAX_SPIN_US`].
    SpinTooLong(u64),
    /// `wakeup` is neither `park` nor `spin`; the mode given, cut to 200 bytes.
    UnknownMode(String),
}

impl std::error::Error for WakeupError {}

impl std::fmt::Display for WakeupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WakeupError::SpinWithoutSpin => write!(
                f,
                "option {:?} needs {:?} = {:?}",
                option::SPIN_US,
                option::WAKEUP,
                wakeup::SPIN
            ),
            WakeupError::SpinTooLong(us) => write!(
                f,
                "option {:?} is {us}, above the maximum of {}",
                option::SPIN_US,
                limits::MAX_SPIN_US
            ),
            WakeupError::UnknownMode(mode) => write!(
                f,
                "option {:?} must be {:?} or {:?}, not {mode:?}",
                option::WAKEUP,
                wakeup::PARK,
                wakeup::SPIN
            ),
        }
    }
}

impl Wakeup {
    /// The mode that the `wakeup` string and `spin-us` value name: absent or
    /// `park` is [`Wakeup::Park`] (and takes no `spin-us`), `spin` is
    /// [`Wakeup::Spin`] for `spin-us` microseconds (default
    /// [`limits::DEFAULT_SPIN_US`], at most [`limits::MAX_SPIN_US`]).
    pub fn from_parts(mode: Option<&str>, spin_us: Option<u64>) -> Result<Wakeup, WakeupError> {
        match mode {
            None | Some(wakeup::PARK) => match spin_us {
                Some(_) => Err(WakeupError::SpinWithoutSpin),
                None => Ok(Wakeup::Park),
            },
            Some(wakeup::SPIN) => {
                let us = spin_us.unwrap_or(u64::from(limits::DEFAULT_SPIN_US));
                if us > u64::from(limits::MAX_SPIN_US) {
                    return Err(WakeupError::SpinTooLong(us));
                }
                Ok(Wakeup::Spin(Duration::from_micros(us)))
            }
            Some(other) => Err(WakeupError::UnknownMode(cut(other, QUOTED).into_owned())),
        }
    }

    /// The `wakeup` string of this mode: [`wakeup::PARK`] or [`wakeup::SPIN`].
    pub fn mode(self) -> &'static str {
        match self {
            Wakeup::Park => wakeup::PARK,
            Wakeup::Spin(_) => wakeup::SPIN,
        }
    }

    /// The `spin-us` of this mode: the spin budget in whole microseconds
    /// (saturating at `u32::MAX`), 0 in park mode.
    pub fn spin_us(self) -> u32 {
        match self {
            Wakeup::Park => 0,
            Wakeup::Spin(d) => u32::try_from(d.as_micros()).unwrap_or(u32::MAX),
        }
    }

    /// The mode as the pair [`Wakeup::from_parts`] reads: `wakeup` and `spin-us`
    /// (0 in park mode, as the parameters carry it).
    pub fn to_parts(self) -> (&'static str, u32) {
        (self.mode(), self.spin_us())
    }
}

/// What both sides of a session agreed on: the `parameters` dictionary of
/// the `OpenSession` reply and of `Provider1.AcceptSession`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionParameters {
    /// Largest message either side may send (`max-message`).
    pub max_message: u64,
    /// How both sides wait (`wakeup` and `spin-us`).
    pub wakeup: Wakeup,
}

/// Who opened a session, as the bus reported it.
#[derive(Clone, Debug)]
pub struct Caller {
    /// Unique bus name of the connection.
    pub bus_name: String,
    /// Unix user id.
    pub uid: u32,
    /// Process id (0 when the bus did not say).
    pub pid: u32,
    /// Unix group ids (primary and supplementary) when the bus reported them.
    pub gids: Vec<u32>,
}

/// What a session carried, as the broker counts it: the `BytesToServer`,
/// `MessagesToServer`, `BytesToClient` and `MessagesToClient` properties of
/// `org.shmlink.Session1`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Payload bytes the service received.
    pub bytes_to_server: u64,
    /// Messages the service received.
    pub messages_to_server: u64,
    /// Payload bytes the service queued for the client.
    pub bytes_to_client: u64,
    /// Messages the service queued for the client.
    pub messages_to_client: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn park_is_the_default_and_takes_no_spin_budget() {
        assert_eq!(Wakeup::from_parts(None, None), Ok(Wakeup::Park));
        assert_eq!(Wakeup::from_parts(Some("park"), None), Ok(Wakeup::Park));
        for mode in [None, Some("park")] {
            let e = Wakeup::from_parts(mode, Some(5)).expect_err("spin-us without spin");
            assert_eq!(e, WakeupError::SpinWithoutSpin);
            assert_eq!(
                e.to_string(),
                "option \"spin-us\" needs \"wakeup\" = \"spin\""
            );
        }
        // Zero is a value like any other.
        assert_eq!(
            Wakeup::from_parts(None, Some(0)),
            Err(WakeupError::SpinWithoutSpin)
        );
    }

    #[test]
    fn spin_takes_a_bounded_budget_with_a_default() {
        assert_eq!(
            Wakeup::from_parts(Some("spin"), None),
            Ok(Wakeup::Spin(Duration::from_micros(50)))
        );
        assert_eq!(
            Wakeup::from_parts(Some("spin"), Some(0)),
            Ok(Wakeup::Spin(Duration::ZERO))
        );
        assert_eq!(
            Wakeup::from_parts(Some("spin"), Some(10_000)),
            Ok(Wakeup::Spin(Duration::from_micros(10_000)))
        );
        let e = Wakeup::from_parts(Some("spin"), Some(10_001)).expect_err("too long");
        assert_eq!(e, WakeupError::SpinTooLong(10_001));
        assert_eq!(
            e.to_string(),
            "option \"spin-us\" is 10001, above the maximum of 10000"
        );
        let e = Wakeup::from_parts(Some("spin"), Some(u64::MAX)).expect_err("too long");
        assert_eq!(
            e.to_string(),
            format!(
                "option \"spin-us\" is {}, above the maximum of 10000",
                u64::MAX
            )
        );
    }

    #[test]
    fn an_unknown_mode_is_quoted_and_cut() {
        let e = Wakeup::from_parts(Some("doze"), None).expect_err("unknown");
        assert_eq!(
            e.to_string(),
            "option \"wakeup\" must be \"park\" or \"spin\", not \"doze\""
        );
        // Unknown wins over a spin-us it would otherwise refuse.
        assert_eq!(
            Wakeup::from_parts(Some("doze"), Some(1)),
            Err(WakeupError::UnknownMode("doze".into()))
        );
        let long = "é".repeat(150); // 300 bytes, a character boundary at 200
        let e = Wakeup::from_parts(Some(&long), None).expect_err("unknown");
        let quoted = format!("{}…[cut: 300 bytes in all]", "é".repeat(100));
        assert_eq!(e, WakeupError::UnknownMode(quoted.clone()));
        assert!(e.to_string().ends_with(&format!("not {quoted:?}")), "{e}");
        let odd = format!("x{}", "é".repeat(150)); // 301 bytes: 200 is inside a character
        let WakeupError::UnknownMode(m) = Wakeup::from_parts(Some(&odd), None).unwrap_err() else {
            panic!("unknown mode");
        };
        assert_eq!(m, format!("x{}…[cut: 301 bytes in all]", "é".repeat(99)));
    }

    #[test]
    fn parts_round_trip_through_the_parser() {
        assert_eq!(Wakeup::Park.to_parts(), ("park", 0));
        let spin = Wakeup::Spin(Duration::from_micros(200));
        assert_eq!(spin.to_parts(), ("spin", 200));
        assert_eq!(
            Wakeup::from_parts(Some(spin.mode()), Some(spin.spin_us().into())),
            Ok(spin)
        );
        assert_eq!(
            Wakeup::from_parts(Some(Wakeup::Park.mode()), None),
            Ok(Wakeup::Park)
        );
        // Sub-microsecond parts are dropped; budgets beyond u32 saturate.
        assert_eq!(Wakeup::Spin(Duration::from_nanos(1_999)).spin_us(), 1);
        assert_eq!(
            Wakeup::Spin(Duration::from_secs(1 << 40)).spin_us(),
            u32::MAX
        );
    }
}
