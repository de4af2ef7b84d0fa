//! Everything that can be wrong with a Parallels image, each variant carrying the offending
//! value and where it was found.

use crate::error::{ErrorKind, FormatError};

/// A Parallels-specific error.
#[derive(Debug, thiserror::Error)]
pub enum ParallelsError {
    /// The file is shorter than the 64-byte header.
    #[error("file is {len} bytes, too short for a Parallels header (64 bytes)")]
    TooShort {
        /// File length.
        len: u64,
    },
    /// Neither signature, or a version other than 2.
    #[error(
        "Image not in Parallels format (signature at 0x0 {magic:?}, version at 0x10 {version})"
    )]
    Signature {
        /// The 16 signature bytes, escaped.
        magic: String,
        /// The version field.
        version: u32,
    },
    /// A header field whose value is impossible.
    #[error("Parallels header: {field} at {at:#x} is {value:#x}: {why}")]
    Field {
        /// The field.
        field: &'static str,
        /// Its offset in the header.
        at: u64,
        /// Its value.
        value: u64,
        /// What is wrong.
        why: String,
    },
    /// A header field whose value vimg (and QEMU) does not support.
    #[error("unsupported Parallels image: {field} at {at:#x} is {value:#x}: {why}")]
    Unsupported {
        /// The field.
        field: &'static str,
        /// Its offset.
        at: u64,
        /// Its value.
        value: u64,
        /// Why.
        why: String,
    },
    /// The BAT does not fit in the file.
    #[error("Parallels BAT at 0x40 ({bytes:#x} bytes, {entries} entries) lies past the end of the file ({len:#x} bytes)")]
    BatPastEof {
        /// BAT bytes.
        bytes: u64,
        /// BAT entries.
        entries: u32,
        /// File length.
        len: u64,
    },
    /// A BAT entry whose cluster lies inside the header, the BAT or past the end of file.
    #[error("Parallels BAT entry {index} (at {at:#x}) is {value:#x}: cluster {start:#x}..{end:#x} {why}")]
    Entry {
        /// BAT index.
        index: u32,
        /// File offset of the entry.
        at: u64,
        /// Entry value.
        value: u32,
        /// Cluster start in the file.
        start: u64,
        /// Cluster end in the file.
        end: u64,
        /// What is wrong.
        why: String,
    },
    /// Two clusters (BAT, extension or bitmap) overlapping in the file.
    #[error("Parallels {first} ({a:#x}..{a_end:#x}) and {second} ({b:#x}..{b_end:#x}) overlap in the file")]
    Overlap {
        /// First user.
        first: String,
        /// Its start.
        a: u64,
        /// Its end.
        a_end: u64,
        /// Second user.
        second: String,
        /// Its start.
        b: u64,
        /// Its end.
        b_end: u64,
    },
    /// A problem in the Format Extension cluster.
    #[error("Parallels Format Extension at {at:#x}: {why}")]
    Extension {
        /// File offset of the problem.
        at: u64,
        /// What is wrong.
        why: String,
    },
    /// An extension feature marked NECESSARY that vimg does not know.
    #[error("unsupported Parallels Format Extension feature {magic:#018x} at {at:#x} (flags {flags:#x}, marked necessary)")]
    NecessaryFeature {
        /// Feature magic.
        magic: u64,
        /// File offset.
        at: u64,
        /// Its flags.
        flags: u64,
    },
    /// A creation option with a bad value.
    #[error("{0}")]
    Option(String),
}

impl FormatError for ParallelsError {
    fn kind(&self) -> ErrorKind {
        use ParallelsError::*;
        match self {
            BatPastEof { .. } | Entry { .. } | Overlap { .. } | Extension { .. } => {
                ErrorKind::Corrupt
            }
            Unsupported { .. } | NecessaryFeature { .. } => ErrorKind::Unsupported,
            Option(_) => ErrorKind::InvalidArgument,
            TooShort { .. } | Signature { .. } | Field { .. } => ErrorKind::Invalid,
        }
    }
}

crate::impl_from_format_error!(ParallelsError);
