//! QEMU's `blkdebug` error-injection layer, for the names a user types on the command line:
//! `blkdebug:CONFIG:FILE`, `blkdebug::FILE`, `json:{"driver": "blkdebug", ...}` (above a
//! format, injecting into guest requests) and `json:{"driver": FMT, "file": {"driver":
//! "blkdebug", ...}}` / `--image-opts` (between a format and its file).
//!
//! Rules are read as QEMU reads them: a config file of `[inject-error]` and `[set-state]`
//! sections (`key = "value"` lines), or the `inject-error` / `set-state` lists of the
//! options. A rule waits for its *event* (`read_aio`, `l1_update`, ... or `none`, which fires
//! when the layer opens); when the event fires in the rule's `state` (0: any), an
//! `inject-error` rule becomes active and a `set-state` rule moves the layer to `new_state`.
//! An active rule fails every request of its `iotype`s (default: all but block-status) that
//! covers its `sector` (default: any) with `errno` (default 5, EIO); `once` removes it after
//! its first error.
//!
//! A name read from an image never gets here: the gate refuses protocol names.

pub(crate) mod open;
mod rules;
pub mod writes;

pub use open::{parse_name, BlkdebugName, BlkdebugStorage, Level};
pub use rules::{Blkdebug, Event, IoType};

use std::cell::Cell;
use std::io;

thread_local! {
    static READING: Cell<bool> = const { Cell::new(false) };
}

/// While alive, this thread maps guest ranges to read them: the mapping a read needs is not
/// a block-status request (QEMU reads without asking for status), so a blkdebug layer's
/// `block-status` rules do not apply to it.
pub struct Reading {
    was: bool,
}

impl Reading {
    /// Marks this thread as reading until the guard is dropped.
    pub fn enter() -> Reading {
        Reading {
            was: READING.with(|r| r.replace(true)),
        }
    }

    pub(crate) fn active() -> bool {
        READING.with(|r| r.get())
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        READING.with(|r| r.set(self.was));
    }
}

/// The text of an errno, as C's `strerror` gives it (`Input/output error`), for messages
/// worded as qemu-img words them.
pub fn strerror(errno: i32) -> String {
    // SAFETY: strerror returns a pointer to a NUL-terminated static or thread-local string.
    let p = unsafe { libc::strerror(errno) };
    if p.is_null() {
        return format!("error {errno}");
    }
    unsafe { std::ffi::CStr::from_ptr(p) }
        .to_string_lossy()
        .into_owned()
}

/// The errno of the I/O error at the bottom of `e`, if there is one.
pub fn os_error(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            if let Some(n) = io.raw_os_error() {
                return Some(n);
            }
            if let Some(inner) = io.get_ref() {
                cur = Some(inner);
                continue;
            }
        }
        if let Some(inner) = err.downcast_ref::<crate::Error>() {
            cur = Some(inner.message());
            continue;
        }
        cur = err.source();
    }
    None
}

/// How qemu-img words the errno of an error (`Input/output error`); the error's own text when
/// it carries no errno.
pub fn error_text(e: &crate::Error) -> String {
    match os_error(e) {
        Some(n) => strerror(n),
        None => e.message().to_string(),
    }
}
