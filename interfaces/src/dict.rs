//! The contract's `a{sv}` dictionaries: typed reads of one value, the
//! `parameters` dictionary ([`SessionParameters`]) and the `caller`
//! dictionary of `AcceptSession` ([`Caller`]), each encoded and decoded here
//! once.

use crate::{caller, param, wakeup, Caller, SessionParameters, Wakeup, WakeupError};
use dbus::arg::{PropMap, RefArg, Variant};

/// A dictionary value of the wrong type. `Display` gives the text
/// `OpenSession` refuses an option with.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// A signed integer below zero where an unsigned one was expected.
    #[error("option {key:?} must not be negative")]
    Negative {
        /// The key.
        key: String,
    },
    /// Not an integer where an unsigned one was expected.
    #[error("option {key:?} must be an unsigned integer (t or u), got type {signature:?}")]
    NotUnsigned {
        /// The key.
        key: String,
        /// The value's D-Bus signature.
        signature: String,
    },
    /// Not a string (`s`) where one was expected.
    #[error("option {key:?} must be a string (s), got type {signature:?}")]
    NotString {
        /// The key.
        key: String,
        /// The value's D-Bus signature.
        signature: String,
    },
}

/// The unsigned integer at `key`, if present: `t`, `u`, `q` or `y`, or a
/// non-negative `x`, `i` or `n` (integer options take any such type).
pub fn get_u64(dict: &PropMap, key: &str) -> Result<Option<u64>, ValueError> {
    let Some(v) = dict.get(key) else {
        return Ok(None);
    };
    let inner = &v.0;
    let sig = inner.signature();
    match &*sig {
        "t" | "u" | "q" | "y" => Ok(inner.as_u64()),
        "x" | "i" | "n" => match inner.as_i64() {
            Some(n) if n >= 0 => Ok(Some(n as u64)),
            _ => Err(ValueError::Negative { key: key.into() }),
        },
        other => Err(ValueError::NotUnsigned {
            key: key.into(),
            signature: other.into(),
        }),
    }
}

/// The string (`s`) at `key`, if present.
pub fn get_string(dict: &PropMap, key: &str) -> Result<Option<String>, ValueError> {
    let Some(v) = dict.get(key) else {
        return Ok(None);
    };
    match v.0.as_str() {
        Some(s) if &*v.0.signature() == "s" => Ok(Some(s.to_owned())),
        _ => Err(ValueError::NotString {
            key: key.into(),
            signature: v.0.signature().to_string(),
        }),
    }
}

/// A dictionary value.
fn prop<T: RefArg + 'static>(v: T) -> Variant<Box<dyn RefArg>> {
    Variant(Box::new(v))
}

/// Why a `parameters` dictionary was refused. `Display` gives the reason
/// without saying whose parameters they were: a receiver prefixes its own
/// context, and maps [`ParametersError::MaxMessageAbove`] to its own limit
/// error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParametersError {
    /// A value of the wrong type.
    Value(ValueError),
    /// A required key is missing.
    Missing(&'static str),
    /// `max-message` is above the receiver's limit.
    MaxMessageAbove {
        /// The `max-message` offered.
        max: u64,
        /// The receiver's limit.
        limit: u64,
    },
    /// `wakeup` and `spin-us` name no wake-up mode.
    Wakeup(WakeupError),
}

impl std::error::Error for ParametersError {}

impl std::fmt::Display for ParametersError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParametersError::Value(e) => e.fmt(f),
            ParametersError::Missing(key) => write!(f, "{key:?} is missing"),
            ParametersError::MaxMessageAbove { max, limit } => write!(
                f,
                "{} {max} is above the limit of {limit}",
                param::MAX_MESSAGE
            ),
            ParametersError::Wakeup(WakeupError::SpinTooLong(us)) => write!(
                f,
                "{} {us} is above the maximum of {}",
                param::SPIN_US,
                crate::limits::MAX_SPIN_US
            ),
            ParametersError::Wakeup(WakeupError::UnknownMode(mode)) => write!(
                f,
                "{} must be {:?} or {:?}, not {mode:?}",
                param::WAKEUP,
                wakeup::PARK,
                wakeup::SPIN
            ),
            ParametersError::Wakeup(e) => e.fmt(f),
        }
    }
}

impl From<ValueError> for ParametersError {
    fn from(e: ValueError) -> Self {
        ParametersError::Value(e)
    }
}

impl SessionParameters {
    /// The `parameters` dictionary: `max-message` (`t`), `wakeup` (`s`) and
    /// `spin-us` (`u`, 0 in park mode).
    pub fn to_dict(&self) -> PropMap {
        let (mode, spin_us) = self.wakeup.to_parts();
        let mut d = PropMap::new();
        d.insert(param::MAX_MESSAGE.into(), prop(self.max_message));
        d.insert(param::WAKEUP.into(), prop(mode.to_owned()));
        d.insert(param::SPIN_US.into(), prop(spin_us));
        d
    }

    /// Reads a `parameters` dictionary, in this order: `max-message`
    /// (required, an unsigned integer, at most `max_message_limit`),
    /// `wakeup` and `spin-us` (typed as options are), then the mode as
    /// [`Wakeup::from_parts`] reads it, except that `spin-us` counts only in spin
    /// mode (park mode carries 0). Other keys are ignored.
    pub fn from_dict(
        dict: &PropMap,
        max_message_limit: u64,
    ) -> Result<SessionParameters, ParametersError> {
        let max_message = get_u64(dict, param::MAX_MESSAGE)?
            .ok_or(ParametersError::Missing(param::MAX_MESSAGE))?;
        if max_message > max_message_limit {
            return Err(ParametersError::MaxMessageAbove {
                max: max_message,
                limit: max_message_limit,
            });
        }
        let mode = get_string(dict, param::WAKEUP)?;
        let spin_us =
            get_u64(dict, param::SPIN_US)?.filter(|_| mode.as_deref() == Some(wakeup::SPIN));
        let wakeup =
            Wakeup::from_parts(mode.as_deref(), spin_us).map_err(ParametersError::Wakeup)?;
        Ok(SessionParameters {
            max_message,
            wakeup,
        })
    }
}

/// A `caller` dictionary without one of its keys, or with a value of the
/// wrong type. `Display` gives the reason; the receiver prefixes its context
/// (the provider runtime: `AcceptSession caller: `).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{key:?} must be present with type {signature}")]
pub struct CallerError {
    /// The key.
    pub key: &'static str,
    /// The type it must have.
    pub signature: &'static str,
}

impl Caller {
    /// The `caller` dictionary of `AcceptSession`: `uid` (`u`), `pid` (`u`),
    /// `gids` (`au`), `bus-name` (`s`).
    pub fn to_dict(&self) -> PropMap {
        let mut d = PropMap::new();
        d.insert(caller::UID.into(), prop(self.uid));
        d.insert(caller::PID.into(), prop(self.pid));
        d.insert(caller::GIDS.into(), prop(self.gids.clone()));
        d.insert(caller::BUS_NAME.into(), prop(self.bus_name.clone()));
        d
    }

    /// Reads a `caller` dictionary: all four keys required, each with
    /// exactly its type (checked in the order `bus-name`, `gids`, `uid`,
    /// `pid`). Other keys are ignored.
    pub fn from_dict(dict: &PropMap) -> Result<Caller, CallerError> {
        let bad = |key, signature| CallerError { key, signature };
        let get = |key: &str, signature: &str| {
            dict.get(key)
                .map(|v| &v.0)
                .filter(|v| &*v.signature() == signature)
        };
        let u32_of = |key| {
            get(key, "u")
                .and_then(|v| v.as_u64())
                .map(|n| n as u32)
                .ok_or_else(|| bad(key, "u"))
        };
        let bus_name = get(caller::BUS_NAME, "s")
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad(caller::BUS_NAME, "s"))?
            .to_owned();
        let gids = get(caller::GIDS, "au")
            .and_then(|v| v.as_iter())
            .ok_or_else(|| bad(caller::GIDS, "au"))?
            .filter_map(|g| g.as_u64().map(|g| g as u32))
            .collect();
        Ok(Caller {
            bus_name,
            uid: u32_of(caller::UID)?,
            pid: u32_of(caller::PID)?,
            gids,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn dict(pairs: Vec<(&str, Box<dyn RefArg>)>) -> PropMap {
        pairs
            .into_iter()
            .map(|(k, v)| (k.to_owned(), Variant(v)))
            .collect()
    }

    #[test]
    fn integers_of_any_unsigned_or_non_negative_type() {
        let d = dict(vec![
            ("t", Box::new(1u64)),
            ("u", Box::new(2u32)),
            ("q", Box::new(3u16)),
            ("y", Box::new(4u8)),
            ("x", Box::new(5i64)),
            ("i", Box::new(6i32)),
            ("n", Box::new(7i16)),
            ("neg", Box::new(-1i32)),
            ("s", Box::new("8".to_owned())),
        ]);
        for (k, n) in [
            ("t", 1),
            ("u", 2),
            ("q", 3),
            ("y", 4),
            ("x", 5),
            ("i", 6),
            ("n", 7),
        ] {
            assert_eq!(get_u64(&d, k), Ok(Some(n)), "{k}");
        }
        assert_eq!(get_u64(&d, "absent"), Ok(None));
        assert_eq!(
            get_u64(&d, "neg").unwrap_err().to_string(),
            "option \"neg\" must not be negative"
        );
        assert_eq!(
            get_u64(&d, "s").unwrap_err().to_string(),
            "option \"s\" must be an unsigned integer (t or u), got type \"s\""
        );
        assert_eq!(get_string(&d, "s"), Ok(Some("8".into())));
        assert_eq!(get_string(&d, "absent"), Ok(None));
        assert_eq!(
            get_string(&d, "u").unwrap_err().to_string(),
            "option \"u\" must be a string (s), got type \"u\""
        );
    }

    #[test]
    fn parameters_have_their_wire_types_and_round_trip() {
        for wakeup in [Wakeup::Park, Wakeup::Spin(Duration::from_micros(200))] {
            let p = SessionParameters {
                max_message: 1 << 20,
                wakeup,
            };
            let d = p.to_dict();
            assert_eq!(d.len(), 3);
            let sig = |k: &str| d[k].0.signature().to_string();
            assert_eq!(
                (sig("max-message"), sig("wakeup"), sig("spin-us")),
                ("t".into(), "s".into(), "u".into())
            );
            assert_eq!(d["max-message"].0.as_u64(), Some(1 << 20));
            assert_eq!(d["wakeup"].0.as_str(), Some(wakeup.mode()));
            assert_eq!(d["spin-us"].0.as_u64(), Some(wakeup.spin_us().into()));
            assert_eq!(SessionParameters::from_dict(&d, 1 << 20), Ok(p));
        }
        assert_eq!(
            SessionParameters {
                max_message: 1,
                wakeup: Wakeup::Park
            }
            .to_dict()["spin-us"]
                .0
                .as_u64(),
            Some(0),
            "park mode carries spin-us 0"
        );
    }

    /// The refusal of `d` as the provider runtime words it.
    fn refusal(d: &PropMap, limit: u64) -> String {
        format!(
            "AcceptSession parameters: {}",
            SessionParameters::from_dict(d, limit).unwrap_err()
        )
    }

    #[test]
    fn parameters_are_checked_in_order() {
        let good = || {
            dict(vec![
                ("max-message", Box::new(4096u64)),
                ("wakeup", Box::new("spin".to_owned())),
                ("spin-us", Box::new(20u32)),
            ])
        };
        // Defaults and leniencies: no wakeup is park, spin-us beside park
        // means nothing, spin without spin-us is the default budget, extra
        // keys are ignored, integer types as for options.
        let mut d = dict(vec![("max-message", Box::new(4096u32))]);
        let p = SessionParameters::from_dict(&d, 4096).expect("minimal");
        assert_eq!((p.max_message, p.wakeup), (4096, Wakeup::Park));
        d.insert("spin-us".into(), prop(99_999u32));
        d.insert("other".into(), prop(true));
        assert_eq!(
            SessionParameters::from_dict(&d, 4096).map(|p| p.wakeup),
            Ok(Wakeup::Park)
        );
        d.insert("wakeup".into(), prop("spin".to_owned()));
        d.remove("spin-us");
        assert_eq!(
            SessionParameters::from_dict(&d, 4096).map(|p| p.wakeup),
            Ok(Wakeup::Spin(Duration::from_micros(50)))
        );

        let mut d = good();
        d.remove("max-message");
        assert_eq!(
            refusal(&d, 4096),
            "AcceptSession parameters: \"max-message\" is missing"
        );
        let mut d = good();
        d.insert("max-message".into(), prop("big".to_owned()));
        assert_eq!(
            refusal(&d, 4096),
            "AcceptSession parameters: option \"max-message\" must be an unsigned integer (t or u), got type \"s\""
        );
        // The limit comes before anything about the wake-up mode.
        let mut d = good();
        d.insert("wakeup".into(), prop("doze".to_owned()));
        assert_eq!(
            SessionParameters::from_dict(&d, 4095),
            Err(ParametersError::MaxMessageAbove {
                max: 4096,
                limit: 4095
            })
        );
        assert_eq!(
            refusal(&d, 4095),
            "AcceptSession parameters: max-message 4096 is above the limit of 4095"
        );
        assert_eq!(
            refusal(&d, 4096),
            "AcceptSession parameters: wakeup must be \"park\" or \"spin\", not \"doze\""
        );
        // Types of both before the mode.
        d.insert("spin-us".into(), prop("x".to_owned()));
        assert_eq!(
            refusal(&d, 4096),
            "AcceptSession parameters: option \"spin-us\" must be an unsigned integer (t or u), got type \"s\""
        );
        d.insert("wakeup".into(), prop(1u32));
        assert_eq!(
            refusal(&d, 4096),
            "AcceptSession parameters: option \"wakeup\" must be a string (s), got type \"u\""
        );
        let mut d = good();
        d.insert("spin-us".into(), prop(10_001u64));
        assert_eq!(
            refusal(&d, 4096),
            "AcceptSession parameters: spin-us 10001 is above the maximum of 10000"
        );
        let mut d = good();
        d.insert("wakeup".into(), prop("x".repeat(201)));
        assert!(
            refusal(&d, 4096).ends_with(&format!(
                "not \"{}…[cut: 201 bytes in all]\"",
                "x".repeat(200)
            )),
            "{}",
            refusal(&d, 4096)
        );
    }

    #[test]
    fn the_caller_dictionary_is_typed() {
        let c = Caller {
            bus_name: ":1.9".into(),
            uid: 1000,
            pid: 42,
            gids: vec![1000, 27],
        };
        let mut d = c.to_dict();
        assert_eq!(d.len(), 4);
        let sig = |d: &PropMap, k: &str| d[k].0.signature().to_string();
        assert_eq!(
            ["uid", "pid", "gids", "bus-name"].map(|k| sig(&d, k)),
            ["u", "u", "au", "s"].map(String::from)
        );
        let back = Caller::from_dict(&d).expect("typed");
        assert_eq!(
            (back.uid, back.pid, back.gids, back.bus_name),
            (1000, 42, vec![1000, 27], ":1.9".to_owned())
        );

        d.insert(caller::UID.into(), prop(1000u64));
        let e = Caller::from_dict(&d).expect_err("a uid as t is refused");
        assert_eq!(e.to_string(), "\"uid\" must be present with type u");
        d.insert(caller::UID.into(), prop(1000u32));
        d.remove(caller::GIDS);
        d.remove(caller::PID);
        assert_eq!(
            Caller::from_dict(&d).expect_err("gids are required"),
            CallerError {
                key: "gids",
                signature: "au"
            }
        );
        d.insert(caller::GIDS.into(), prop(Vec::<u32>::new()));
        assert_eq!(Caller::from_dict(&d).unwrap_err().key, "pid");
        d.insert(caller::PID.into(), prop(0u32));
        d.insert(caller::BUS_NAME.into(), prop(7u32));
        assert_eq!(
            Caller::from_dict(&d).unwrap_err().to_string(),
            "\"bus-name\" must be present with type s"
        );
    }
}
