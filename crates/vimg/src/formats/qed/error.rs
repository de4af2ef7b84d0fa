//! Everything that can be wrong with a QED image, each variant carrying the offending
//! value and where it was found.

use crate::error::{ErrorKind, FormatError};

/// A QED-specific error.
#[derive(Debug, thiserror::Error)]
pub enum QedError {
    /// The file is shorter than the header.
    #[error("file is {len} bytes, too short for a QED header (64 bytes)")]
    TooShort {
        /// File length.
        len: u64,
    },
    /// Not a QED image.
    #[error("Image not in QED format (magic at 0x0 is {found:#010x})")]
    Magic {
        /// The magic found.
        found: u32,
    },
    /// A header field whose value is impossible.
    #[error("QED header: {field} at {at:#x} is {value:#x}: {why}")]
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
    /// Feature bits vimg (and QEMU) do not know.
    #[error("Unsupported QED features {0:#x} (features at 0x10)")]
    Features(u64),
    /// A table or cluster that lies outside the file, is misaligned or inside the header.
    #[error("QED {what} is {value:#x}: {why}")]
    Offset {
        /// Which entry (e.g. "L1 entry 3 (at 0x10018)").
        what: String,
        /// Its value.
        value: u64,
        /// What is wrong.
        why: String,
    },
    /// Two table entries naming one cluster.
    #[error("QED {first} and {second} both point at cluster {value:#x}")]
    Duplicate {
        /// First user.
        first: String,
        /// Second user.
        second: String,
        /// The cluster offset.
        value: u64,
    },
    /// A creation option with a bad value.
    #[error("{0}")]
    Option(String),
}

impl FormatError for QedError {
    fn kind(&self) -> ErrorKind {
        use QedError::*;
        match self {
            Offset { .. } | Duplicate { .. } => ErrorKind::Corrupt,
            Features(_) => ErrorKind::Unsupported,
            Option(_) => ErrorKind::InvalidArgument,
            TooShort { .. } | Magic { .. } | Field { .. } => ErrorKind::Invalid,
        }
    }
}

crate::impl_from_format_error!(QedError);
