//! The QED header, as QEMU's docs/interop/qed_spec.txt defines it ("Header"), all
//! little-endian. Tables (L1 and L2, `table_size` clusters each) are arrays of u64 file
//! offsets: 0 for a cluster not allocated here (the backing file shows through),
//! [`ZERO_CLUSTER`] for a cluster that reads as zeros ("Zero clusters").

use byteorder::{ByteOrder, LittleEndian as LE};

use super::error::QedError;

/// Size of the fixed header fields.
pub const HEADER_SIZE: usize = 64;
/// "QED\0", little-endian.
pub const MAGIC: u32 = 0x0044_4551;
/// Feature: the image has a backing file.
pub const F_BACKING_FILE: u64 = 0x01;
/// Feature: the image was not closed cleanly and needs a consistency check.
pub const F_NEED_CHECK: u64 = 0x02;
/// Feature: the backing file is raw, not to be probed.
pub const F_BACKING_FORMAT_NO_PROBE: u64 = 0x04;
/// Every feature bit QEMU knows.
pub const F_MASK: u64 = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE;
/// L2 entry of a cluster that reads as zeros.
pub const ZERO_CLUSTER: u64 = 1;
/// Smallest and largest cluster sizes.
pub const MIN_CLUSTER_SIZE: u32 = 4096;
/// Largest cluster size (64 MiB).
pub const MAX_CLUSTER_SIZE: u32 = 64 << 20;
/// Largest table size in clusters.
pub const MAX_TABLE_SIZE: u32 = 16;
/// qemu-img's default cluster size.
pub const DEFAULT_CLUSTER_SIZE: u32 = 64 << 10;
/// qemu-img's default table size.
pub const DEFAULT_TABLE_SIZE: u32 = 4;

/// The QED header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 0x00 [`MAGIC`].
    pub magic: u32,
    /// 0x04 cluster size in bytes.
    pub cluster_size: u32,
    /// 0x08 L1 and L2 table size, in clusters.
    pub table_size: u32,
    /// 0x0c header size, in clusters.
    pub header_size: u32,
    /// 0x10 feature bits ([`F_MASK`]).
    pub features: u64,
    /// 0x18 compatible feature bits.
    pub compat_features: u64,
    /// 0x20 self-resetting feature bits.
    pub autoclear_features: u64,
    /// 0x28 L1 table offset in bytes.
    pub l1_table_offset: u64,
    /// 0x30 virtual disk size in bytes.
    pub image_size: u64,
    /// 0x38 backing file name offset, from the start of the header.
    pub backing_filename_offset: u32,
    /// 0x3c backing file name size.
    pub backing_filename_size: u32,
}

impl Header {
    /// Parses the first [`HEADER_SIZE`] bytes of `b`.
    pub fn parse(b: &[u8]) -> Result<Header, QedError> {
        if b.len() < HEADER_SIZE {
            return Err(QedError::TooShort {
                len: b.len() as u64,
            });
        }
        Ok(Header {
            magic: LE::read_u32(&b[0..]),
            cluster_size: LE::read_u32(&b[4..]),
            table_size: LE::read_u32(&b[8..]),
            header_size: LE::read_u32(&b[12..]),
            features: LE::read_u64(&b[0x10..]),
            compat_features: LE::read_u64(&b[0x18..]),
            autoclear_features: LE::read_u64(&b[0x20..]),
            l1_table_offset: LE::read_u64(&b[0x28..]),
            image_size: LE::read_u64(&b[0x30..]),
            backing_filename_offset: LE::read_u32(&b[0x38..]),
            backing_filename_size: LE::read_u32(&b[0x3c..]),
        })
    }

    /// Writes the header into the first [`HEADER_SIZE`] bytes of `b`.
    pub fn write_to(&self, b: &mut [u8]) {
        b[0..4].copy_from_slice(&self.magic.to_le_bytes());
        b[4..8].copy_from_slice(&self.cluster_size.to_le_bytes());
        b[8..12].copy_from_slice(&self.table_size.to_le_bytes());
        b[12..16].copy_from_slice(&self.header_size.to_le_bytes());
        b[0x10..0x18].copy_from_slice(&self.features.to_le_bytes());
        b[0x18..0x20].copy_from_slice(&self.compat_features.to_le_bytes());
        b[0x20..0x28].copy_from_slice(&self.autoclear_features.to_le_bytes());
        b[0x28..0x30].copy_from_slice(&self.l1_table_offset.to_le_bytes());
        b[0x30..0x38].copy_from_slice(&self.image_size.to_le_bytes());
        b[0x38..0x3c].copy_from_slice(&self.backing_filename_offset.to_le_bytes());
        b[0x3c..0x40].copy_from_slice(&self.backing_filename_size.to_le_bytes());
    }

    /// Entries per table.
    pub fn table_entries(&self) -> u64 {
        u64::from(self.table_size) * u64::from(self.cluster_size) / 8
    }
}

/// Parses a table of u64 entries.
pub fn parse_table(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8).map(|c| LE::read_u64(&c[0..])).collect()
}

/// Writes `t` into `b`.
pub fn write_table(t: &[u64], b: &mut [u8]) {
    for (c, v) in b.chunks_exact_mut(8).zip(t) {
        c.copy_from_slice(&v.to_le_bytes());
    }
}
