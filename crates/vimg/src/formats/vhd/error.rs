//! Everything that can be wrong with a VHD, each variant carrying the offending value (in hex
//! where it is an offset or a raw field) and where it was found.

use crate::error::{ErrorKind, FormatError};

/// A VHD-specific error.
#[derive(Debug, thiserror::Error)]
pub enum VhdError {
    /// The file is too short to hold even a footer.
    #[error("file is {len} bytes, too short for a VHD footer (512 bytes)")]
    TooShort {
        /// File length.
        len: u64,
    },
    /// Neither the first nor the last 512 bytes hold a footer.
    #[error(
        "no VHD footer: neither the first nor the last 512 bytes start with the 'conectix' cookie"
    )]
    NoFooter,
    /// A structure does not start with its cookie.
    #[error("{structure} at {offset:#x} has cookie {found:?}, expected {expected:?}")]
    BadCookie {
        /// Which structure.
        structure: &'static str,
        /// Where it was read.
        offset: u64,
        /// The bytes found.
        found: String,
        /// The cookie expected.
        expected: &'static str,
    },
    /// A checksum does not match the structure's bytes.
    #[error("{structure} at {offset:#x} has checksum {stored:#010x}, but its bytes give {computed:#010x}: the {structure} is corrupt")]
    Checksum {
        /// Which structure.
        structure: &'static str,
        /// Where it was read.
        offset: u64,
        /// The checksum stored in the structure.
        stored: u32,
        /// The checksum computed over its bytes.
        computed: u32,
    },
    /// A format version this reader does not know.
    #[error(
        "{structure} at {offset:#x} has version {version:#010x}; only major version 1 is supported"
    )]
    Version {
        /// Which structure.
        structure: &'static str,
        /// Where it was read.
        offset: u64,
        /// The version field.
        version: u32,
    },
    /// A disk type other than fixed (2), dynamic (3) or differencing (4).
    #[error("VHD footer at {offset:#x} has disk type {disk_type} (expected 2 fixed, 3 dynamic or 4 differencing)")]
    DiskType {
        /// Where the footer was read.
        offset: u64,
        /// The disk type field.
        disk_type: u32,
    },
    /// The footer found where the image's type says it cannot be.
    #[error("{0}")]
    Layout(String),
    /// The virtual size exceeds what VHD allows.
    #[error("virtual size {size} bytes ({size:#x}) is larger than the VHD maximum of 2040 GiB")]
    TooLarge {
        /// The size.
        size: u64,
    },
    /// A fixed disk's data area is shorter than its virtual size.
    #[error("fixed VHD is truncated: the virtual size is {size:#x} bytes but the file holds only {data:#x} bytes of data before its footer")]
    FixedTruncated {
        /// Virtual size.
        size: u64,
        /// Bytes before the footer.
        data: u64,
    },
    /// The dynamic header offset points outside the file or into the footer copy.
    #[error("dynamic disk header offset {offset:#x} (footer data offset) is outside the file ({len:#x} bytes) or overlaps the footer copy")]
    HeaderOffset {
        /// The offset.
        offset: u64,
        /// File length.
        len: u64,
    },
    /// A block size that is not a power of two of at least 512 bytes.
    #[error("dynamic disk header at {offset:#x} has block size {block_size:#x}; it must be a power of two of at least 512 bytes")]
    BlockSize {
        /// Where the header was read.
        offset: u64,
        /// The block size field.
        block_size: u32,
    },
    /// Max table entries cannot cover the virtual size.
    #[error("dynamic disk header at {offset:#x} has max table entries {entries} ({entries:#x}): with {block_size:#x}-byte blocks that covers {covers:#x} bytes, less than the virtual size {size:#x}")]
    TableTooSmall {
        /// Where the header was read.
        offset: u64,
        /// Max table entries.
        entries: u32,
        /// Block size.
        block_size: u64,
        /// Bytes the table covers.
        covers: u64,
        /// Virtual size.
        size: u64,
    },
    /// Max table entries past qemu's limit (a BAT of 2 GiB), in qemu-img's words.
    #[error("Max Table Entries too large ({entries}) (dynamic disk header at {offset:#x}; at most 536870911 are supported)")]
    TableTooLarge {
        /// Where the header was read.
        offset: u64,
        /// Max table entries.
        entries: u32,
    },
    /// The BAT does not fit in the file.
    #[error("BAT at {offset:#x} with {entries} ({entries:#x}) max table entries needs {bytes:#x} bytes, past the end of the file ({len:#x} bytes)")]
    TablePastEof {
        /// Table offset.
        offset: u64,
        /// Max table entries.
        entries: u32,
        /// Table size in bytes.
        bytes: u64,
        /// File length.
        len: u64,
    },
    /// The BAT overlaps other metadata.
    #[error("BAT at {offset:#x} ({bytes:#x} bytes) overlaps the {what}")]
    TableOverlap {
        /// Table offset.
        offset: u64,
        /// Table size in bytes (rounded to sectors).
        bytes: u64,
        /// The structure it overlaps.
        what: String,
    },
    /// A BAT entry whose block lies past the end of the file.
    #[error("BAT entry {index} is {value:#x} (block at {start:#x}..{end:#x}), past the end of the file ({len:#x} bytes)")]
    EntryPastEof {
        /// Table index.
        index: u32,
        /// Entry value (sector number).
        value: u32,
        /// Block start (bitmap) in bytes.
        start: u64,
        /// Block end in bytes.
        end: u64,
        /// File length.
        len: u64,
    },
    /// A BAT entry whose block overlaps metadata.
    #[error("BAT entry {index} is {value:#x} (block at {start:#x}..{end:#x}), which overlaps the {what}")]
    EntryOverlapsMetadata {
        /// Table index.
        index: u32,
        /// Entry value (sector number).
        value: u32,
        /// Block start in bytes.
        start: u64,
        /// Block end in bytes.
        end: u64,
        /// The structure it overlaps.
        what: String,
    },
    /// Two BAT entries whose blocks overlap.
    #[error("BAT entries {index} ({value:#x}) and {other} ({other_value:#x}) point at overlapping blocks")]
    EntriesOverlap {
        /// One table index.
        index: u32,
        /// Its value.
        value: u32,
        /// The other table index.
        other: u32,
        /// Its value.
        other_value: u32,
    },
    /// A parent locator that is malformed.
    #[error("parent locator {index} ({code}) {reason}")]
    Locator {
        /// Index of the locator entry (0..8).
        index: usize,
        /// Its platform code.
        code: String,
        /// What is wrong.
        reason: String,
    },
    /// A differencing disk with no usable parent name.
    #[error("differencing VHD names no usable parent (no W2ru, W2ku or MacX parent locator and no parent name)")]
    NoParent,
    /// A creation option with a bad value.
    #[error("{0}")]
    Option(String),
}

impl FormatError for VhdError {
    fn kind(&self) -> ErrorKind {
        use VhdError::*;
        match self {
            FixedTruncated { .. }
            | TablePastEof { .. }
            // qemu's limit: a BAT of 2 GiB, which a file of that image would also hold.
            | TableTooLarge { .. }
            | EntryPastEof { .. }
            | EntryOverlapsMetadata { .. }
            | EntriesOverlap { .. }
            | TableOverlap { .. }
            | HeaderOffset { .. } => ErrorKind::Corrupt,
            Version { .. } | TooLarge { .. } => ErrorKind::Unsupported,
            Option(_) => ErrorKind::InvalidArgument,
            // A file too short for the fixed structure is not a VHD at all, as in every
            // format; a complete structure whose tables run past the end is corrupt.
            TooShort { .. }
            | NoFooter
            | BadCookie { .. }
            | Checksum { .. }
            | DiskType { .. }
            | Layout(_)
            | BlockSize { .. }
            | TableTooSmall { .. }
            | Locator { .. }
            | NoParent => ErrorKind::Invalid,
        }
    }
}

crate::impl_from_format_error!(VhdError);
