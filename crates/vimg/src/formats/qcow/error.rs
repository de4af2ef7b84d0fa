//! Everything that can be wrong with a qcow (version 1) image, each variant carrying the
//! offending value and where it was found.

use crate::error::{ErrorKind, FormatError};

/// A qcow-specific error.
#[derive(Debug, thiserror::Error)]
pub enum QcowError {
    /// The file is shorter than the header.
    #[error("file is {len} bytes, too short for a qcow header (48 bytes)")]
    TooShort {
        /// File length.
        len: u64,
    },
    /// Not a qcow version 1 image.
    #[error("Image not in qcow format (magic {magic:#010x}, version {version})")]
    Magic {
        /// The magic.
        magic: u32,
        /// The version.
        version: u32,
    },
    /// A header field whose value is impossible.
    #[error("qcow header: {field} at {at:#x} is {value:#x}: {why}")]
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
    /// An encrypted image.
    #[error("qcow image is encrypted (crypt_method at 0x24 is {0}, AES); vimg does not read encrypted qcow images")]
    Encrypted(u32),
    /// A table or cluster outside the file or on top of other metadata.
    #[error("qcow {what} is {value:#x}: {why}")]
    Offset {
        /// Which entry.
        what: String,
        /// Its value.
        value: u64,
        /// What is wrong.
        why: String,
    },
}

impl FormatError for QcowError {
    fn kind(&self) -> ErrorKind {
        use QcowError::*;
        match self {
            Offset { .. } => ErrorKind::Corrupt,
            Encrypted(_) => ErrorKind::Unsupported,
            TooShort { .. } | Magic { .. } | Field { .. } => ErrorKind::Invalid,
        }
    }
}

crate::impl_from_format_error!(QcowError);
