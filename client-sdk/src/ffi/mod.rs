//! The C ABI: opaque handles, status codes with an error message, panics caught at the boundary. The only module with `unsafe`.
//!
//! The conventions follow *uniffi*:
//!
//! - Every function returns an `int32_t` status: [`FEDREC_OK`] (0) or an error code — the
//!   stable codes of [`SdkError::code`](crate::error::SdkError::code) plus the `FEDREC_ERR_*`
//!   codes of this module for misuse of the ABI itself.
//! - Every fallible function takes a last `FedrecError **err`. On failure `*err` receives a
//!   [`FedrecError`] (code and message) that the caller frees with [`fedrec_error_free`]; on
//!   success `*err` is set to NULL. `err` itself may be NULL when the caller only wants the
//!   status.
//! - Out-parameters are cleared at entry, before anything can fail: on failure each non-NULL
//!   one holds its empty value (NULL, `{NULL, 0}`, false, 0), which is safe to free.
//! - A panic never crosses the boundary: it becomes [`FEDREC_ERR_PANIC`] (functions without a
//!   status, such as the `*_free`s, swallow it).
//! - Everything returned is allocated by the SDK and freed by the matching `fedrec_*_free`;
//!   nothing returned borrows from a handle or from an argument.
//! - Handles are thread-safe: any number of threads may call functions on one handle at once.
//!   Only the `*_close` / `*_free` of a handle must not race with other calls on it.
//!
//! The header `include/fedrec.h` is generated from this module by cbindgen
//! (`FEDREC_BLESS=1 cargo test -p fedrec-client --test header` rewrites it).
#![allow(unsafe_code)]

mod handle;
#[cfg(test)]
mod tests;

use std::ffi::{CStr, CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr::NonNull;

pub use handle::*;

use crate::error::SdkError;

/// The status of a call that succeeded.
pub const FEDREC_OK: i32 = 0;

// The SDK's own codes (`SdkError::code`), stable: never renumbered, new ones may be added.

/// An argument or a configuration value is invalid (the message names which).
pub const FEDREC_ERR_INVALID_ARGUMENT: i32 = 1;
/// The user has not given the consent this call needs.
pub const FEDREC_ERR_CONSENT_REQUIRED: i32 = 2;
/// The store could not be opened: wrong key, or the file was tampered with or corrupted
/// (an AEAD cannot tell these apart). Open with `recover`, or `fedrec_sdk_erase`.
pub const FEDREC_ERR_WRONG_KEY_OR_CORRUPT: i32 = 3;
/// The store file is structurally broken (truncated, not a store, over the size cap).
pub const FEDREC_ERR_STORE_CORRUPT: i32 = 4;
/// The store was written by a newer SDK.
pub const FEDREC_ERR_UNSUPPORTED_VERSION: i32 = 5;
/// Reading or writing the store failed; the previous good file is intact.
pub const FEDREC_ERR_STORE_IO: i32 = 6;
/// Something would exceed a configured bound (memory budget, store size cap).
pub const FEDREC_ERR_TOO_LARGE: i32 = 7;
/// No model is installed yet: take part in a round first.
pub const FEDREC_ERR_NO_MODEL: i32 = 8;
/// The call needs configuration the SDK was opened without (a coordinator, a rules key, a
/// ruleset).
pub const FEDREC_ERR_NOT_CONFIGURED: i32 = 9;
/// The coordinator could not be reached, timed out, misbehaved or refused.
pub const FEDREC_ERR_NETWORK: i32 = 10;
/// The device is not eligible to participate now (the coordinator's policy).
pub const FEDREC_ERR_NOT_ELIGIBLE: i32 = 11;
/// The participation was cancelled through its `FedrecCancel`.
pub const FEDREC_ERR_CANCELLED: i32 = 12;
/// A ruleset was refused: unsigned, tampered, signed by another key, older, or malformed.
pub const FEDREC_ERR_RULES_REJECTED: i32 = 13;
/// The handle was closed by `fedrec_sdk_forget`.
pub const FEDREC_ERR_CLOSED: i32 = 14;
/// Another participation is already running on this handle.
pub const FEDREC_ERR_BUSY: i32 = 15;
/// A bug or an unexpected state inside the SDK.
pub const FEDREC_ERR_INTERNAL: i32 = 16;
/// Another open handle, in this process or another, holds the SDK folder: one folder has one
/// handle at a time (share it between threads, or close it first).
pub const FEDREC_ERR_LOCKED: i32 = 17;
/// The store is older than the last one the SDK wrote in the folder (an older copy was put
/// back, which could restore a withdrawn consent). The file is left untouched; open with
/// `recover` to move it aside and start empty.
pub const FEDREC_ERR_ROLLBACK: i32 = 18;

// Misuse of the C ABI itself.

/// A pointer argument that must not be NULL was NULL.
pub const FEDREC_ERR_NULL_POINTER: i32 = 100;
/// A string argument was not valid UTF-8.
pub const FEDREC_ERR_INVALID_UTF8: i32 = 101;
/// The SDK panicked (a bug). The panic was caught; the app keeps running. The call had no
/// effect that can be relied on, and later calls on the handle may report an internal error:
/// close it and open the store again.
pub const FEDREC_ERR_PANIC: i32 = 102;

/// An error reported by a call: its status code and a message for people.
///
/// Allocated by the SDK and owned by the caller, who frees it with `fedrec_error_free`.
/// Messages never contain user data.
#[repr(C)]
#[derive(Debug)]
pub struct FedrecError {
    /// The status code the call returned (never `FEDREC_OK`).
    pub code: i32,
    /// A NUL-terminated UTF-8 message. Owned by this error: valid until `fedrec_error_free`.
    pub message: *mut c_char,
}

/// Why a call failed, before it crosses the boundary.
#[derive(Debug)]
struct Failure {
    code: i32,
    message: String,
}

impl Failure {
    fn new(code: i32, message: impl Into<String>) -> Failure {
        Failure { code, message: message.into() }
    }

    fn null(what: &str) -> Failure {
        Failure::new(FEDREC_ERR_NULL_POINTER, format!("{what} is NULL"))
    }

    fn invalid(message: impl Into<String>) -> Failure {
        Failure::new(FEDREC_ERR_INVALID_ARGUMENT, message)
    }
}

impl From<SdkError> for Failure {
    fn from(e: SdkError) -> Failure {
        Failure::new(e.code(), e.to_string())
    }
}

/// Runs the body of an exported function: clears `*err`, catches panics, and turns a failure
/// into its status code and a [`FedrecError`] in `*err`.
fn call(err: *mut *mut FedrecError, body: impl FnOnce() -> Result<(), Failure>) -> i32 {
    let err = NonNull::new(err);
    if let Some(err) = err {
        // SAFETY: a non-NULL `err` points to a writable `FedrecError *` (the contract of every
        // exported function that takes one).
        unsafe { err.write(std::ptr::null_mut()) };
    }
    // After an unwind nothing half-updated is observed: the SDK's state sits behind a mutex
    // that the panic poisons, and a poisoned SDK answers every later call with an error.
    let outcome = catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|_| {
        Err(Failure::new(FEDREC_ERR_PANIC, "the SDK hit an internal error (a bug); the call had no effect"))
    });
    match outcome {
        Ok(()) => FEDREC_OK,
        Err(failure) => {
            let code = failure.code;
            if let Some(err) = err {
                let error = Box::new(FedrecError { code, message: c_string(failure.message).into_raw() });
                // SAFETY: as above; the caller now owns the error and frees it with
                // `fedrec_error_free`.
                unsafe { err.write(Box::into_raw(error)) };
            }
            code
        }
    }
}

/// Runs the body of an exported function that has no status to report (the `*_free`s, the
/// `*_default`s, [`fedrec_version`]): a panic is caught and `on_panic` returned instead.
fn guard<T>(on_panic: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(on_panic)
}

/// `text` as a C string; the (never expected) NUL bytes become U+FFFD.
fn c_string(text: String) -> CString {
    CString::new(text).unwrap_or_else(|e| {
        let text = String::from_utf8_lossy(&e.into_vec()).replace('\0', "\u{FFFD}");
        CString::new(text).expect("every NUL byte was replaced")
    })
}

/// A string argument: NUL-terminated UTF-8, not NULL.
///
/// # Safety
/// `ptr` is NULL or points to a NUL-terminated string that stays valid and unchanged while
/// the returned borrow lives.
unsafe fn str_arg<'a>(ptr: *const c_char, what: &str) -> Result<&'a str, Failure> {
    if ptr.is_null() {
        return Err(Failure::null(what));
    }
    // SAFETY: not NULL, and NUL-terminated and valid by the caller's contract.
    let bytes = unsafe { CStr::from_ptr(ptr) };
    bytes.to_str().map_err(|_| Failure::new(FEDREC_ERR_INVALID_UTF8, format!("{what} is not valid UTF-8")))
}

/// An optional string argument: NULL means none.
///
/// # Safety
/// As [`str_arg`].
unsafe fn opt_str_arg<'a>(ptr: *const c_char, what: &str) -> Result<Option<&'a str>, Failure> {
    if ptr.is_null() {
        return Ok(None);
    }
    // SAFETY: the caller's contract is the one `str_arg` needs.
    unsafe { str_arg(ptr, what) }.map(Some)
}

/// A byte-buffer argument: `len` bytes at `ptr`; `ptr` may be NULL only when `len` is 0.
///
/// # Safety
/// `ptr` is NULL or points to `len` readable bytes that stay unchanged while the returned
/// borrow lives.
unsafe fn bytes_arg<'a>(ptr: *const u8, len: usize, what: &str) -> Result<&'a [u8], Failure> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(Failure::null(what));
    }
    if len > isize::MAX as usize {
        return Err(Failure::invalid(format!("{what} is longer than any buffer can be")));
    }
    // SAFETY: not NULL, `len` readable bytes by the caller's contract, and `len` fits a slice.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// The value an out-parameter holds until the call succeeds: it means "nothing" and is safe to
/// pass to the matching `*_free`.
trait Empty {
    /// NULL, `{NULL, 0}`, false or 0.
    const EMPTY: Self;
}

impl<T> Empty for *mut T {
    const EMPTY: Self = std::ptr::null_mut();
}

impl Empty for bool {
    const EMPTY: Self = false;
}

impl Empty for u32 {
    const EMPTY: Self = 0;
}

impl Empty for u64 {
    const EMPTY: Self = 0;
}

impl Empty for f32 {
    const EMPTY: Self = 0.0;
}

/// An out-parameter, cleared and checked for NULL before the call does any work.
struct Out<T>(NonNull<T>);

impl<T: Empty> Out<T> {
    /// Writes the empty value into a non-NULL `ptr` at once, so that a caller who frees its
    /// out-parameters whatever the status frees nothing when the call fails. A function with
    /// several out-parameters creates every `Out` before it checks any (`?`), so all are
    /// cleared even when one is NULL.
    ///
    /// # Safety
    /// `ptr` is NULL or valid for a write of a `T` for the rest of the call.
    unsafe fn new(ptr: *mut T, what: &str) -> Result<Out<T>, Failure> {
        let ptr = NonNull::new(ptr).ok_or_else(|| Failure::null(what))?;
        // SAFETY: not NULL, and valid for a write of a `T` (this function's contract); what was
        // there is overwritten, not dropped (it may be uninitialised).
        unsafe { ptr.write(T::EMPTY) };
        Ok(Out(ptr))
    }

    /// Writes the result; what was there before is overwritten, not dropped.
    fn put(self, value: T) {
        // SAFETY: `Out::new`'s contract: the pointer is valid for a write of a `T`.
        unsafe { self.0.write(value) }
    }
}

/// Moves a Rust string to the caller as a `char *` freed with [`fedrec_string_free`].
fn give_string(text: String) -> Result<*mut c_char, Failure> {
    CString::new(text)
        .map(CString::into_raw)
        .map_err(|_| Failure::invalid("the result holds a NUL byte and cannot be a C string"))
}

/// The SDK's version, e.g. `"0.1.0"`: a static NUL-terminated string (never freed).
#[unsafe(no_mangle)]
pub extern "C" fn fedrec_version() -> *const c_char {
    const VERSION: &CStr =
        match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(v) => v,
            Err(_) => panic!("the package version has no NUL byte"),
        };
    guard(c"".as_ptr(), || VERSION.as_ptr())
}

/// Frees an error returned through a `FedrecError **err`. NULL is allowed (nothing happens).
///
/// # Safety
/// `err` is NULL or an error from this SDK that was not freed yet.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedrec_error_free(err: *mut FedrecError) {
    guard((), || {
        if err.is_null() {
            return;
        }
        // SAFETY: `err` came from `Box::into_raw` in `call` and is freed once (caller's contract).
        let error = unsafe { Box::from_raw(err) };
        if !error.message.is_null() {
            // SAFETY: `message` came from `CString::into_raw` in `call` and belongs to this error.
            drop(unsafe { CString::from_raw(error.message) });
        }
    });
}

/// Frees a string returned by the SDK (`char **` out-parameters). NULL is allowed.
///
/// # Safety
/// `s` is NULL or a string returned by this SDK that was not freed yet.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedrec_string_free(s: *mut c_char) {
    guard((), || {
        if s.is_null() {
            return;
        }
        // SAFETY: `s` came from `CString::into_raw` in `give_string`, freed once (caller's contract).
        drop(unsafe { CString::from_raw(s) });
    });
}
