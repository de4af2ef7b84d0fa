//! Everything that can be wrong with a cloop image, each variant carrying the offending
//! value and where it was found.

use crate::error::{ErrorKind, FormatError};

/// A cloop-specific error.
#[derive(Debug, thiserror::Error)]
pub enum CloopError {
    /// The file is shorter than the header.
    #[error("file is {len} bytes, too short for a cloop header (136 bytes)")]
    TooShort {
        /// File length.
        len: u64,
    },
    /// Not a cloop V2.0 image.
    #[error("Image not in cloop format: the V2.0 shell preamble is missing")]
    Signature,
    /// A header field whose value is impossible or unsupported.
    #[error("cloop header: {field} at {at:#x} is {value:#x}: {why}")]
    Field {
        /// The field.
        field: &'static str,
        /// Its offset.
        at: u64,
        /// Its value.
        value: u64,
        /// What is wrong.
        why: String,
    },
    /// The offsets table does not fit in the file.
    #[error("cloop offsets table at 0x88 ({bytes:#x} bytes) lies past the end of the file ({len:#x} bytes)")]
    TablePastEof {
        /// Table bytes.
        bytes: u64,
        /// File length.
        len: u64,
    },
    /// An offset out of order, inside the table, past the end of the file, or a block too
    /// long to be a compressed block.
    #[error("cloop offset {index} (at {at:#x}) is {value:#x}: {why}")]
    Offset {
        /// Table index.
        index: u32,
        /// File offset of the entry.
        at: u64,
        /// Its value.
        value: u64,
        /// What is wrong.
        why: String,
    },
}

impl FormatError for CloopError {
    fn kind(&self) -> ErrorKind {
        use CloopError::*;
        match self {
            TablePastEof { .. } | Offset { .. } => ErrorKind::Corrupt,
            TooShort { .. } | Signature | Field { .. } => ErrorKind::Invalid,
        }
    }
}

crate::impl_from_format_error!(CloopError);
