//! Everything that can be wrong with a dmg, each variant carrying the offending value and
//! where it was found.

use crate::error::{ErrorKind, FormatError};

/// A dmg-specific error.
#[derive(Debug, thiserror::Error)]
pub enum DmgError {
    /// The file is shorter than the trailer.
    #[error("dmg file must be at least 512 bytes long (it is {len})")]
    TooShort {
        /// File length.
        len: u64,
    },
    /// No UDIF trailer at the end.
    #[error("Could not locate UDIF trailer in dmg file (no \"koly\" at {at:#x})")]
    Trailer {
        /// Where it was looked for.
        at: u64,
    },
    /// A trailer field whose value is impossible.
    #[error("dmg trailer: {field} at {at:#x} is {value:#x}: {why}")]
    Field {
        /// The field.
        field: &'static str,
        /// Its offset in the file.
        at: u64,
        /// Its value.
        value: u64,
        /// What is wrong.
        why: String,
    },
    /// A chunk type or layout vimg does not read.
    #[error("unsupported dmg: {0}")]
    Unsupported(String),
    /// A chunk out of the file, overlapping another, or a disk with sectors in no chunk.
    #[error("dmg {0}")]
    Chunk(String),
}

impl FormatError for DmgError {
    fn kind(&self) -> ErrorKind {
        use DmgError::*;
        match self {
            Chunk(_) => ErrorKind::Corrupt,
            Unsupported(_) => ErrorKind::Unsupported,
            TooShort { .. } | Trailer { .. } | Field { .. } => ErrorKind::Invalid,
        }
    }
}

crate::impl_from_format_error!(DmgError);
