//! Errors of the vmdk format: each names the structure, where it was found and the bad value.

use crate::error::{ErrorKind, FormatError};

/// What is wrong with a VMDK image.
#[derive(Debug, thiserror::Error)]
pub enum VmdkError {
    /// A header field is out of the range the format (or vimg's limits) allows.
    #[error("{structure}: {field} = {value:#x} (at byte {offset:#x}) is invalid: {why}")]
    BadField {
        /// The structure (e.g. "sparse extent header").
        structure: &'static str,
        /// Byte offset of the field (or of its structure) in its file.
        offset: u64,
        /// The field name.
        field: &'static str,
        /// The value found.
        value: u64,
        /// What was wrong.
        why: &'static str,
    },
    /// A magic number did not match.
    #[error("{structure} at {offset:#x}: bad magic {found:#x}")]
    BadMagic {
        /// The structure.
        structure: &'static str,
        /// Byte offset.
        offset: u64,
        /// The magic found.
        found: u64,
    },
    /// A valid feature vimg does not implement.
    #[error("unsupported VMDK feature: {0}")]
    Unsupported(String),
    /// A condition qemu-img words its own way: its words, then vimg's detail.
    #[error("{words} ({detail})")]
    QemuWords {
        /// qemu-img's message.
        words: String,
        /// Which file, structure, field and value.
        detail: String,
        /// Invalid (a bad field) or corrupt (a file cut short).
        kind: ErrorKind,
    },
    /// An extent line is malformed (qemu's "Invalid extent line" first).
    #[error("Invalid extent line: {text} (descriptor line {line}: {why})")]
    ExtentLine {
        /// 1-based line number.
        line: usize,
        /// The line, control characters escaped.
        text: String,
        /// What was wrong.
        why: String,
    },
    /// The descriptor text is malformed.
    #[error(
        "invalid VMDK descriptor, line {line}: {}",
        crate::escape::escape_control(why)
    )]
    Descriptor {
        /// 1-based line number.
        line: usize,
        /// What was wrong.
        why: String,
    },
    /// A table points past the end of its file.
    #[error("{table} at {offset:#x} ({len:#x} bytes) extends past the end of the file ({file_len:#x} bytes)")]
    PastEof {
        /// The table or structure.
        table: String,
        /// Its byte offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// The file length.
        file_len: u64,
    },
    /// A table entry is out of range or points at something it must not.
    #[error("{table} entry {index} = {value:#x} is invalid: {why}")]
    BadEntry {
        /// The table (e.g. "extent 1 grain table 3").
        table: String,
        /// The entry index.
        index: u64,
        /// The entry's value.
        value: u64,
        /// What was wrong.
        why: &'static str,
    },
    /// The footer of a stream-optimized extent disagrees with its header.
    #[error("footer at {offset:#x} disagrees with the header: {field} is {footer:#x} in the footer, {header:#x} in the header")]
    FooterMismatch {
        /// Byte offset of the footer header.
        offset: u64,
        /// The field that differs.
        field: &'static str,
        /// Footer value.
        footer: u64,
        /// Header value.
        header: u64,
    },
    /// Something the writer was asked for is impossible.
    #[error("{0}")]
    Argument(String),
}

impl FormatError for VmdkError {
    fn kind(&self) -> ErrorKind {
        match self {
            VmdkError::BadField { .. } | VmdkError::BadMagic { .. } => ErrorKind::Invalid,
            VmdkError::Descriptor { .. } | VmdkError::ExtentLine { .. } => ErrorKind::Invalid,
            VmdkError::QemuWords { kind, .. } => *kind,
            VmdkError::Unsupported(_) => ErrorKind::Unsupported,
            VmdkError::PastEof { .. } | VmdkError::BadEntry { .. } => ErrorKind::Corrupt,
            VmdkError::FooterMismatch { .. } => ErrorKind::Corrupt,
            VmdkError::Argument(_) => ErrorKind::InvalidArgument,
        }
    }
}
crate::impl_from_format_error!(VmdkError);
