//! Python bindings for the shmlink client library: the native module
//! `shmlink._shmlink`, which the pure-Python package `shmlink` re-exports
//! and extends with asyncio support.
//!
//! Everything here is a thin layer over the Rust client (`shmlink`): the
//! same D-Bus set-up, the same checks of what the broker hands over, the same
//! data plane. Blocking calls release the GIL; a session's two directions are
//! locked separately, so one thread (or an executor) can send while another
//! receives.

use pyo3::buffer::PyBuffer;
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyBytes, PyDict, PyInt, PyMemoryView, PyString, PyType};
use shmlink::{Bus, Received, SessionBuilder, SessionReceiver, SessionSender, Wakeup};
use shmlink_endpoint::sys::{self, HangupState};
use shmlink_interfaces::wakeup::{PARK, SPIN};
use shmlink_interfaces::{error as dbus_error, option};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

create_exception!(
    shmlink,
    Error,
    PyException,
    "Base class of every shmlink error."
);
create_exception!(
    shmlink,
    ConnectError,
    Error,
    "The bus could not be reached."
);
create_exception!(
    shmlink,
    RefusedError,
    Error,
    "The broker (or the bus) refused a call; `dbus_name` holds the D-Bus error name."
);
create_exception!(
    shmlink,
    UnknownServiceError,
    RefusedError,
    "The broker hosts no service of that name (org.shmlink.Error.UnknownService)."
);
create_exception!(
    shmlink,
    InvalidOptionError,
    RefusedError,
    "An option is unknown, ill-typed or out of range (org.shmlink.Error.InvalidOption, .InvalidCapacity)."
);
create_exception!(
    shmlink,
    LimitExceededError,
    RefusedError,
    "A limit of the broker would be exceeded; the message names it (org.shmlink.Error.LimitExceeded)."
);
create_exception!(
    shmlink,
    AccessDeniedError,
    RefusedError,
    "The caller may not do this (org.freedesktop.DBus.Error.AccessDenied)."
);
create_exception!(
    shmlink,
    UnknownSessionError,
    RefusedError,
    "The session does not exist (any more) (org.shmlink.Error.UnknownSession)."
);
create_exception!(
    shmlink,
    ClosedError,
    Error,
    "The session is over: closed by this side, or ended by the broker."
);
create_exception!(
    shmlink,
    ProtocolError,
    Error,
    "The broker broke the contract: a bad reply, a corrupt ring or frame, a bad fd, an offer over this side's limits."
);

/// `shmlink.TimeoutError`: a subclass of both [`Error`] and the built-in
/// `TimeoutError`, so `except TimeoutError` catches it whichever of the two
/// names is in scope. Made once, at module initialisation.
static TIMEOUT_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// Creates `shmlink.TimeoutError` (see [`TIMEOUT_ERROR`]).
fn timeout_type(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    let ty = TIMEOUT_ERROR.get_or_try_init(py, || -> PyResult<Py<PyType>> {
        let builtins = py.import("builtins")?;
        let attrs = PyDict::new(py);
        attrs.set_item("__module__", "shmlink")?;
        attrs.set_item(
            "__doc__",
            "A D-Bus call or a blocking session call made no progress within its timeout.",
        )?;
        let bases = (py.get_type::<Error>(), builtins.getattr("TimeoutError")?);
        let ty = builtins
            .getattr("type")?
            .call1(("TimeoutError", bases, attrs))?;
        Ok(ty.cast_into::<PyType>()?.unbind())
    })?;
    Ok(ty.bind(py))
}

/// A `shmlink.TimeoutError` with `message`.
fn timeout_err(py: Python<'_>, message: String) -> PyErr {
    match timeout_type(py) {
        Ok(ty) => PyErr::from_type(ty.clone(), message),
        Err(e) => e,
    }
}

/// How long a blocking call waits at most before it looks for a pending
/// signal (Ctrl-C) and, if none, waits again.
const SIGNAL_CHECK: Duration = Duration::from_millis(100);

/// The Python exception for a client error.
fn to_py(py: Python<'_>, e: shmlink::Error) -> PyErr {
    use shmlink_endpoint::Error as E;
    let text = e.to_string();
    match e {
        shmlink::Error::Connect { .. } => ConnectError::new_err(text),
        shmlink::Error::Refused { name, message } => {
            let err = match name.as_str() {
                dbus_error::UNKNOWN_SERVICE => UnknownServiceError::new_err(message),
                dbus_error::INVALID_OPTION | dbus_error::INVALID_CAPACITY => {
                    InvalidOptionError::new_err(message)
                }
                dbus_error::LIMIT_EXCEEDED => LimitExceededError::new_err(message),
                dbus_error::ACCESS_DENIED => AccessDeniedError::new_err(message),
                dbus_error::UNKNOWN_SESSION => UnknownSessionError::new_err(message),
                _ => RefusedError::new_err(text),
            };
            // Without its name the error is still raised, just less precise.
            let _ = err.value(py).setattr("dbus_name", name);
            err
        }
        shmlink::Error::TimedOut { .. } => timeout_err(py, text),
        shmlink::Error::Session(E::Closed) => ClosedError::new_err(text),
        shmlink::Error::Session(E::TimedOut) => timeout_err(py, text),
        shmlink::Error::Session(E::TooLarge { .. } | E::AlreadyFinished | E::HalfSent) => {
            PyValueError::new_err(text)
        }
        shmlink::Error::Session(E::Io(_) | E::NoMemory(_) | E::Setup(_)) => Error::new_err(text),
        shmlink::Error::BadReply(_) | shmlink::Error::Session(_) => ProtocolError::new_err(text),
    }
}

fn closed() -> PyErr {
    ClosedError::new_err("the session is closed")
}

/// Locks a mutex; a panic of another holder leaves the data usable (every
/// operation on a half re-checks the ring).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Seconds (a Python float) to a duration; None stays None.
fn duration(what: &str, secs: Option<f64>) -> PyResult<Option<Duration>> {
    secs.map(|s| {
        Duration::try_from_secs_f64(s)
            .map_err(|_| PyValueError::new_err(format!("{what} must be a number of seconds >= 0")))
    })
    .transpose()
}

/// A connection to the broker `org.shmlink.Broker1` on a bus.
///
/// `bus` is "session", "system" or a D-Bus address such as
/// "unix:path=/run/x". D-Bus calls give up after `call_timeout` seconds.
#[pyclass(subclass, module = "shmlink._shmlink")]
struct Client {
    inner: shmlink::Client,
}

#[pymethods]
impl Client {
    #[new]
    #[pyo3(signature = (bus = "session", *, call_timeout = None))]
    fn new(py: Python<'_>, bus: &str, call_timeout: Option<f64>) -> PyResult<Self> {
        let bus: Bus = match bus.parse() {
            Ok(b) => b,
            Err(never) => match never {},
        };
        let timeout = duration("call_timeout", call_timeout)?;
        let client = py
            .detach(|| shmlink::Client::connect(&bus))
            .map_err(|e| to_py(py, e))?;
        let inner = match timeout {
            Some(t) => client.with_call_timeout(t),
            None => client,
        };
        Ok(Client { inner })
    }

    /// Opens a session with `service` and maps its rings.
    ///
    /// `capacity`: bytes per ring; `wakeup`: "park" or "spin"; `spin_us`:
    /// the spin budget; `timeout`: seconds a blocking session call may make
    /// no progress (None: as long as the session lasts); `options`: the
    /// service's own options (int, str or bool values).
    // Each argument is a Python keyword argument.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (service, *, capacity = None, wakeup = None, spin_us = None, timeout = None, options = None))]
    fn open(
        &self,
        py: Python<'_>,
        service: &str,
        capacity: Option<u64>,
        wakeup: Option<&str>,
        spin_us: Option<u32>,
        timeout: Option<f64>,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Session> {
        let timeout = duration("timeout", timeout)?;
        let mut b = self.inner.session(service);
        if let Some(c) = capacity {
            b = b.capacity(c);
        }
        b = match (wakeup, spin_us) {
            (None | Some(PARK), None) => b,
            (Some(PARK), Some(_)) => {
                return Err(PyValueError::new_err(format!(
                    "spin_us needs wakeup={:?}",
                    SPIN
                )))
            }
            (None | Some(SPIN), Some(us)) => {
                b.wakeup(Wakeup::Spin(Duration::from_micros(us.into())))
            }
            // The broker applies its default budget.
            (Some(SPIN), None) => b.option(option::WAKEUP, SPIN.to_owned()),
            (Some(other), _) => {
                return Err(PyValueError::new_err(format!(
                    "wakeup must be {:?} or {:?}, not {other:?}",
                    PARK, SPIN
                )))
            }
        };
        if let Some(opts) = options {
            b = add_options(b, opts)?;
        }
        Session::open(py, b, timeout)
    }

    /// Round trip of a D-Bus ping to the broker, in seconds (starts it on a
    /// bus with activation).
    fn ping(&self, py: Python<'_>) -> PyResult<f64> {
        let d = py.detach(|| self.inner.ping()).map_err(|e| to_py(py, e))?;
        Ok(d.as_secs_f64())
    }

    /// The broker's version.
    fn version(&self, py: Python<'_>) -> PyResult<String> {
        py.detach(|| self.inner.version()).map_err(|e| to_py(py, e))
    }

    /// Names of the services the broker hosts.
    fn services(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        py.detach(|| self.inner.services())
            .map_err(|e| to_py(py, e))
    }

    /// Number of sessions open on the broker.
    fn session_count(&self, py: Python<'_>) -> PyResult<u32> {
        py.detach(|| self.inner.session_count())
            .map_err(|e| to_py(py, e))
    }

    /// Largest message size the broker allows.
    fn max_message_size(&self, py: Python<'_>) -> PyResult<u64> {
        py.detach(|| self.inner.max_message_size())
            .map_err(|e| to_py(py, e))
    }

    /// Ends the session at `path` (D-Bus `Close`; its owner or root only).
    fn close_session(&self, py: Python<'_>, path: &str) -> PyResult<()> {
        py.detach(|| self.inner.close_session(path))
            .map_err(|e| to_py(py, e))
    }

    /// Every open session as (path, service, owner bus name, uid, pid).
    fn list_sessions(&self, py: Python<'_>) -> PyResult<Vec<SessionRow>> {
        let list = py
            .detach(|| self.inner.list_sessions())
            .map_err(|e| to_py(py, e))?;
        Ok(list
            .into_iter()
            .map(|s| (s.path, s.service, s.owner, s.uid, s.pid))
            .collect())
    }
}

/// One row of `list_sessions`: path, service, owner bus name, uid, pid.
type SessionRow = (String, String, String, u32, u32);

/// Adds the service options of a Python dict to a session builder.
fn add_options(mut b: SessionBuilder, opts: &Bound<'_, PyDict>) -> PyResult<SessionBuilder> {
    for (k, v) in opts.iter() {
        let key: String = k
            .extract()
            .map_err(|_| PyTypeError::new_err("option keys must be str"))?;
        // bool before int: a Python bool is also an int.
        b = if v.is_instance_of::<PyBool>() {
            b.option(&key, v.extract::<bool>()?)
        } else if v.is_instance_of::<PyInt>() {
            match v.extract::<u64>() {
                Ok(n) if key == option::SPIN_US => {
                    b.option(&key, u32::try_from(n).unwrap_or(u32::MAX))
                }
                Ok(n) => b.option(&key, n),
                Err(_) => b.option(&key, v.extract::<i64>()?),
            }
        } else if v.is_instance_of::<PyString>() {
            b.option(&key, v.extract::<String>()?)
        } else {
            return Err(PyTypeError::new_err(format!(
                "option {key:?}: values must be int, str or bool"
            )));
        };
    }
    Ok(b)
}

/// What a session knows that does not change.
struct Info {
    path: String,
    service: String,
    max_message: u32,
    send_capacity: u64,
}

/// The receiving half with the fds an event loop waits on, duplicated from
/// the session's own before it was split; closed with the half (the broker
/// sees the hang-up once every copy of that socket is closed).
struct Receiving {
    rx: SessionReceiver,
    /// The buffer messages are received into, reused while one caller at a
    /// time receives (a concurrent receive finds it taken and uses its own).
    buf: Vec<u8>,
    readable: OwnedFd,
    hangup: OwnedFd,
}

/// An open session: `send` messages to the service, `recv` what it sends.
///
/// A context manager (leaving it closes the session) and an iterator over
/// the received messages until the service finishes sending.
#[pyclass(module = "shmlink._shmlink")]
struct Session {
    tx: Mutex<Option<SessionSender>>,
    rx: Mutex<Option<Receiving>>,
    info: Info,
    timeout: Mutex<Option<Duration>>,
}

impl Session {
    fn open(py: Python<'_>, b: SessionBuilder, timeout: Option<Duration>) -> PyResult<Session> {
        let s = py.detach(|| b.open()).map_err(|e| to_py(py, e))?;
        let dup = |fd: std::os::fd::BorrowedFd<'_>| {
            fd.try_clone_to_owned()
                .map_err(|e| Error::new_err(format!("cannot duplicate a session fd: {e}")))
        };
        let (readable, hangup) = (dup(s.readable_fd())?, dup(s.hangup_fd())?);
        let info = Info {
            path: s.path().to_owned(),
            service: s.service().to_owned(),
            max_message: s.max_message(),
            send_capacity: s.send_capacity(),
        };
        let (tx, rx) = s.split();
        Ok(Session {
            tx: Mutex::new(Some(tx)),
            rx: Mutex::new(Some(Receiving {
                rx,
                buf: Vec::new(),
                readable,
                hangup,
            })),
            info,
            timeout: Mutex::new(timeout),
        })
    }

    /// Receives with the GIL released, in slices of at most
    /// [`SIGNAL_CHECK`] so that Ctrl-C (a pending signal) interrupts the
    /// wait, until a message comes or the session's timeout passes. A
    /// receive that timed out leaves the session intact, so slicing is safe.
    fn recv_blocking(&self, py: Python<'_>) -> PyResult<Option<Vec<u8>>> {
        let limit = *lock(&self.timeout);
        let deadline = limit.map(|t| Instant::now() + t);
        loop {
            let slice = match deadline {
                Some(d) => d
                    .saturating_duration_since(Instant::now())
                    .min(SIGNAL_CHECK),
                None => SIGNAL_CHECK,
            };
            let r = py.detach(|| {
                let mut guard = lock(&self.rx);
                let r = guard.as_mut().ok_or(None)?;
                r.rx.set_timeout(Some(slice));
                let mut buf = std::mem::take(&mut r.buf);
                match r.rx.recv_into(&mut buf) {
                    Ok(true) => Ok(Some(buf)),
                    Ok(false) => {
                        r.buf = buf;
                        Ok(None)
                    }
                    Err(e) => {
                        r.buf = buf;
                        Err(Some(e))
                    }
                }
            });
            match r {
                Ok(v) => return Ok(v),
                Err(None) => return Err(closed()),
                Err(Some(e)) if e.is_timeout() => {
                    py.check_signals()?;
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(timeout_err(
                            py,
                            format!(
                                "receiving from {} timed out after {} s",
                                self.info.service,
                                limit.unwrap_or_default().as_secs_f64()
                            ),
                        ));
                    }
                }
                Err(Some(e)) => return Err(to_py(py, e)),
            }
        }
    }

    /// Runs a send or finish with the GIL released, waiting for room as long
    /// as the session's timeout allows. A timeout may strike after part of
    /// the frame went into the ring, and the rest cannot follow later, so
    /// the session stops sending then (receiving still works).
    fn send_blocking(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut SessionSender) -> Result<(), shmlink::Error> + Send,
    ) -> PyResult<()> {
        let limit = *lock(&self.timeout);
        let r = py.detach(|| {
            let mut guard = lock(&self.tx);
            let tx = guard.as_mut().ok_or(None)?;
            tx.set_timeout(limit);
            let r = f(tx);
            if r.as_ref().is_err_and(shmlink::Error::is_timeout) {
                guard.take();
            }
            r.map_err(Some)
        });
        match r {
            Ok(()) => Ok(()),
            Err(None) => Err(ClosedError::new_err(if lock(&self.rx).is_some() {
                "this session can no longer send: a send timed out part-way"
            } else {
                "the session is closed"
            })),
            Err(Some(e)) if e.is_timeout() => Err(timeout_err(
                py,
                format!("{e}; the message may be partly sent, so this session can no longer send"),
            )),
            Err(Some(e)) => Err(to_py(py, e)),
        }
    }

    fn send_bytes(&self, py: Python<'_>, msg: &[u8]) -> PyResult<()> {
        self.send_blocking(py, |tx| tx.send(msg))
    }
}

/// Sends a C-contiguous buffer without copying it on the Python side.
fn send_buffer<T: pyo3::buffer::Element>(
    s: &Session,
    py: Python<'_>,
    buf: &PyBuffer<T>,
) -> PyResult<()> {
    if !buf.is_c_contiguous() {
        return Err(PyValueError::new_err(
            "send needs a contiguous buffer (copy it first, e.g. numpy.ascontiguousarray)",
        ));
    }
    let len = buf.len_bytes();
    if len == 0 {
        return s.send_bytes(py, &[]);
    }
    // SAFETY: `buf` holds a buffer export of the object (PyObject_GetBuffer),
    // so the memory at buf_ptr() stays allocated and of len_bytes() bytes
    // until `buf` is dropped after this call; it is C-contiguous (checked
    // above), so those bytes are exactly the data. Another Python thread
    // may still write into a mutable buffer while the GIL is released: the
    // bytes sent are then whatever it wrote, as with any C extension that
    // releases the GIL over a buffer (documented on `send`).
    let bytes = unsafe { std::slice::from_raw_parts(buf.buf_ptr().cast::<u8>(), len) };
    s.send_bytes(py, bytes)
}

#[pymethods]
impl Session {
    /// The session's object path on the bus.
    #[getter]
    fn path(&self) -> &str {
        &self.info.path
    }

    /// The service's name.
    #[getter]
    fn service(&self) -> &str {
        &self.info.service
    }

    /// Largest message either side may send, in bytes.
    #[getter]
    fn max_message(&self) -> u32 {
        self.info.max_message
    }

    /// Usable bytes of the ring towards the service.
    #[getter]
    fn send_capacity(&self) -> u64 {
        self.info.send_capacity
    }

    /// Seconds a blocking call may make no progress (None: no limit).
    #[getter]
    fn get_timeout(&self) -> Option<f64> {
        lock(&self.timeout).map(|d| d.as_secs_f64())
    }

    #[setter]
    fn set_timeout(&self, secs: Option<f64>) -> PyResult<()> {
        *lock(&self.timeout) = duration("timeout", secs)?;
        Ok(())
    }

    /// Whether `close` was called.
    #[getter]
    fn closed(&self) -> bool {
        lock(&self.rx).is_none()
    }

    /// Sends one message: any C-contiguous bytes-like object (bytes,
    /// bytearray, memoryview, array.array, a numpy array...). Its memory is
    /// copied straight into the shared ring with the GIL released; do not
    /// modify it from another thread meanwhile. Waits while the ring is full.
    fn send(&self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        if let Ok(b) = data.cast::<PyBytes>() {
            return self.send_bytes(py, b.as_bytes());
        }
        match PyBuffer::<u8>::get(data) {
            Ok(buf) => send_buffer(self, py, &buf),
            // Another element type (a float array...): view it as bytes.
            Err(_) => {
                let view = PyMemoryView::from(data).map_err(|_| {
                    PyTypeError::new_err(format!(
                        "send needs a bytes-like object, not {}",
                        data.get_type()
                            .name()
                            .map(|n| n.to_string())
                            .unwrap_or_default()
                    ))
                })?;
                let bytes = view.call_method1("cast", ("B",)).map_err(|_| {
                    PyValueError::new_err(
                        "send needs a contiguous buffer (copy it first, e.g. numpy.ascontiguousarray)",
                    )
                })?;
                send_buffer(self, py, &PyBuffer::<u8>::get(&bytes)?)
            }
        }
    }

    /// Tells the service this side will send nothing more (end of stream).
    fn finish(&self, py: Python<'_>) -> PyResult<()> {
        self.send_blocking(py, SessionSender::finish)
    }

    /// Receives the next message; None once the service finished sending.
    fn recv<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let m = self.recv_blocking(py)?;
        let bytes = m.as_deref().map(|m| PyBytes::new(py, m));
        // The buffer goes back for the next message, unless it is large.
        if let (Some(buf), Some(r)) = (m, lock(&self.rx).as_mut()) {
            if r.buf.capacity() == 0 && buf.capacity() <= shmlink_endpoint::frame::MAX_SPARE {
                r.buf = buf;
            }
        }
        Ok(bytes)
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        self.recv(py)
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    /// Closes the session; if the block raised, a failing close does not
    /// hide that exception.
    fn __exit__(
        &self,
        py: Python<'_>,
        exc_type: Option<&Bound<'_, PyAny>>,
        _exc: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        let r = self.close(py);
        if exc_type.is_none() {
            r?;
        }
        Ok(false)
    }

    /// Ends the session on the broker (D-Bus `Close`) and unmaps it.
    /// Closing a closed session does nothing; a session the broker already
    /// ended raises UnknownSessionError, and is unmapped all the same.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let (rx, tx) = py.detach(|| (lock(&self.rx).take(), lock(&self.tx).take()));
        let Some(rx) = rx else { return Ok(()) };
        let r = py.detach(move || {
            let r = rx.rx.close();
            drop(tx);
            r
        });
        r.map_err(|e| to_py(py, e))
    }

    /// The broker's counters: bytes and messages each way, as a dict with
    /// keys bytes_to_server, messages_to_server, bytes_to_client,
    /// messages_to_client.
    fn counters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = py
            .detach(|| lock(&self.rx).as_ref().map(|r| r.rx.counters()))
            .ok_or_else(closed)?
            .map_err(|e| to_py(py, e))?;
        let d = PyDict::new(py);
        d.set_item("bytes_to_server", c.bytes_to_server)?;
        d.set_item("messages_to_server", c.messages_to_server)?;
        d.set_item("bytes_to_client", c.bytes_to_client)?;
        d.set_item("messages_to_client", c.messages_to_client)?;
        Ok(d)
    }

    /// The service's own state (for `sink`: bytes, messages, crc32).
    fn service_state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let state = py
            .detach(|| lock(&self.rx).as_ref().map(|r| r.rx.service_state()))
            .ok_or_else(closed)?
            .map_err(|e| to_py(py, e))?;
        let d = PyDict::new(py);
        for (k, v) in state {
            let v = &v.0;
            if let Some(s) = v.as_str() {
                d.set_item(k, s)?;
            } else if let Some(n) = v.as_u64() {
                d.set_item(k, n)?;
            } else if let Some(n) = v.as_i64() {
                d.set_item(k, n)?;
            } else if let Some(f) = v.as_f64() {
                d.set_item(k, f)?;
            } else {
                d.set_item(k, format!("{v:?}"))?;
            }
        }
        Ok(d)
    }

    /// For event loops: an fd that becomes readable when data arrives.
    fn _readable_fd(&self) -> PyResult<i32> {
        let guard = lock(&self.rx);
        Ok(guard.as_ref().ok_or_else(closed)?.readable.as_raw_fd())
    }

    /// For event loops: an fd that becomes readable when the broker ended
    /// the session.
    fn _hangup_fd(&self) -> PyResult<i32> {
        let guard = lock(&self.rx);
        Ok(guard.as_ref().ok_or_else(closed)?.hangup.as_raw_fd())
    }

    /// Without waiting: `(True, message)`, `(True, None)` at end of stream,
    /// or `(False, None)` if no whole message is there yet. Raises
    /// ClosedError if nothing is there and the broker ended the session.
    /// Resets the readable fd first, so a caller that gets `(False, None)`
    /// can wait for it.
    fn _try_recv<'py>(&self, py: Python<'py>) -> PyResult<(bool, Option<Bound<'py, PyBytes>>)> {
        let mut guard = lock(&self.rx);
        let Receiving {
            rx,
            buf,
            readable,
            hangup,
        } = guard.as_mut().ok_or_else(closed)?;
        sys::eventfd_drain(readable.as_fd())
            .map_err(|e| to_py(py, shmlink_endpoint::Error::Io(e).into()))?;
        match rx.try_recv_into(buf).map_err(|e| to_py(py, e))? {
            Some(Received::Message) => Ok((true, Some(PyBytes::new(py, buf)))),
            Some(Received::End) => Ok((true, None)),
            None => match sys::hangup_state(hangup.as_fd()) {
                Ok(HangupState::Open) => Ok((false, None)),
                Ok(HangupState::Closed) => {
                    // Data that came just before the hang-up is still ours.
                    match rx.try_recv_into(buf).map_err(|e| to_py(py, e))? {
                        Some(Received::Message) => Ok((true, Some(PyBytes::new(py, buf)))),
                        Some(Received::End) => Ok((true, None)),
                        None => Err(to_py(py, shmlink_endpoint::Error::Closed.into())),
                    }
                }
                Ok(HangupState::Written) => {
                    Err(to_py(py, shmlink_endpoint::Error::HangupWritten.into()))
                }
                Err(e) => Err(to_py(py, shmlink_endpoint::Error::Io(e).into())),
            },
        }
    }
}

/// The native part of the `shmlink` package.
#[pymodule]
fn _shmlink(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<Client>()?;
    m.add_class::<Session>()?;
    m.add("Error", py.get_type::<Error>())?;
    m.add("ConnectError", py.get_type::<ConnectError>())?;
    m.add("RefusedError", py.get_type::<RefusedError>())?;
    m.add("UnknownServiceError", py.get_type::<UnknownServiceError>())?;
    m.add("InvalidOptionError", py.get_type::<InvalidOptionError>())?;
    m.add("LimitExceededError", py.get_type::<LimitExceededError>())?;
    m.add("AccessDeniedError", py.get_type::<AccessDeniedError>())?;
    m.add("UnknownSessionError", py.get_type::<UnknownSessionError>())?;
    m.add("TimeoutError", timeout_type(py)?)?;
    m.add("ClosedError", py.get_type::<ClosedError>())?;
    m.add("ProtocolError", py.get_type::<ProtocolError>())?;
    Ok(())
}
