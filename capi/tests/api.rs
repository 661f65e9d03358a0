//! The C API called from Rust exactly as C calls it, against a real
//! dbus-daemon and shmlinkd.

use shmlink_capi::*;
use shmlink_test_support::{locate_daemon, DaemonProcess, PrivateBus};
use std::ffi::{c_int, c_void, CStr, CString};
use std::os::fd::BorrowedFd;
use std::ptr;
use std::time::{Duration, Instant};

const OK: c_int = shmlink_status::SHMLINK_OK as c_int;
const END: c_int = shmlink_status::SHMLINK_END as c_int;
const AGAIN: c_int = shmlink_status::SHMLINK_AGAIN as c_int;
const INVALID: c_int = shmlink_status::SHMLINK_ERR_INVALID_ARGUMENT as c_int;
const TOO_SMALL: c_int = shmlink_status::SHMLINK_ERR_BUFFER_TOO_SMALL as c_int;
const CLOSED: c_int = shmlink_status::SHMLINK_ERR_CLOSED as c_int;
const TIMED_OUT: c_int = shmlink_status::SHMLINK_ERR_TIMED_OUT as c_int;

/// A bus, a daemon and a connected client.
struct World {
    bus: PrivateBus,
    _daemon: DaemonProcess,
    client: *mut shmlink_client,
}

impl World {
    fn start() -> World {
        let bus = PrivateBus::start().expect("dbus-daemon");
        let daemon = DaemonProcess::start(
            &locate_daemon().expect("shmlinkd (cargo build -p shmlinkd)"),
            bus.address(),
            &[],
        )
        .expect("shmlinkd");
        let address = CString::new(bus.address()).unwrap();
        let mut err = ptr::null_mut();
        // SAFETY: a valid string and a writable error pointer.
        let client = unsafe { shmlink_client_connect(address.as_ptr(), &mut err) };
        assert!(!client.is_null(), "connect: {}", message(err));
        World {
            bus,
            _daemon: daemon,
            client,
        }
    }

    /// Opens `service` with a timeout of `timeout_ms` and a 1 MiB ring.
    fn open(&self, service: &CStr, timeout_ms: i64) -> *mut shmlink_session {
        let opts = shmlink_options_new();
        // SAFETY: live handles, valid strings, writable error pointer.
        unsafe {
            assert_eq!(shmlink_options_set_capacity(opts, 1 << 20), OK);
            assert_eq!(shmlink_options_set_timeout(opts, timeout_ms), OK);
            let mut err = ptr::null_mut();
            let s = shmlink_session_open(self.client, service.as_ptr(), opts, &mut err);
            shmlink_options_free(opts);
            assert!(!s.is_null(), "open {service:?}: {}", message(err));
            s
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // SAFETY: the client handle from connect, freed once.
        unsafe { shmlink_client_free(self.client) };
    }
}

/// The message of an error object (and frees it).
fn message(err: *mut shmlink_error) -> String {
    // SAFETY: an error object from the library (or NULL), freed once here.
    unsafe {
        let m = CStr::from_ptr(shmlink_error_message(err))
            .to_string_lossy()
            .into_owned();
        shmlink_error_free(err);
        m
    }
}

/// Whether the session's fd polls readable within `ms`.
fn fd_readable(s: *const shmlink_session, ms: u16) -> bool {
    // SAFETY: a live session; its fd stays open while it lives.
    let fd = unsafe { BorrowedFd::borrow_raw(shmlink_session_fd(s)) };
    let mut fds = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::IN,
    )];
    let t = rustix::event::Timespec {
        tv_sec: i64::from(ms / 1000),
        tv_nsec: i64::from(ms % 1000) * 1_000_000,
    };
    rustix::event::poll(&mut fds, Some(&t)).expect("poll") == 1
}

#[test]
fn bad_arguments_give_invalid_argument_not_a_crash() {
    let mut err = ptr::null_mut();
    let bad = [0xffu8, 0xfe, 0];
    // SAFETY: NULL pointers and a NUL-terminated non-UTF-8 string are what is tested.
    unsafe {
        assert!(shmlink_client_connect(bad.as_ptr().cast(), &mut err).is_null());
        assert_eq!(shmlink_error_code(err), INVALID);
        assert!(message(err).contains("UTF-8"));
        let mut len = 0usize;
        let mut buf = [0u8; 4];
        assert_eq!(
            shmlink_session_recv(
                ptr::null_mut(),
                buf.as_mut_ptr().cast(),
                4,
                &mut len,
                ptr::null_mut()
            ),
            INVALID
        );
        assert_eq!(
            shmlink_session_send(ptr::null_mut(), ptr::null(), 0, ptr::null_mut()),
            INVALID
        );
        assert_eq!(shmlink_session_fd(ptr::null()), -1);
        assert_eq!(shmlink_options_set_capacity(ptr::null_mut(), 1), INVALID);
        let opts = shmlink_options_new();
        assert_eq!(shmlink_options_set_u32(opts, ptr::null(), 1), INVALID);
        assert_eq!(
            shmlink_options_set_string(opts, c"k".as_ptr(), bad.as_ptr().cast()),
            INVALID
        );
        shmlink_options_free(opts);
        assert_eq!(shmlink_error_code(ptr::null()), INVALID);
        shmlink_session_free(ptr::null_mut());
        shmlink_client_free(ptr::null_mut());
        let name = CStr::from_ptr(shmlink_status_name(TOO_SMALL));
        assert_eq!(name, c"SHMLINK_ERR_BUFFER_TOO_SMALL");
    }
}

#[test]
fn refused_open_reports_the_dbus_error_name() {
    let w = World::start();
    let mut err = ptr::null_mut();
    // SAFETY: live client, valid strings, writable error pointer.
    unsafe {
        let s = shmlink_session_open(w.client, c"no-such-service".as_ptr(), ptr::null(), &mut err);
        assert!(s.is_null());
        assert_eq!(
            shmlink_error_code(err),
            shmlink_status::SHMLINK_ERR_REFUSED as c_int
        );
        assert_eq!(
            CStr::from_ptr(shmlink_error_dbus_name(err)),
            c"org.shmlink.Error.UnknownService"
        );
        shmlink_error_free(err);
        // A typed service option the broker rejects is refused too.
        let opts = shmlink_options_new();
        assert_eq!(
            shmlink_options_set_u64(opts, c"no-such-option".as_ptr(), 1),
            OK
        );
        let mut err = ptr::null_mut();
        let s = shmlink_session_open(w.client, c"echo".as_ptr(), opts, &mut err);
        shmlink_options_free(opts);
        assert!(s.is_null());
        assert!(message(err).contains("no-such-option"));
    }
}

#[test]
fn too_small_buffer_keeps_the_message_and_end_repeats() {
    let w = World::start();
    let s = w.open(c"echo", 10_000);
    let msg: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    let mut small = [0u8; 100];
    let mut big = vec![0u8; 8192];
    let mut len = 0usize;
    let mut err = ptr::null_mut();
    // SAFETY: a live session, buffers of the sizes given, writable out-pointers.
    unsafe {
        assert_eq!(
            shmlink_session_send(s, msg.as_ptr().cast(), msg.len(), &mut err),
            OK
        );
        let rc = shmlink_session_recv(
            s,
            small.as_mut_ptr().cast(),
            small.len(),
            &mut len,
            &mut err,
        );
        assert_eq!(rc, TOO_SMALL);
        assert_eq!(len, msg.len());
        assert_eq!(shmlink_error_code(err), TOO_SMALL);
        shmlink_error_free(err);
        err = ptr::null_mut();
        // Asking for the size again with no buffer at all.
        assert_eq!(
            shmlink_session_try_recv(s, ptr::null_mut(), 0, &mut len, ptr::null_mut()),
            TOO_SMALL
        );
        assert_eq!(len, msg.len());
        len = 0;
        assert_eq!(
            shmlink_session_recv(s, big.as_mut_ptr().cast(), big.len(), &mut len, &mut err),
            OK
        );
        assert_eq!(&big[..len], &msg[..]);
        assert_eq!(shmlink_session_finish(s, &mut err), OK);
        for _ in 0..2 {
            assert_eq!(
                shmlink_session_recv(s, big.as_mut_ptr().cast(), big.len(), &mut len, &mut err),
                END
            );
        }
        assert_eq!(shmlink_session_close(s, &mut err), OK);
    }
}

#[test]
fn the_fd_wakes_for_messages_and_try_recv_resets_it() {
    let w = World::start();
    let s = w.open(c"echo", 10_000);
    let mut buf = [0u8; 64];
    let mut len = 0usize;
    // SAFETY: a live session, a 64-byte buffer, writable out-pointers.
    unsafe {
        assert_eq!(
            shmlink_session_try_recv(s, buf.as_mut_ptr().cast(), 64, &mut len, ptr::null_mut()),
            AGAIN
        );
        assert!(!fd_readable(s, 50), "readable with nothing sent");
        assert_eq!(
            shmlink_session_send(s, b"ping".as_ptr().cast(), 4, ptr::null_mut()),
            OK
        );
        assert!(fd_readable(s, 5000), "the echo never made the fd readable");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match shmlink_session_try_recv(
                s,
                buf.as_mut_ptr().cast(),
                64,
                &mut len,
                ptr::null_mut(),
            ) {
                OK => break,
                AGAIN => assert!(Instant::now() < deadline && fd_readable(s, 1000)),
                rc => panic!("try_recv gave {rc}"),
            }
        }
        assert_eq!(&buf[..len], b"ping");
        assert_eq!(
            shmlink_session_try_recv(s, buf.as_mut_ptr().cast(), 64, &mut len, ptr::null_mut()),
            AGAIN
        );
        assert!(
            !fd_readable(s, 50),
            "still readable after try_recv drained it"
        );
        shmlink_session_free(s);
    }
}

#[test]
fn the_fd_wakes_when_the_broker_ends_the_session() {
    let w = World::start();
    let s = w.open(c"echo", 10_000);
    // SAFETY: a live session.
    let path = unsafe { CStr::from_ptr(shmlink_session_path(s)) }
        .to_str()
        .unwrap()
        .to_owned();
    assert!(path.starts_with("/org/shmlink/"), "{path}");
    assert!(!fd_readable(s, 50));
    let other = shmlink::Client::connect(&w.bus.bus()).expect("second client");
    other
        .close_session(&path)
        .expect("Close by the owner's uid");
    assert!(
        fd_readable(s, 5000),
        "the hang-up never made the fd readable"
    );
    let mut err = ptr::null_mut();
    let mut len = 0usize;
    // SAFETY: a live session, no buffer (size 0), writable out-pointers.
    unsafe {
        let rc = shmlink_session_try_recv(s, ptr::null_mut::<c_void>(), 0, &mut len, &mut err);
        assert_eq!(rc, CLOSED, "{}", message(err));
        shmlink_error_free(err);
        shmlink_session_free(s);
    }
}

#[test]
fn a_blocking_recv_times_out() {
    let w = World::start();
    let s = w.open(c"echo", 200);
    let mut err = ptr::null_mut();
    let mut len = 0usize;
    let start = Instant::now();
    // SAFETY: a live session, no buffer, writable out-pointers.
    unsafe {
        let rc = shmlink_session_recv(s, ptr::null_mut(), 0, &mut len, &mut err);
        assert_eq!(rc, TIMED_OUT);
        assert!(message(err).contains("timed out"));
        assert!(start.elapsed() >= Duration::from_millis(150));
        // The session is still usable after a receive timed out.
        assert_eq!(shmlink_session_set_timeout(s, 10_000), OK);
        assert_eq!(
            shmlink_session_send(s, b"x".as_ptr().cast(), 1, ptr::null_mut()),
            OK
        );
        let mut b = [0u8; 1];
        assert_eq!(
            shmlink_session_recv(s, b.as_mut_ptr().cast(), 1, &mut len, ptr::null_mut()),
            OK
        );
        assert_eq!(&b, b"x");
        shmlink_session_free(s);
    }
}
