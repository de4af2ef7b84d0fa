//! Everything that can be wrong with a Bochs image, each variant carrying the offending
//! value and where it was found.

use crate::error::{ErrorKind, FormatError};

/// A Bochs-specific error.
#[derive(Debug, thiserror::Error)]
pub enum BochsError {
    /// The file is shorter than the header block.
    #[error("file is {len} bytes, too short for a Bochs header (512 bytes)")]
    TooShort {
        /// File length.
        len: u64,
    },
    /// Not a Bochs growing image.
    #[error("Image not in Bochs format: {0}")]
    Signature(String),
    /// A header field whose value is impossible or unsupported.
    #[error("Bochs header: {field} at {at:#x} is {value:#x}: {why}")]
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
    /// The catalog does not fit in the file.
    #[error("Bochs catalog at {at:#x} ({bytes:#x} bytes) lies past the end of the file ({len:#x} bytes)")]
    CatalogPastEof {
        /// Catalog offset.
        at: u64,
        /// Catalog bytes.
        bytes: u64,
        /// File length.
        len: u64,
    },
    /// A catalog entry whose extent lies past the end of the file.
    #[error("Bochs catalog entry {index} (at {at:#x}) is {value:#x}: its extent {start:#x}..{end:#x} lies past the end of the file ({len:#x} bytes)")]
    EntryPastEof {
        /// Catalog index.
        index: u32,
        /// File offset of the entry.
        at: u64,
        /// Entry value.
        value: u32,
        /// Extent start (its bitmap).
        start: u64,
        /// Extent end.
        end: u64,
        /// File length.
        len: u64,
    },
    /// Two catalog entries naming one extent.
    #[error("Bochs catalog entries {other} and {index} both point at extent {value:#x}")]
    EntryDuplicate {
        /// The later index.
        index: u32,
        /// The earlier index.
        other: u32,
        /// The shared value.
        value: u32,
    },
}

impl FormatError for BochsError {
    fn kind(&self) -> ErrorKind {
        use BochsError::*;
        match self {
            CatalogPastEof { .. } | EntryPastEof { .. } | EntryDuplicate { .. } => {
                ErrorKind::Corrupt
            }
            TooShort { .. } | Signature(_) | Field { .. } => ErrorKind::Invalid,
        }
    }
}

crate::impl_from_format_error!(BochsError);
