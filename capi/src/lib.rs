//! libshmlink: the shmlink client library for C.
//!
//! A thin layer over the Rust client (`shmlink`): opaque handles, status
//! codes, caller-owned buffers, and one pollable fd per session. The C
//! header `include/shmlink.h` is generated from this file by cbindgen and
//! committed; a test fails when it is out of date (see `docs/BINDINGS.md`).
//!
//! Conventions, the same for every function:
//! - Handles are opaque and freed by their own `*_free` function; freeing
//!   NULL does nothing.
//! - Fallible calls return an `int`: `SHMLINK_OK` (0), another non-negative
//!   `shmlink_status` for the normal outcomes (`SHMLINK_END`,
//!   `SHMLINK_AGAIN`), or a negative `shmlink_status` on failure. Calls
//!   returning a handle return NULL on failure.
//! - Calls that can fail for reasons other than a bad argument take a last
//!   `shmlink_error **err`: NULL to ignore details, else on failure `*err` is
//!   set to a new error object (its code, message and D-Bus error name),
//!   freed with `shmlink_error_free`. On success `*err` is left unchanged.
//! - A NULL handle, NULL string or invalid UTF-8 gives
//!   `SHMLINK_ERR_INVALID_ARGUMENT`, never undefined behaviour; no Rust
//!   panic crosses into C (it becomes `SHMLINK_ERR_INTERNAL`).
//! - A client may be used from several threads at once; a session and an
//!   options object from one thread at a time.

mod error;
mod ffi;

pub use error::shmlink_error;

use error::Failure;
use shmlink::Received;
use shmlink_endpoint::sys::{self, HangupState, Interest, Selector, Token};
use std::ffi::{c_char, c_int, c_void, CString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr;
use std::time::Duration;

/// Status codes: 0 and above are outcomes, below 0 failures.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum shmlink_status {
    /// Success.
    SHMLINK_OK = 0,
    /// Receiving: the service finished sending (end of stream).
    SHMLINK_END = 1,
    /// `shmlink_session_try_recv`: no whole message yet; wait for the
    /// session's fd to become readable.
    SHMLINK_AGAIN = 2,
    /// A NULL pointer, invalid UTF-8 or an impossible value was passed.
    SHMLINK_ERR_INVALID_ARGUMENT = -1,
    /// The bus could not be reached.
    SHMLINK_ERR_CONNECT = -2,
    /// The broker refused the call; `shmlink_error_dbus_name` says why
    /// (e.g. `org.shmlink.Error.UnknownService`).
    SHMLINK_ERR_REFUSED = -3,
    /// The broker's reply did not have the expected shape.
    SHMLINK_ERR_BAD_REPLY = -4,
    /// A D-Bus call or a blocking session call made no progress in time.
    SHMLINK_ERR_TIMED_OUT = -5,
    /// The receive buffer is too small for the next message; the message
    /// is kept and the size it needs was stored in `*len`.
    SHMLINK_ERR_BUFFER_TOO_SMALL = -6,
    /// The session has ended (the broker closed it or the service hung up).
    SHMLINK_ERR_CLOSED = -7,
    /// The message exceeds the session's maximum (`shmlink_session_max_message`).
    SHMLINK_ERR_TOO_LARGE = -8,
    /// Sending after `shmlink_session_finish`, or after a send that stopped
    /// in the middle of a message (it timed out): the session can send no more.
    SHMLINK_ERR_FINISHED = -9,
    /// The other side broke the protocol, corrupted a ring or offered
    /// more than the limits allow; the session is unusable.
    SHMLINK_ERR_PEER = -10,
    /// A system call failed.
    SHMLINK_ERR_IO = -11,
    /// Memory for a message could not be allocated.
    SHMLINK_ERR_NO_MEMORY = -12,
    /// A bug in libshmlink (a caught panic); the message says where.
    SHMLINK_ERR_INTERNAL = -100,
}

use shmlink_status::*;

/// A connection to the broker on one bus.
#[allow(non_camel_case_types)]
pub struct shmlink_client {
    client: shmlink::Client,
}

/// A typed option value for `OpenSession`.
enum OptionValue {
    U32(u32),
    U64(u64),
    I32(i32),
    I64(i64),
    Bool(bool),
    Double(f64),
    Str(String),
}

/// Options for a new session: ring capacity, wake-up, timeouts, limits and
/// the service's own options.
#[allow(non_camel_case_types)]
#[derive(Default)]
pub struct shmlink_options {
    capacity: Option<u64>,
    max_capacity: Option<u64>,
    max_message: Option<u32>,
    wakeup: Option<shmlink::Wakeup>,
    timeout: Option<Duration>,
    values: Vec<(String, OptionValue)>,
}

/// An open session with a service.
#[allow(non_camel_case_types)]
pub struct shmlink_session {
    session: shmlink::Session,
    /// The buffer messages are received into, reused for every message.
    incoming: Vec<u8>,
    /// `incoming` holds a message that did not fit the caller's buffer.
    pending: bool,
    /// The service finished sending; every later receive reports the end.
    ended: bool,
    /// Readable when a message or the hang-up arrives (an epoll set).
    poll: OwnedFd,
    path: CString,
}

impl shmlink_session {
    /// One step without waiting: the next item (a message lands in
    /// `incoming`), or `None` if none is there. Resets the readable eventfd
    /// first, so a caller that gets `None` can wait on the session's fd.
    fn try_next(&mut self) -> Result<Option<Received>, Failure> {
        let io = |e| Failure::from(shmlink_endpoint::Error::Io(e));
        sys::eventfd_drain(self.session.readable_fd()).map_err(io)?;
        if let Some(item) = self.session.try_recv_into(&mut self.incoming)? {
            return Ok(Some(item));
        }
        match sys::hangup_state(self.session.hangup_fd()).map_err(io)? {
            HangupState::Open => Ok(None),
            // Data that came just before the hang-up is still ours.
            HangupState::Closed => match self.session.try_recv_into(&mut self.incoming)? {
                Some(item) => Ok(Some(item)),
                None => Err(shmlink_endpoint::Error::Closed.into()),
            },
            HangupState::Written => Err(shmlink_endpoint::Error::HangupWritten.into()),
        }
    }

    /// Delivers the message in `incoming` into `buf` (keeping it if it
    /// does not fit); its length goes to `len` either way.
    fn deliver(
        &mut self,
        buf: &mut [u8],
        len: &mut Option<usize>,
    ) -> Result<shmlink_status, Failure> {
        let msg = &self.incoming;
        *len = Some(msg.len());
        if msg.len() > buf.len() {
            let (need, have) = (msg.len(), buf.len());
            self.pending = true;
            return Err(Failure::new(
                SHMLINK_ERR_BUFFER_TOO_SMALL,
                format!("the next message has {need} bytes; the buffer holds {have}"),
            ));
        }
        buf[..msg.len()].copy_from_slice(msg);
        self.pending = false;
        // Kept for the next message, unless it is large.
        if self.incoming.capacity() > shmlink_endpoint::frame::MAX_SPARE {
            self.incoming = Vec::new();
        }
        Ok(SHMLINK_OK)
    }

    /// Shared body of `recv` and `try_recv`.
    fn receive(
        &mut self,
        buf: &mut [u8],
        len: &mut Option<usize>,
        wait: bool,
    ) -> Result<shmlink_status, Failure> {
        if self.pending {
            return self.deliver(buf, len);
        }
        if self.ended {
            return Ok(SHMLINK_END);
        }
        let item = if wait {
            Some(if self.session.recv_into(&mut self.incoming)? {
                Received::Message
            } else {
                Received::End
            })
        } else {
            self.try_next()?
        };
        match item {
            None => Ok(SHMLINK_AGAIN),
            Some(Received::End) => {
                self.ended = true;
                Ok(SHMLINK_END)
            }
            Some(Received::Message) => self.deliver(buf, len),
        }
    }
}

/// Builds the pollable fd: an epoll set over the readable eventfd and the
/// hang-up socket, level-triggered, so it is readable while either is.
fn session_poll_fd(session: &shmlink::Session) -> Result<OwnedFd, Failure> {
    let io = |e: std::io::Error| Failure::from(shmlink_endpoint::Error::Io(e));
    let set = Selector::new().map_err(io)?;
    for (i, fd) in [session.readable_fd(), session.hangup_fd()]
        .into_iter()
        .enumerate()
    {
        set.add(fd, Token(i as u64), Interest::READABLE)
            .map_err(io)?;
    }
    Ok(set.into())
}

/// Milliseconds to a timeout; negative means none.
fn timeout_ms(ms: i64) -> Option<Duration> {
    u64::try_from(ms).ok().map(Duration::from_millis)
}

// ---- errors ---------------------------------------------------------------

/// The status code of an error (a negative `shmlink_status`), or
/// `SHMLINK_ERR_INVALID_ARGUMENT` for NULL.
///
/// # Safety
/// `err` is NULL or an error object from this library, not yet freed.
#[no_mangle]
pub unsafe extern "C" fn shmlink_error_code(err: *const shmlink_error) -> c_int {
    // SAFETY: the caller's promise above.
    match unsafe { err.as_ref() } {
        Some(e) => e.code as c_int,
        None => SHMLINK_ERR_INVALID_ARGUMENT as c_int,
    }
}

/// The error's message (UTF-8, owned by the error object), or "" for NULL.
///
/// # Safety
/// `err` is NULL or an error object from this library, not yet freed.
#[no_mangle]
pub unsafe extern "C" fn shmlink_error_message(err: *const shmlink_error) -> *const c_char {
    // SAFETY: the caller's promise above.
    match unsafe { err.as_ref() } {
        Some(e) => e.message.as_ptr(),
        None => c"".as_ptr(),
    }
}

/// The D-Bus error name when the broker refused the call (e.g.
/// `org.shmlink.Error.UnknownService`), else NULL. Owned by the error object.
///
/// # Safety
/// `err` is NULL or an error object from this library, not yet freed.
#[no_mangle]
pub unsafe extern "C" fn shmlink_error_dbus_name(err: *const shmlink_error) -> *const c_char {
    // SAFETY: the caller's promise above.
    match unsafe { err.as_ref() }.and_then(|e| e.dbus_name.as_ref()) {
        Some(n) => n.as_ptr(),
        None => ptr::null(),
    }
}

/// Frees an error object; NULL is ignored.
///
/// # Safety
/// `err` is NULL or an error object from this library, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn shmlink_error_free(err: *mut shmlink_error) {
    // SAFETY: the caller's promise above; dropping a CString cannot panic.
    unsafe { ffi::free(err) }
}

/// A static English name for a status code (e.g. "SHMLINK_ERR_CLOSED").
#[no_mangle]
pub extern "C" fn shmlink_status_name(status: c_int) -> *const c_char {
    let name = match status {
        0 => c"SHMLINK_OK",
        1 => c"SHMLINK_END",
        2 => c"SHMLINK_AGAIN",
        -1 => c"SHMLINK_ERR_INVALID_ARGUMENT",
        -2 => c"SHMLINK_ERR_CONNECT",
        -3 => c"SHMLINK_ERR_REFUSED",
        -4 => c"SHMLINK_ERR_BAD_REPLY",
        -5 => c"SHMLINK_ERR_TIMED_OUT",
        -6 => c"SHMLINK_ERR_BUFFER_TOO_SMALL",
        -7 => c"SHMLINK_ERR_CLOSED",
        -8 => c"SHMLINK_ERR_TOO_LARGE",
        -9 => c"SHMLINK_ERR_FINISHED",
        -10 => c"SHMLINK_ERR_PEER",
        -11 => c"SHMLINK_ERR_IO",
        -12 => c"SHMLINK_ERR_NO_MEMORY",
        -100 => c"SHMLINK_ERR_INTERNAL",
        _ => c"unknown shmlink status",
    };
    name.as_ptr()
}

// ---- client ---------------------------------------------------------------

/// Connects to the broker on `bus`: "session", "system", a D-Bus address
/// such as "unix:path=/run/x", or NULL for the session bus. Returns NULL on
/// failure (and sets `*err` unless `err` is NULL).
///
/// # Safety
/// `bus` is NULL or a NUL-terminated string; `err` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn shmlink_client_connect(
    bus: *const c_char,
    err: *mut *mut shmlink_error,
) -> *mut shmlink_client {
    // SAFETY: `err` per the caller's promise.
    unsafe {
        ffi::guard(
            err,
            |_| ptr::null_mut(),
            || {
                let bus = if bus.is_null() {
                    "session"
                } else {
                    ffi::string(bus, "bus")?
                };
                let bus: shmlink::Bus = bus.parse().unwrap_or_else(|e| match e {});
                let client = shmlink::Client::connect(&bus)?;
                Ok(ffi::into_handle(shmlink_client { client }))
            },
        )
    }
}

/// Sets how long D-Bus calls to the broker (opening a session, closing it)
/// may take before failing with `SHMLINK_ERR_TIMED_OUT` (default 10 s).
///
/// # Safety
/// `client` is NULL or a live client handle.
#[no_mangle]
pub unsafe extern "C" fn shmlink_client_set_call_timeout(
    client: *mut shmlink_client,
    timeout_ms: u32,
) -> c_int {
    // SAFETY: the caller's promise above; no error object is written.
    unsafe {
        ffi::status(ptr::null_mut(), || {
            let c = ffi::obj_mut(client, "client")?;
            c.client = c
                .client
                .clone()
                .with_call_timeout(Duration::from_millis(timeout_ms.into()));
            Ok(SHMLINK_OK)
        })
    }
}

/// Frees a client; NULL is ignored. Sessions opened from it stay usable.
///
/// # Safety
/// `client` is NULL or a client handle, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn shmlink_client_free(client: *mut shmlink_client) {
    // SAFETY: the caller's promise above.
    unsafe {
        ffi::guard(
            ptr::null_mut(),
            |_| (),
            || {
                ffi::free(client);
                Ok(())
            },
        )
    }
}

// ---- options --------------------------------------------------------------

/// A new, empty set of session options (the broker's defaults). Free it
/// with `shmlink_options_free`; it may be reused for several sessions.
#[no_mangle]
pub extern "C" fn shmlink_options_new() -> *mut shmlink_options {
    // SAFETY: no error object is written.
    unsafe {
        ffi::guard(
            ptr::null_mut(),
            |_| ptr::null_mut(),
            || Ok(ffi::into_handle(shmlink_options::default())),
        )
    }
}

/// Frees an options object; NULL is ignored.
///
/// # Safety
/// `opts` is NULL or an options handle, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn shmlink_options_free(opts: *mut shmlink_options) {
    // SAFETY: the caller's promise above.
    unsafe {
        ffi::guard(
            ptr::null_mut(),
            |_| (),
            || {
                ffi::free(opts);
                Ok(())
            },
        )
    }
}

/// Applies `f` to the options behind `opts`.
///
/// # Safety
/// `opts` is NULL or a live options handle used by no other thread.
unsafe fn with_options(
    opts: *mut shmlink_options,
    f: impl FnOnce(&mut shmlink_options) -> Result<(), Failure>,
) -> c_int {
    // SAFETY: the caller's promise above; no error object is written.
    unsafe {
        ffi::status(ptr::null_mut(), || {
            f(ffi::obj_mut(opts, "options")?)?;
            Ok(SHMLINK_OK)
        })
    }
}

/// Bytes per ring (rounded up to whole pages by the broker). A broker that
/// hands over a larger ring is refused.
///
/// # Safety
/// `opts` is NULL or a live options handle.
#[no_mangle]
pub unsafe extern "C" fn shmlink_options_set_capacity(
    opts: *mut shmlink_options,
    bytes: u64,
) -> c_int {
    // SAFETY: the caller's promise above.
    unsafe {
        with_options(opts, |o| {
            o.capacity = Some(bytes);
            Ok(())
        })
    }
}

/// Largest ring the client maps when no capacity was asked for (default
/// 64 MiB).
///
/// # Safety
/// `opts` is NULL or a live options handle.
#[no_mangle]
pub unsafe extern "C" fn shmlink_options_set_max_capacity(
    opts: *mut shmlink_options,
    bytes: u64,
) -> c_int {
    // SAFETY: the caller's promise above.
    unsafe {
        with_options(opts, |o| {
            o.max_capacity = Some(bytes);
            Ok(())
        })
    }
}

/// Largest message size the client accepts from the broker (default 64 MiB).
///
/// # Safety
/// `opts` is NULL or a live options handle.
#[no_mangle]
pub unsafe extern "C" fn shmlink_options_set_max_message(
    opts: *mut shmlink_options,
    bytes: u32,
) -> c_int {
    // SAFETY: the caller's promise above.
    unsafe {
        with_options(opts, |o| {
            o.max_message = Some(bytes);
            Ok(())
        })
    }
}

/// Both sides sleep on an eventfd when they must wait (the default; lowest
/// CPU use).
///
/// # Safety
/// `opts` is NULL or a live options handle.
#[no_mangle]
pub unsafe extern "C" fn shmlink_options_set_wakeup_park(opts: *mut shmlink_options) -> c_int {
    // SAFETY: the caller's promise above.
    unsafe {
        with_options(opts, |o| {
            o.wakeup = Some(shmlink::Wakeup::Park);
            Ok(())
        })
    }
}

/// Both sides busy-poll for up to `spin_us` microseconds before sleeping
/// (lowest latency, costs CPU).
///
/// # Safety
/// `opts` is NULL or a live options handle.
#[no_mangle]
pub unsafe extern "C" fn shmlink_options_set_wakeup_spin(
    opts: *mut shmlink_options,
    spin_us: u32,
) -> c_int {
    // SAFETY: the caller's promise above.
    unsafe {
        with_options(opts, |o| {
            o.wakeup = Some(shmlink::Wakeup::Spin(Duration::from_micros(spin_us.into())));
            Ok(())
        })
    }
}

/// Blocking session calls (`send`, `recv`, `finish`) fail with
/// `SHMLINK_ERR_TIMED_OUT` after `timeout_ms` without progress; negative
/// means no timeout (the default).
///
/// # Safety
/// `opts` is NULL or a live options handle.
#[no_mangle]
pub unsafe extern "C" fn shmlink_options_set_timeout(
    opts: *mut shmlink_options,
    timeout_ms: i64,
) -> c_int {
    // SAFETY: the caller's promise above.
    unsafe {
        with_options(opts, |o| {
            o.timeout = crate::timeout_ms(timeout_ms);
            Ok(())
        })
    }
}

/// Stores a service option, replacing an earlier value under `key`.
///
/// # Safety
/// `opts` is NULL or a live options handle; `key` NULL or NUL-terminated.
unsafe fn set_value(
    opts: *mut shmlink_options,
    key: *const c_char,
    value: impl FnOnce() -> Result<OptionValue, Failure>,
) -> c_int {
    // SAFETY: the caller's promise above.
    unsafe {
        with_options(opts, |o| {
            let key = ffi::string(key, "option key")?.to_owned();
            let value = value()?;
            o.values.retain(|(k, _)| *k != key);
            o.values.push((key, value));
            Ok(())
        })
    }
}

/// A service option of D-Bus type `u` (uint32).
///
/// # Safety
/// `opts` is NULL or a live options handle; `key` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn shmlink_options_set_u32(
    opts: *mut shmlink_options,
    key: *const c_char,
    value: u32,
) -> c_int {
    // SAFETY: the caller's promise above.
    unsafe { set_value(opts, key, || Ok(OptionValue::U32(value))) }
}

/// A service option of D-Bus type `t` (uint64), e.g. "message-size" for `source`.
///
/// # Safety
/// `opts` is NULL or a live options handle; `key` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn shmlink_options_set_u64(
    opts: *mut shmlink_options,
    key: *const c_char,
    value: u64,
) -> c_int {
    // SAFETY: the caller's promise above.
    unsafe { set_value(opts, key, || Ok(OptionValue::U64(value))) }
}

/// A service option of D-Bus type `i` (int32).
///
/// # Safety
/// `opts` is NULL or a live options handle; `key` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn shmlink_options_set_i32(
    opts: *mut shmlink_options,
    key: *const c_char,
    value: i32,
) -> c_int {
    // SAFETY: the caller's promise above.
    unsafe { set_value(opts, key, || Ok(OptionValue::I32(value))) }
}

/// A service option of D-Bus type `x` (int64).
///
/// # Safety
/// `opts` is NULL or a live options handle; `key` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn shmlink_options_set_i64(
    opts: *mut shmlink_options,
    key: *const c_char,
    value: i64,
) -> c_int {
    // SAFETY: the caller's promise above.
    unsafe { set_value(opts, key, || Ok(OptionValue::I64(value))) }
}

/// A service option of D-Bus type `b` (boolean; any non-zero is true).
///
/// # Safety
/// `opts` is NULL or a live options handle; `key` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn shmlink_options_set_bool(
    opts: *mut shmlink_options,
    key: *const c_char,
    value: c_int,
) -> c_int {
    // SAFETY: the caller's promise above.
    unsafe { set_value(opts, key, || Ok(OptionValue::Bool(value != 0))) }
}

/// A service option of D-Bus type `d` (double).
///
/// # Safety
/// `opts` is NULL or a live options handle; `key` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn shmlink_options_set_double(
    opts: *mut shmlink_options,
    key: *const c_char,
    value: f64,
) -> c_int {
    // SAFETY: the caller's promise above.
    unsafe { set_value(opts, key, || Ok(OptionValue::Double(value))) }
}

/// A service option of D-Bus type `s` (UTF-8 string), e.g. "topic".
///
/// # Safety
/// `opts` is NULL or a live options handle; `key` and `value` NULL or
/// NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn shmlink_options_set_string(
    opts: *mut shmlink_options,
    key: *const c_char,
    value: *const c_char,
) -> c_int {
    // SAFETY: the caller's promise above.
    unsafe {
        set_value(opts, key, || {
            Ok(OptionValue::Str(
                ffi::string(value, "option value")?.to_owned(),
            ))
        })
    }
}

// ---- sessions -------------------------------------------------------------

/// Opens a session with `service` ("echo", "sink", ...) using `opts` (NULL
/// for the defaults; not consumed). Returns NULL on failure.
///
/// # Safety
/// `client` and `opts` are NULL or live handles; `service` NULL or
/// NUL-terminated; `err` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn shmlink_session_open(
    client: *const shmlink_client,
    service: *const c_char,
    opts: *const shmlink_options,
    err: *mut *mut shmlink_error,
) -> *mut shmlink_session {
    // SAFETY: the caller's promise above.
    unsafe {
        ffi::guard(
            err,
            |_| ptr::null_mut(),
            || {
                let client = ffi::obj(client, "client")?;
                let service = ffi::string(service, "service")?;
                let mut b = client.client.session(service);
                if !opts.is_null() {
                    let o = ffi::obj(opts, "options")?;
                    if let Some(c) = o.capacity {
                        b = b.capacity(c);
                    }
                    if let Some(c) = o.max_capacity {
                        b = b.max_capacity(c);
                    }
                    if let Some(m) = o.max_message {
                        b = b.max_message(m);
                    }
                    if let Some(w) = o.wakeup {
                        b = b.wakeup(w);
                    }
                    if let Some(t) = o.timeout {
                        b = b.timeout(t);
                    }
                    for (k, v) in &o.values {
                        b = match v {
                            OptionValue::U32(x) => b.option(k, *x),
                            OptionValue::U64(x) => b.option(k, *x),
                            OptionValue::I32(x) => b.option(k, *x),
                            OptionValue::I64(x) => b.option(k, *x),
                            OptionValue::Bool(x) => b.option(k, *x),
                            OptionValue::Double(x) => b.option(k, *x),
                            OptionValue::Str(x) => b.option(k, x.clone()),
                        };
                    }
                }
                let session = b.open()?;
                let poll = session_poll_fd(&session)?;
                let path = CString::new(session.path()).unwrap_or_default();
                Ok(ffi::into_handle(shmlink_session {
                    session,
                    incoming: Vec::new(),
                    pending: false,
                    ended: false,
                    poll,
                    path,
                }))
            },
        )
    }
}

/// Sends one message of `len` bytes (0 up to `shmlink_session_max_message`),
/// waiting while the ring is full (up to the session's timeout). `data` may
/// be NULL when `len` is 0.
///
/// # Safety
/// `session` is NULL or a live session handle; `data` points to `len`
/// readable bytes (or `len` is 0); `err` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn shmlink_session_send(
    session: *mut shmlink_session,
    data: *const c_void,
    len: usize,
    err: *mut *mut shmlink_error,
) -> c_int {
    // SAFETY: the caller's promise above.
    unsafe {
        ffi::status(err, || {
            let s = ffi::obj_mut(session, "session")?;
            s.session.send(ffi::bytes(data.cast(), len, "data")?)?;
            Ok(SHMLINK_OK)
        })
    }
}

/// Tells the service that nothing more will be sent (end of stream); it
/// usually answers with its own end of stream.
///
/// # Safety
/// `session` is NULL or a live session handle; `err` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn shmlink_session_finish(
    session: *mut shmlink_session,
    err: *mut *mut shmlink_error,
) -> c_int {
    // SAFETY: the caller's promise above.
    unsafe {
        ffi::status(err, || {
            ffi::obj_mut(session, "session")?.session.finish()?;
            Ok(SHMLINK_OK)
        })
    }
}

/// Receives the next message into `buf` (`size` bytes), waiting for it up to
/// the session's timeout. Returns `SHMLINK_OK` with the message's length in
/// `*len`, `SHMLINK_END` once the service finished sending (and on every
/// later call), or a negative status. If the message does not fit,
/// returns `SHMLINK_ERR_BUFFER_TOO_SMALL` with the size it needs in `*len`
/// and keeps it for the next call (`buf` may be NULL when `size` is 0, to
/// ask for the size).
///
/// # Safety
/// `session` is NULL or a live session handle; `buf` points to `size`
/// writable bytes (or `size` is 0); `len` NULL or writable; `err` NULL or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn shmlink_session_recv(
    session: *mut shmlink_session,
    buf: *mut c_void,
    size: usize,
    len: *mut usize,
    err: *mut *mut shmlink_error,
) -> c_int {
    // SAFETY: the caller's promise above, which `receive_into` needs.
    unsafe { receive_into(session, buf, size, len, err, true) }
}

/// Like `shmlink_session_recv` but never waits: returns `SHMLINK_AGAIN` when
/// no whole message is there yet; then wait for `shmlink_session_fd` to
/// become readable and call again. Call it until it returns `SHMLINK_AGAIN`
/// after each wake-up.
///
/// # Safety
/// As for `shmlink_session_recv`.
#[no_mangle]
pub unsafe extern "C" fn shmlink_session_try_recv(
    session: *mut shmlink_session,
    buf: *mut c_void,
    size: usize,
    len: *mut usize,
    err: *mut *mut shmlink_error,
) -> c_int {
    // SAFETY: the caller's promise above, which `receive_into` needs.
    unsafe { receive_into(session, buf, size, len, err, false) }
}

/// The body of `shmlink_session_recv` (`wait`) and `shmlink_session_try_recv`.
///
/// # Safety
/// As for `shmlink_session_recv`.
unsafe fn receive_into(
    session: *mut shmlink_session,
    buf: *mut c_void,
    size: usize,
    len: *mut usize,
    err: *mut *mut shmlink_error,
    wait: bool,
) -> c_int {
    // SAFETY: the caller's promise (see `shmlink_session_recv`).
    unsafe {
        ffi::status(err, || {
            let s = ffi::obj_mut(session, "session")?;
            let mut n = None;
            let r = s.receive(ffi::bytes_mut(buf.cast(), size, "buffer")?, &mut n, wait);
            if let Some(n) = n {
                ffi::store(len, n);
            }
            r
        })
    }
}

/// A file descriptor for event loops (poll, GLib `GSource`, sd-event) that
/// is readable when a message or the session's end may have arrived. It is
/// owned by the session: do not close it. After it polls readable, call
/// `shmlink_session_try_recv` until it returns something other than a
/// message. Returns -1 for NULL.
///
/// # Safety
/// `session` is NULL or a live session handle.
#[no_mangle]
pub unsafe extern "C" fn shmlink_session_fd(session: *const shmlink_session) -> c_int {
    // SAFETY: the caller's promise above; no error object is written.
    unsafe {
        ffi::guard(
            ptr::null_mut(),
            |_| -1,
            || Ok(ffi::obj(session, "session")?.poll.as_raw_fd()),
        )
    }
}

/// Changes how long blocking calls may wait without progress; negative
/// means no timeout.
///
/// # Safety
/// `session` is NULL or a live session handle.
#[no_mangle]
pub unsafe extern "C" fn shmlink_session_set_timeout(
    session: *mut shmlink_session,
    timeout_ms: i64,
) -> c_int {
    // SAFETY: the caller's promise above; no error object is written.
    unsafe {
        ffi::status(ptr::null_mut(), || {
            ffi::obj_mut(session, "session")?
                .session
                .set_timeout(crate::timeout_ms(timeout_ms));
            Ok(SHMLINK_OK)
        })
    }
}

/// Largest message either side may send (0 for NULL).
///
/// # Safety
/// `session` is NULL or a live session handle.
#[no_mangle]
pub unsafe extern "C" fn shmlink_session_max_message(session: *const shmlink_session) -> u32 {
    // SAFETY: the caller's promise above; no error object is written.
    unsafe {
        ffi::guard(
            ptr::null_mut(),
            |_| 0,
            || Ok(ffi::obj(session, "session")?.session.max_message()),
        )
    }
}

/// The session's D-Bus object path, owned by the session ("" for NULL).
///
/// # Safety
/// `session` is NULL or a live session handle.
#[no_mangle]
pub unsafe extern "C" fn shmlink_session_path(session: *const shmlink_session) -> *const c_char {
    // SAFETY: the caller's promise above; no error object is written.
    unsafe {
        ffi::guard(
            ptr::null_mut(),
            |_| c"".as_ptr(),
            || Ok(ffi::obj(session, "session")?.path.as_ptr()),
        )
    }
}

/// Closes the session on the broker (D-Bus `Close`) and frees the handle,
/// whatever the outcome.
///
/// # Safety
/// `session` is NULL or a session handle, not used afterwards; `err` NULL
/// or writable.
#[no_mangle]
pub unsafe extern "C" fn shmlink_session_close(
    session: *mut shmlink_session,
    err: *mut *mut shmlink_error,
) -> c_int {
    // SAFETY: the caller's promise above.
    unsafe {
        ffi::status(err, || {
            ffi::take(session, "session")?.session.close()?;
            Ok(SHMLINK_OK)
        })
    }
}

/// Frees a session without asking the broker: it sees the hang-up and ends
/// the session itself. NULL is ignored.
///
/// # Safety
/// `session` is NULL or a session handle, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn shmlink_session_free(session: *mut shmlink_session) {
    // SAFETY: the caller's promise above.
    unsafe {
        ffi::guard(
            ptr::null_mut(),
            |_| (),
            || {
                ffi::free(session);
                Ok(())
            },
        )
    }
}
