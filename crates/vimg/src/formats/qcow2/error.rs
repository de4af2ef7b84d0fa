//! Errors of the qcow2 driver. Each variant names the structure, where it was found and the
//! offending value, and maps to a crate-level [`ErrorKind`].

use crate::error::{ErrorKind, FormatError};

/// Something wrong with a qcow2 image (or a request to create one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Qcow2Error {
    /// The file does not start with `QFI\xfb`.
    #[error("Image is not in qcow2 format (magic {0:#010x})")]
    BadMagic(u32),
    /// The file is shorter than the fixed header.
    #[error("qcow2 header is truncated: the file has {0} bytes")]
    Truncated(u64),
    /// Only versions 2 and 3 exist.
    #[error("Unsupported qcow2 version {0}")]
    Version(u32),
    /// cluster_bits outside 9..=21.
    #[error("Unsupported cluster size: 2^{0} (header field cluster_bits at 0x14)")]
    ClusterBits(u32),
    /// A header field outside its allowed range.
    #[error("qcow2 header field {field} has an invalid value {value:#x}: {why}")]
    HeaderField {
        /// The field name, as the spec names it.
        field: &'static str,
        /// The value found.
        value: u64,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A valid feature vimg does not implement.
    #[error("{0}")]
    Unsupported(String),
    /// Unknown incompatible feature bits.
    #[error("Unsupported qcow2 feature(s): {0}")]
    UnknownFeatures(String),
    /// A header extension that does not fit or does not parse.
    #[error("qcow2 header extension {magic:#010x} at {offset:#x}: {why}")]
    Extension {
        /// Extension type.
        magic: u32,
        /// Offset of the extension header in the file.
        offset: u64,
        /// What is wrong.
        why: String,
    },
    /// A table (L1, refcount table, snapshot table...) whose size or offset is invalid.
    #[error("{table} at {offset:#x} with {entries} entries: {why}")]
    Table {
        /// Which table.
        table: &'static str,
        /// Its offset in the file.
        offset: u64,
        /// Its entry count (or bytes, where the table is sized in bytes).
        entries: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// The active L1 table has fewer entries than the virtual size needs (QEMU's words:
    /// iotest 080 expects them alone on the line).
    #[error("L1 table is too small")]
    L1TooSmall {
        /// Entries it has.
        entries: u64,
        /// Entries the virtual size needs.
        needed: u64,
    },
    /// A table that ends past the end of the file.
    #[error(
        "{table} at {offset:#x} ({len} bytes) extends past the end of the file ({file_len} bytes)"
    )]
    TablePastEof {
        /// Which table.
        table: &'static str,
        /// Its offset.
        offset: u64,
        /// Its length in bytes.
        len: u64,
        /// The file length.
        file_len: u64,
    },
    /// An L1 table entry that cannot be used.
    #[error("L1 table entry {index} ({value:#018x}): {why}")]
    L1Entry {
        /// Index in the active L1 table.
        index: u64,
        /// The raw entry.
        value: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// An L2 table entry that cannot be used.
    #[error("L2 table at {table:#x}, entry {index} ({value:#018x}): {why}")]
    L2Entry {
        /// Offset of the L2 table.
        table: u64,
        /// Index in that table.
        index: u64,
        /// The raw entry (first 64 bits for extended entries).
        value: u64,
        /// What is wrong.
        why: String,
    },
    /// A snapshot table entry that cannot be used.
    #[error("snapshot table entry {index} at {offset:#x}: {why}")]
    Snapshot {
        /// Index in the snapshot table.
        index: u64,
        /// Offset of the entry.
        offset: u64,
        /// What is wrong.
        why: String,
    },
    /// A snapshot table QEMU refuses at open, in QEMU's words (iotest 261): too many
    /// entries, more than 64 MiB, an entry with more than 1024 bytes of extra data.
    #[error("{0}")]
    SnapshotTable(String),
    /// A bitmap directory entry that cannot be used.
    #[error("bitmap directory entry {index} at {offset:#x}: {why}")]
    Bitmap {
        /// Index in the bitmap directory.
        index: u64,
        /// Offset of the entry.
        offset: u64,
        /// What is wrong.
        why: String,
    },
    /// A creation option that qcow2 does not accept.
    #[error("{0}")]
    BadOption(String),
}

impl FormatError for Qcow2Error {
    fn kind(&self) -> ErrorKind {
        match self {
            Qcow2Error::BadMagic(_)
            | Qcow2Error::Version(_)
            | Qcow2Error::ClusterBits(_)
            | Qcow2Error::HeaderField { .. }
            | Qcow2Error::Extension { .. }
            | Qcow2Error::Table { .. }
            | Qcow2Error::L1TooSmall { .. }
            | Qcow2Error::Snapshot { .. }
            | Qcow2Error::SnapshotTable(_)
            | Qcow2Error::Bitmap { .. }
            // A file too short for the fixed header is not a qcow2 image, as in every
            // format; tables past the end of a complete header are corrupt.
            | Qcow2Error::Truncated(_) => ErrorKind::Invalid,
            Qcow2Error::TablePastEof { .. }
            | Qcow2Error::L1Entry { .. }
            | Qcow2Error::L2Entry { .. } => ErrorKind::Corrupt,
            Qcow2Error::Unsupported(_) | Qcow2Error::UnknownFeatures(_) => ErrorKind::Unsupported,
            Qcow2Error::BadOption(_) => ErrorKind::InvalidArgument,
        }
    }
}

crate::impl_from_format_error!(Qcow2Error);

/// Shorthand for `Err(Qcow2Error::HeaderField { .. }.into())`.
pub(crate) fn field_err<T>(field: &'static str, value: u64, why: &'static str) -> crate::Result<T> {
    Err(Qcow2Error::HeaderField { field, value, why }.into())
}
