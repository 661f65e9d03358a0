//! The boundary with C: every raw pointer the library receives is turned
//! into a Rust reference here, and every call runs under [`guard`], so no
//! panic unwinds into C. This module holds all of the crate's `unsafe`
//! except the one-line calls into it.

use crate::error::{shmlink_error, Failure};
use crate::shmlink_status;
use std::ffi::{c_char, c_int, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs `f`, turning an error or a panic into `on_error(code)` and, when
/// `err` is not NULL, a new error object in `*err`.
///
/// # Safety
/// `err` is NULL or valid for writing one pointer.
pub(crate) unsafe fn guard<T>(
    err: *mut *mut shmlink_error,
    on_error: impl FnOnce(c_int) -> T,
    f: impl FnOnce() -> Result<T, Failure>,
) -> T {
    let failure = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => return v,
        Ok(Err(failure)) => failure,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Failure::new(
                shmlink_status::SHMLINK_ERR_INTERNAL,
                format!("internal error in libshmlink: {what}"),
            )
        }
    };
    log::debug!("libshmlink call failed: {}", failure.message);
    let code = failure.code as c_int;
    if !err.is_null() {
        // Building the error object allocates; keep even that from unwinding.
        if let Ok(e) = catch_unwind(AssertUnwindSafe(|| {
            Box::into_raw(Box::new(failure.into_error()))
        })) {
            // SAFETY: `err` is not NULL and the caller guarantees it is valid
            // for writing one pointer.
            unsafe { err.write(e) };
        }
    }
    on_error(code)
}

/// [`guard`] for calls that return a status code.
///
/// # Safety
/// As for [`guard`].
pub(crate) unsafe fn status(
    err: *mut *mut shmlink_error,
    f: impl FnOnce() -> Result<shmlink_status, Failure>,
) -> c_int {
    // SAFETY: passed on from our caller, who makes the same promise.
    unsafe { guard(err, |code| code, || f().map(|s| s as c_int)) }
}

/// Borrows the object behind a handle.
///
/// # Safety
/// `p` is NULL or points to a live `T` that nothing else mutates while the
/// reference lives.
pub(crate) unsafe fn obj<'a, T>(p: *const T, what: &str) -> Result<&'a T, Failure> {
    // SAFETY: the caller's promise above; NULL gives `None`.
    unsafe { p.as_ref() }.ok_or_else(|| Failure::invalid(format!("{what} is NULL")))
}

/// Borrows the object behind a handle mutably.
///
/// # Safety
/// `p` is NULL or points to a live `T` that nothing else uses while the
/// reference lives.
pub(crate) unsafe fn obj_mut<'a, T>(p: *mut T, what: &str) -> Result<&'a mut T, Failure> {
    // SAFETY: the caller's promise above; NULL gives `None`.
    unsafe { p.as_mut() }.ok_or_else(|| Failure::invalid(format!("{what} is NULL")))
}

/// Reads a NUL-terminated UTF-8 string.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that stays unchanged
/// while the reference lives.
pub(crate) unsafe fn string<'a>(p: *const c_char, what: &str) -> Result<&'a str, Failure> {
    if p.is_null() {
        return Err(Failure::invalid(format!("{what} is NULL")));
    }
    // SAFETY: not NULL, and NUL-terminated by the caller's promise.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map_err(|e| Failure::invalid(format!("{what} is not valid UTF-8: {e}")))
}

/// Borrows `len` bytes at `p`; NULL is accepted when `len` is 0.
///
/// # Safety
/// Unless `len` is 0, `p` points to `len` readable bytes that stay
/// unchanged while the slice lives.
pub(crate) unsafe fn bytes<'a>(p: *const u8, len: usize, what: &str) -> Result<&'a [u8], Failure> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Failure::invalid(format!(
            "{what} is NULL but its length is {len}"
        )));
    }
    if len > isize::MAX as usize {
        return Err(Failure::invalid(format!(
            "{what}: length {len} is impossible"
        )));
    }
    // SAFETY: not NULL, `len` fits a slice, and the caller promises `len`
    // readable bytes that nothing changes meanwhile.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// Borrows `len` writable bytes at `p`; NULL is accepted when `len` is 0.
///
/// # Safety
/// Unless `len` is 0, `p` points to `len` writable bytes that nothing else
/// uses while the slice lives.
pub(crate) unsafe fn bytes_mut<'a>(
    p: *mut u8,
    len: usize,
    what: &str,
) -> Result<&'a mut [u8], Failure> {
    if len == 0 {
        return Ok(&mut []);
    }
    if p.is_null() {
        return Err(Failure::invalid(format!(
            "{what} is NULL but its size is {len}"
        )));
    }
    if len > isize::MAX as usize {
        return Err(Failure::invalid(format!(
            "{what}: size {len} is impossible"
        )));
    }
    // SAFETY: not NULL, `len` fits a slice, and the caller promises `len`
    // writable bytes that nothing else uses meanwhile. Writing arbitrary
    // bytes into them is fine: u8 has no invalid values.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
}

/// Stores `v` in `*p` unless `p` is NULL.
///
/// # Safety
/// `p` is NULL or valid for writing one `T`.
pub(crate) unsafe fn store<T>(p: *mut T, v: T) {
    if !p.is_null() {
        // SAFETY: not NULL and writable by the caller's promise.
        unsafe { p.write(v) };
    }
}

/// Moves `v` to the heap and hands the pointer to C.
pub(crate) fn into_handle<T>(v: T) -> *mut T {
    Box::into_raw(Box::new(v))
}

/// Takes back and drops a handle made by [`into_handle`]; NULL is ignored.
///
/// # Safety
/// `p` is NULL or came from [`into_handle`] for this `T` and is not used
/// again.
pub(crate) unsafe fn free<T>(p: *mut T) {
    if !p.is_null() {
        // SAFETY: made by `Box::into_raw` in `into_handle`, and never used
        // again by the caller's promise.
        drop(unsafe { Box::from_raw(p) });
    }
}

/// Takes back a handle made by [`into_handle`] to consume its object.
///
/// # Safety
/// As for [`free`].
pub(crate) unsafe fn take<T>(p: *mut T, what: &str) -> Result<T, Failure> {
    if p.is_null() {
        return Err(Failure::invalid(format!("{what} is NULL")));
    }
    // SAFETY: made by `Box::into_raw` in `into_handle`, and never used again
    // by the caller's promise.
    Ok(*unsafe { Box::from_raw(p) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ptr;

    /// Takes the message out of an error object and frees it.
    fn take_message(err: *mut shmlink_error) -> (c_int, String) {
        // SAFETY: an error object made by `guard`, freed once here.
        let e = unsafe { take(err, "error") }.expect("an error object");
        (e.code as c_int, e.message.to_string_lossy().into_owned())
    }

    #[test]
    fn a_panic_becomes_an_internal_error() {
        let mut err = ptr::null_mut();
        // SAFETY: `err` is a writable pointer.
        let code = unsafe { status(&mut err, || panic!("boom in a callback")) };
        assert_eq!(code, shmlink_status::SHMLINK_ERR_INTERNAL as c_int);
        let (c, m) = take_message(err);
        assert_eq!(c, code);
        assert!(m.contains("boom in a callback"), "{m}");
    }

    #[test]
    fn a_failure_sets_the_error_and_a_success_leaves_it() {
        let mut err = ptr::null_mut();
        // SAFETY: `err` is a writable pointer.
        let ok = unsafe { status(&mut err, || Ok(shmlink_status::SHMLINK_AGAIN)) };
        assert_eq!(ok, shmlink_status::SHMLINK_AGAIN as c_int);
        assert!(err.is_null());
        // SAFETY: as above; a NUL inside the message must not cut it or fail.
        let code = unsafe {
            status(&mut err, || {
                Err(Failure::new(shmlink_status::SHMLINK_ERR_PEER, "bad\0name"))
            })
        };
        assert_eq!(code, shmlink_status::SHMLINK_ERR_PEER as c_int);
        assert_eq!(take_message(err), (code, "bad\u{fffd}name".to_string()));
        // SAFETY: NULL `err` means the caller does not want details.
        let code = unsafe { status(ptr::null_mut(), || Err(Failure::invalid("x"))) };
        assert_eq!(code, shmlink_status::SHMLINK_ERR_INVALID_ARGUMENT as c_int);
    }
}
