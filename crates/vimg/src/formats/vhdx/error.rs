//! The VHDX error type: every variant names the structure, where it was found and the
//! offending value, and maps to a coarse [`ErrorKind`].

use crate::error::{ErrorKind, FormatError};

/// What went wrong while reading or writing a VHDX image.
#[derive(Debug, thiserror::Error)]
pub enum VhdxError {
    /// The file does not start with the `vhdxfile` identifier.
    #[error("VHDX file identifier at 0x0 is {found:?}, not \"vhdxfile\"")]
    NotVhdx {
        /// The first eight bytes.
        found: String,
    },

    /// Neither header is valid (bad signature, checksum or version).
    #[error("No valid VHDX header found: header 1 at 0x10000: {header1}; header 2 at 0x20000: {header2}")]
    NoValidHeader {
        /// Why header 1 is invalid.
        header1: String,
        /// Why header 2 is invalid.
        header2: String,
    },

    /// Both headers are valid, carry the same sequence number, and differ.
    #[error("VHDX headers 1 and 2 both have sequence number {sequence:#x} but differ; cannot tell which is current")]
    HeadersDisagree {
        /// The shared sequence number.
        sequence: u64,
    },

    /// A field of the current header is out of range.
    #[error("VHDX header {index} at {offset:#x}: {field} = {value:#x}: {reason}")]
    HeaderField {
        /// 1 or 2.
        index: u8,
        /// File offset of the header.
        offset: u64,
        /// Field name.
        field: &'static str,
        /// The value found.
        value: u64,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// Neither region table is valid.
    #[error(
        "No valid VHDX region table: table 1 at 0x30000: {table1}; table 2 at 0x40000: {table2}"
    )]
    NoValidRegionTable {
        /// Why table 1 is invalid.
        table1: String,
        /// Why table 2 is invalid.
        table2: String,
    },

    /// A region table entry is out of range.
    #[error(
        "VHDX region table entry {index} ({guid}) at {offset:#x}: {field} = {value:#x}: {reason}"
    )]
    RegionEntry {
        /// Entry index.
        index: usize,
        /// The region's GUID.
        guid: String,
        /// File offset of the entry.
        offset: u64,
        /// Field name.
        field: &'static str,
        /// The value found.
        value: u64,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// The region table lacks the BAT or metadata region, or has it twice.
    #[error("VHDX region table: {what}")]
    RegionSet {
        /// What is missing or duplicated.
        what: String,
    },

    /// A region this implementation does not know is marked required.
    #[error("VHDX region table entry {index} names an unknown region {guid} marked required")]
    UnknownRequiredRegion {
        /// Entry index.
        index: usize,
        /// The region's GUID.
        guid: String,
    },

    /// Two file areas (header section, log, regions, blocks) overlap.
    #[error("VHDX {first} [{first_start:#x}, {first_end:#x}) overlaps {second} [{second_start:#x}, {second_end:#x})")]
    Overlap {
        /// The first area.
        first: String,
        /// Its start.
        first_start: u64,
        /// Its end.
        first_end: u64,
        /// The second area.
        second: String,
        /// Its start.
        second_start: u64,
        /// Its end.
        second_end: u64,
    },

    /// The metadata table (or an item's structure) is invalid.
    #[error("VHDX {what} at {offset:#x}: {reason}")]
    MetadataTable {
        /// The structure.
        what: &'static str,
        /// Its file offset.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },

    /// A metadata table entry is out of range.
    #[error("VHDX metadata entry {index} ({guid}) at {offset:#x}: {field} = {value:#x}: {reason}")]
    MetadataEntry {
        /// Entry index.
        index: usize,
        /// The item's GUID.
        guid: String,
        /// File offset of the entry.
        offset: u64,
        /// Field name.
        field: &'static str,
        /// The value found.
        value: u64,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// A metadata item this implementation does not know is marked required.
    #[error("VHDX metadata entry {index} names an unknown item {guid} marked required")]
    UnknownRequiredMetadata {
        /// Entry index.
        index: usize,
        /// The item's GUID.
        guid: String,
    },

    /// A required metadata item is missing or appears twice.
    #[error("VHDX metadata table: {what}")]
    MetadataSet {
        /// What is missing or duplicated.
        what: String,
    },

    /// A metadata item's value is out of range.
    #[error("VHDX metadata item {item} at {offset:#x}: value {value:#x}: {reason}")]
    MetadataValue {
        /// The item.
        item: &'static str,
        /// File offset of the item.
        offset: u64,
        /// The value found.
        value: u64,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// The parent locator is malformed.
    #[error("VHDX parent locator at {offset:#x}: {reason}")]
    ParentLocator {
        /// File offset of the locator (or of the bad entry).
        offset: u64,
        /// What is wrong.
        reason: String,
    },

    /// The BAT region is too small for the virtual size.
    #[error("VHDX BAT region at {offset:#x} holds {length:#x} bytes, but a virtual size of {virtual_size:#x} bytes needs {entries} entries ({needed:#x} bytes)")]
    BatTooSmall {
        /// File offset of the BAT.
        offset: u64,
        /// Region length.
        length: u64,
        /// The virtual size.
        virtual_size: u64,
        /// Entries needed.
        entries: u64,
        /// Bytes needed.
        needed: u64,
    },

    /// A BAT entry is invalid.
    #[error("VHDX BAT entry {index} at {offset:#x} = {value:#018x}: {reason}")]
    BatEntry {
        /// Entry index (payload and sector-bitmap entries counted together).
        index: u64,
        /// File offset of the entry.
        offset: u64,
        /// The raw entry.
        value: u64,
        /// What is wrong.
        reason: String,
    },

    /// The log cannot be replayed.
    #[error("VHDX log at {offset:#x}: {reason}")]
    Log {
        /// File offset of the log (or of the bad entry).
        offset: u64,
        /// What is wrong.
        reason: String,
    },

    /// A valid image that exceeds what vimg handles.
    #[error("VHDX: {what}")]
    Limit {
        /// What exceeds which limit.
        what: String,
    },
}

impl FormatError for VhdxError {
    fn kind(&self) -> ErrorKind {
        match self {
            VhdxError::NotVhdx { .. }
            | VhdxError::NoValidHeader { .. }
            | VhdxError::HeadersDisagree { .. }
            | VhdxError::HeaderField { .. }
            | VhdxError::NoValidRegionTable { .. }
            | VhdxError::RegionEntry { .. }
            | VhdxError::RegionSet { .. }
            | VhdxError::MetadataTable { .. }
            | VhdxError::MetadataEntry { .. }
            | VhdxError::MetadataSet { .. }
            | VhdxError::MetadataValue { .. }
            | VhdxError::ParentLocator { .. }
            // A virtual size the BAT region cannot describe: a header field out of range,
            // as qcow2's L1 size, VHD's max table entries and VDI's block count are.
            | VhdxError::BatTooSmall { .. } => ErrorKind::Invalid,
            VhdxError::Overlap { .. }
            | VhdxError::BatEntry { .. }
            | VhdxError::Log { .. } => ErrorKind::Corrupt,
            VhdxError::UnknownRequiredRegion { .. }
            | VhdxError::UnknownRequiredMetadata { .. }
            | VhdxError::Limit { .. } => ErrorKind::Unsupported,
        }
    }
}

crate::impl_from_format_error!(VhdxError);
