//! Status codes and the error object C callers receive.

use crate::shmlink_status;
use std::ffi::CString;

/// Details of a failed call: its status code, a message, and for calls the
/// broker refused, the D-Bus error name. Free it with `shmlink_error_free`.
#[allow(non_camel_case_types)]
pub struct shmlink_error {
    pub(crate) code: shmlink_status,
    pub(crate) message: CString,
    pub(crate) dbus_name: Option<CString>,
}

/// A failure on its way to C.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) code: shmlink_status,
    pub(crate) message: String,
    pub(crate) dbus_name: Option<String>,
}

/// A string for C: interior NULs (a hostile broker's message may hold
/// them) become U+FFFD.
fn c_string(s: String) -> CString {
    CString::new(s).unwrap_or_else(|e| {
        let cleaned = String::from_utf8_lossy(&e.into_vec()).replace('\0', "\u{fffd}");
        CString::new(cleaned).unwrap_or_default()
    })
}

impl Failure {
    pub(crate) fn new(code: shmlink_status, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
            dbus_name: None,
        }
    }

    /// A NULL pointer, bad UTF-8 or an out-of-range value from the caller.
    pub(crate) fn invalid(message: impl Into<String>) -> Failure {
        Failure::new(shmlink_status::SHMLINK_ERR_INVALID_ARGUMENT, message)
    }

    pub(crate) fn into_error(self) -> shmlink_error {
        shmlink_error {
            code: self.code,
            message: c_string(self.message),
            dbus_name: self.dbus_name.map(c_string),
        }
    }
}

/// The status code for a data-plane error.
fn endpoint_code(e: &shmlink_endpoint::Error) -> shmlink_status {
    use shmlink_endpoint::Error as E;
    use shmlink_status::*;
    match e {
        E::Closed => SHMLINK_ERR_CLOSED,
        E::TimedOut => SHMLINK_ERR_TIMED_OUT,
        E::TooLarge { .. } => SHMLINK_ERR_TOO_LARGE,
        E::AlreadyFinished | E::HalfSent => SHMLINK_ERR_FINISHED,
        E::NoMemory(_) => SHMLINK_ERR_NO_MEMORY,
        E::Io(_) | E::Setup(_) => SHMLINK_ERR_IO,
        E::Corrupt(_)
        | E::Protocol(_)
        | E::SignalFlooded
        | E::HangupWritten
        | E::BadFd(_)
        | E::OverLimit { .. } => SHMLINK_ERR_PEER,
    }
}

impl From<shmlink::Error> for Failure {
    fn from(e: shmlink::Error) -> Failure {
        use shmlink_status::*;
        let code = match &e {
            shmlink::Error::Connect { .. } => SHMLINK_ERR_CONNECT,
            shmlink::Error::Refused { .. } => SHMLINK_ERR_REFUSED,
            shmlink::Error::BadReply(_) => SHMLINK_ERR_BAD_REPLY,
            shmlink::Error::TimedOut { .. } => SHMLINK_ERR_TIMED_OUT,
            shmlink::Error::Session(s) => endpoint_code(s),
        };
        Failure {
            code,
            message: e.to_string(),
            dbus_name: e.dbus_name().map(str::to_owned),
        }
    }
}

impl From<shmlink_endpoint::Error> for Failure {
    fn from(e: shmlink_endpoint::Error) -> Failure {
        Failure::from(shmlink::Error::Session(e))
    }
}
