//! The qcow (version 1) header, as QEMU's block/qcow.c reads and writes it, all
//! big-endian. The L1 table (u64 per `2^(cluster_bits + l2_bits)` guest bytes) points at L2
//! tables (`2^l2_bits` u64 entries), whose entries are a data cluster's file offset, 0 for a
//! cluster not allocated here, or, with [`COMPRESSED`] set, a raw-deflate compressed cluster:
//! its length in the bits above `63 - cluster_bits`, its offset below.

use byteorder::{BigEndian as BE, ByteOrder};

use super::error::QcowError;

/// Size of the header.
pub const HEADER_SIZE: usize = 48;
/// "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
/// The version this module reads.
pub const VERSION: u32 = 1;
/// No encryption.
pub const CRYPT_NONE: u32 = 0;
/// AES-CBC encryption (refused).
pub const CRYPT_AES: u32 = 1;
/// L2 entry flag: a compressed cluster.
pub const COMPRESSED: u64 = 1 << 63;

/// The qcow v1 header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 0x00 [`MAGIC`].
    pub magic: u32,
    /// 0x04 [`VERSION`].
    pub version: u32,
    /// 0x08 backing file name offset (0: none).
    pub backing_file_offset: u64,
    /// 0x10 backing file name length.
    pub backing_file_size: u32,
    /// 0x14 modification time.
    pub mtime: u32,
    /// 0x18 virtual size in bytes.
    pub size: u64,
    /// 0x20 log2 of the cluster size (9..=16).
    pub cluster_bits: u8,
    /// 0x21 log2 of L2 entries per table (6..=13).
    pub l2_bits: u8,
    /// 0x22 padding.
    pub padding: u16,
    /// 0x24 [`CRYPT_NONE`] or [`CRYPT_AES`].
    pub crypt_method: u32,
    /// 0x28 L1 table offset.
    pub l1_table_offset: u64,
}

impl Header {
    /// Parses the first [`HEADER_SIZE`] bytes of `b`.
    pub fn parse(b: &[u8]) -> Result<Header, QcowError> {
        if b.len() < HEADER_SIZE {
            return Err(QcowError::TooShort {
                len: b.len() as u64,
            });
        }
        Ok(Header {
            magic: BE::read_u32(&b[0..]),
            version: BE::read_u32(&b[4..]),
            backing_file_offset: BE::read_u64(&b[8..]),
            backing_file_size: BE::read_u32(&b[0x10..]),
            mtime: BE::read_u32(&b[0x14..]),
            size: BE::read_u64(&b[0x18..]),
            cluster_bits: b[0x20],
            l2_bits: b[0x21],
            padding: u16::from_be_bytes([b[0x22], b[0x23]]),
            crypt_method: BE::read_u32(&b[0x24..]),
            l1_table_offset: BE::read_u64(&b[0x28..]),
        })
    }

    /// Writes the header into the first [`HEADER_SIZE`] bytes of `b`.
    pub fn write_to(&self, b: &mut [u8]) {
        b[0..4].copy_from_slice(&self.magic.to_be_bytes());
        b[4..8].copy_from_slice(&self.version.to_be_bytes());
        b[8..0x10].copy_from_slice(&self.backing_file_offset.to_be_bytes());
        b[0x10..0x14].copy_from_slice(&self.backing_file_size.to_be_bytes());
        b[0x14..0x18].copy_from_slice(&self.mtime.to_be_bytes());
        b[0x18..0x20].copy_from_slice(&self.size.to_be_bytes());
        b[0x20] = self.cluster_bits;
        b[0x21] = self.l2_bits;
        b[0x22..0x24].copy_from_slice(&self.padding.to_be_bytes());
        b[0x24..0x28].copy_from_slice(&self.crypt_method.to_be_bytes());
        b[0x28..0x30].copy_from_slice(&self.l1_table_offset.to_be_bytes());
    }
}

/// Parses a table of big-endian u64 entries.
pub fn parse_table(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8).map(|c| BE::read_u64(&c[0..])).collect()
}
