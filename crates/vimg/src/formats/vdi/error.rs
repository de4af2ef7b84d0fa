//! Everything that can be wrong with a VDI, each variant carrying the offending value and
//! where it was found.

use crate::error::{ErrorKind, FormatError};

/// A VDI-specific error.
#[derive(Debug, thiserror::Error)]
pub enum VdiError {
    /// The file is shorter than the 512-byte header.
    #[error("file is {len} bytes, too short for a VDI header (512 bytes)")]
    TooShort {
        /// File length.
        len: u64,
    },
    /// The signature at 0x40 is not 0xbeda107f.
    #[error("VDI signature at 0x40 is {found:#010x}, expected 0xbeda107f")]
    Signature {
        /// The signature found.
        found: u32,
    },
    /// A header version other than 1.1.
    #[error("VDI header version at 0x44 is {major}.{minor} ({version:#010x}); only version 1.1 is supported")]
    Version {
        /// The version field.
        version: u32,
        /// Its major part.
        major: u32,
        /// Its minor part.
        minor: u32,
    },
    /// A header size that does not hold the version 1.1 fields.
    #[error("VDI header size at 0x48 is {value:#x}; a version 1.1 header is 0x180 to 0x1b8 bytes")]
    HeaderSize {
        /// The header size field.
        value: u32,
    },
    /// An image type this reader does not know.
    #[error("VDI image type at 0x4c is {value} (expected 1 normal/dynamic or 2 fixed/static)")]
    ImageType {
        /// The image type field.
        value: u32,
    },
    /// A differencing or undo image, or one that names a parent.
    #[error("unsupported VDI image: {0} (differencing VDIs are not supported)")]
    Differencing(String),
    /// A field whose value vimg does not support.
    #[error("unsupported VDI image: {field} at {at:#x} is {value:#x}, {expected}")]
    Unsupported {
        /// The field.
        field: &'static str,
        /// Its offset in the header.
        at: u64,
        /// Its value.
        value: u64,
        /// What is supported.
        expected: String,
    },
    /// A header value qemu-img refuses, in qemu-img's words, then where vimg found it (the
    /// CLI's qemu-img compatibility mode prints qemu-img's words alone).
    #[error("{words} ({detail})")]
    Qemu {
        /// qemu-img's message.
        words: String,
        /// Where vimg found the value.
        detail: String,
        /// Unsupported (a value vimg does not read) or invalid (fields that contradict
        /// each other).
        kind: ErrorKind,
    },
    /// The block map cannot cover the disk.
    #[error("VDI disk size {disk_size:#x} needs {needed} blocks of {block_size:#x} bytes, but the header has {blocks} (blocks in image at 0x180)")]
    BlockCount {
        /// Disk size.
        disk_size: u64,
        /// Block size.
        block_size: u64,
        /// Blocks needed.
        needed: u64,
        /// Blocks in the image.
        blocks: u32,
    },
    /// Header, block map and data overlap.
    #[error("VDI {0}")]
    Layout(String),
    /// The block map does not fit in the file.
    #[error("VDI block map at {offset:#x} ({bytes:#x} bytes) lies past the end of the file ({len:#x} bytes)")]
    MapPastEof {
        /// Block map offset.
        offset: u64,
        /// Its size in bytes.
        bytes: u64,
        /// File length.
        len: u64,
    },
    /// A block map entry beyond the image's block count.
    #[error(
        "VDI block map entry {index} is {value:#x}, out of range (the image has {blocks} blocks)"
    )]
    EntryOutOfRange {
        /// Block map index.
        index: u32,
        /// Entry value.
        value: u32,
        /// Blocks in the image.
        blocks: u32,
    },
    /// A block map entry whose block lies past the end of the file.
    #[error("VDI block map entry {index} is {value:#x} (data at {start:#x}..{end:#x}), past the end of the file ({len:#x} bytes)")]
    EntryPastEof {
        /// Block map index.
        index: u32,
        /// Entry value.
        value: u32,
        /// Block start.
        start: u64,
        /// Block end.
        end: u64,
        /// File length.
        len: u64,
    },
    /// Two block map entries naming one block.
    #[error("VDI block map entries {other} and {index} both point at block {value:#x}")]
    EntryDuplicate {
        /// The later index.
        index: u32,
        /// The earlier index.
        other: u32,
        /// The shared value.
        value: u32,
    },
    /// A creation option with a bad value.
    #[error("{0}")]
    Option(String),
}

impl FormatError for VdiError {
    fn kind(&self) -> ErrorKind {
        use VdiError::*;
        match self {
            MapPastEof { .. }
            | EntryOutOfRange { .. }
            | EntryPastEof { .. }
            | EntryDuplicate { .. } => ErrorKind::Corrupt,
            Qemu { kind, .. } => *kind,
            Version { .. } | Differencing(_) | Unsupported { .. } => ErrorKind::Unsupported,
            Option(_) => ErrorKind::InvalidArgument,
            // A file too short for the header is not a VDI at all, as in every format; a
            // complete header whose tables run past the end is corrupt.
            TooShort { .. }
            | Signature { .. }
            | HeaderSize { .. }
            | ImageType { .. }
            | BlockCount { .. }
            | Layout(_) => ErrorKind::Invalid,
        }
    }
}

crate::impl_from_format_error!(VdiError);
