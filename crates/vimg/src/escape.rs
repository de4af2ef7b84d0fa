//! Printing names that came from an image.
//!
//! A backing file name, an extent file name or a parent locator is whatever bytes the image's
//! author put there. Printed raw, an ESC, BEL or CR in it can move the cursor, rewrite the line
//! or recolour the terminal, so an image could paint "safe" over an error. Every place that
//! prints such a name — human `info`, error messages — goes through [`escape_control`]. JSON
//! output needs nothing more: serde_json already writes control characters as `\u001b`, as
//! qemu-img's JSON does.

use std::borrow::Cow;
use std::fmt::Write as _;

/// `name` with every control character (C0, DEL and C1) written as `\xNN` (`\u{NNNN}` for
/// C1), and a backslash doubled so an escaped name cannot be confused with a literal one.
/// Printable text, including non-ASCII letters, is returned unchanged without allocating.
///
/// ```
/// use vimg::escape::escape_control;
/// assert_eq!(escape_control("base.qcow2"), "base.qcow2");
/// assert_eq!(escape_control("a\x1b[2Kb\r"), "a\\x1b[2Kb\\x0d");
/// assert_eq!(escape_control("C:\\disk"), "C:\\\\disk");
/// ```
pub fn escape_control(name: &str) -> Cow<'_, str> {
    if !name.chars().any(|c| c.is_control() || c == '\\') {
        return Cow::Borrowed(name);
    }
    let mut out = String::with_capacity(name.len() + 8);
    for c in name.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x80 && c.is_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:04x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// [`escape_control`] of a path's bytes; bytes that are not UTF-8 are written as `\xNN`.
pub fn escape_path(path: &std::path::Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        out.push_str(&escape_control(chunk.valid()));
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_names_are_borrowed() {
        assert!(matches!(escape_control("dir/bäse.vmdk"), Cow::Borrowed(_)));
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(
            escape_control("\x07\x1b\r\n\x7f"),
            "\\x07\\x1b\\x0d\\x0a\\x7f"
        );
        assert_eq!(escape_control("a\u{9b}b"), "a\\u{009b}b");
    }

    #[test]
    fn invalid_utf8_in_paths_is_escaped() {
        use std::os::unix::ffi::OsStrExt;
        let p = std::path::Path::new(std::ffi::OsStr::from_bytes(b"a\xffb\x1b"));
        assert_eq!(escape_path(p), "a\\xffb\\x1b");
    }
}
