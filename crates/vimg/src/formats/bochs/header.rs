//! The Bochs "growing" (redolog) image header, as bximage writes it and QEMU's
//! block/bochs.c reads it, all little-endian, in one 512-byte block:
//!
//! | offset | field |
//! |---|---|
//! | 0x00 | magic, C string in 32 bytes: "Bochs Virtual HD Image" |
//! | 0x20 | type, C string in 16 bytes: "Redolog" |
//! | 0x30 | subtype, C string in 16 bytes: "Growing" |
//! | 0x40 | version: 0x00020000 (or 0x00010000, the older layout) |
//! | 0x44 | header size in bytes: where the catalog starts |
//! | 0x48 | catalog entries (extents) |
//! | 0x4c | bitmap size in bytes (per extent) |
//! | 0x50 | extent size in bytes |
//! | 0x54 | v2: timestamp (u32), then 0x58 disk size (u64); v1: 0x54 disk size (u64) |
//!
//! The catalog follows: one u32 per extent, the extent's index in the data area, or
//! [`UNALLOCATED`]. Each allocated extent is a bitmap (one bit per sector, rounded up to
//! 512-byte blocks) followed by the extent's sectors.

use byteorder::{ByteOrder, LittleEndian as LE};

use super::error::BochsError;

/// Size of the header block.
pub const HEADER_SIZE: usize = 512;
/// Version 2.0 of the header.
pub const VERSION_2: u32 = 0x0002_0000;
/// Version 1.0: no timestamp, the disk size at 0x54.
pub const VERSION_1: u32 = 0x0001_0000;
/// Catalog entry of an extent never written.
pub const UNALLOCATED: u32 = 0xffff_ffff;
/// Sector size.
pub const SECTOR: u64 = 512;

/// The header block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 0x00 magic field.
    pub magic: [u8; 32],
    /// 0x20 type field.
    pub kind: [u8; 16],
    /// 0x30 subtype field.
    pub subtype: [u8; 16],
    /// 0x40 version ([`VERSION_2`] or [`VERSION_1`]).
    pub version: u32,
    /// 0x44 header size (catalog offset).
    pub header_size: u32,
    /// 0x48 catalog entries.
    pub catalog: u32,
    /// 0x4c bitmap bytes per extent.
    pub bitmap: u32,
    /// 0x50 extent bytes.
    pub extent: u32,
    /// 0x54 timestamp (version 2 only; 0 for version 1).
    pub timestamp: u32,
    /// Disk size in bytes (0x58 in version 2, 0x54 in version 1).
    pub disk: u64,
    /// The rest of the block, kept for the round trip.
    pub tail: Vec<u8>,
}

impl Header {
    /// Parses the first [`HEADER_SIZE`] bytes of `b`.
    pub fn parse(b: &[u8]) -> Result<Header, BochsError> {
        if b.len() < HEADER_SIZE {
            return Err(BochsError::TooShort {
                len: b.len() as u64,
            });
        }
        let mut magic = [0u8; 32];
        magic.copy_from_slice(&b[..32]);
        let mut kind = [0u8; 16];
        kind.copy_from_slice(&b[32..48]);
        let mut subtype = [0u8; 16];
        subtype.copy_from_slice(&b[48..64]);
        let version = LE::read_u32(&b[0x40..]);
        let v1 = version == VERSION_1;
        let (timestamp, disk, tail_at) = if v1 {
            (0, LE::read_u64(&b[0x54..]), 0x5c)
        } else {
            (LE::read_u32(&b[0x54..]), LE::read_u64(&b[0x58..]), 0x60)
        };
        Ok(Header {
            magic,
            kind,
            subtype,
            version,
            header_size: LE::read_u32(&b[0x44..]),
            catalog: LE::read_u32(&b[0x48..]),
            bitmap: LE::read_u32(&b[0x4c..]),
            extent: LE::read_u32(&b[0x50..]),
            timestamp,
            disk,
            tail: b[tail_at..HEADER_SIZE].to_vec(),
        })
    }

    /// Writes the header block into the first [`HEADER_SIZE`] bytes of `b`.
    pub fn write_to(&self, b: &mut [u8]) {
        b[..32].copy_from_slice(&self.magic);
        b[32..48].copy_from_slice(&self.kind);
        b[48..64].copy_from_slice(&self.subtype);
        b[0x40..0x44].copy_from_slice(&self.version.to_le_bytes());
        b[0x44..0x48].copy_from_slice(&self.header_size.to_le_bytes());
        b[0x48..0x4c].copy_from_slice(&self.catalog.to_le_bytes());
        b[0x4c..0x50].copy_from_slice(&self.bitmap.to_le_bytes());
        b[0x50..0x54].copy_from_slice(&self.extent.to_le_bytes());
        let tail_at = if self.version == VERSION_1 {
            b[0x54..0x5c].copy_from_slice(&self.disk.to_le_bytes());
            0x5c
        } else {
            b[0x54..0x58].copy_from_slice(&self.timestamp.to_le_bytes());
            b[0x58..0x60].copy_from_slice(&self.disk.to_le_bytes());
            0x60
        };
        let n = self.tail.len().min(HEADER_SIZE - tail_at);
        b[tail_at..tail_at + n].copy_from_slice(&self.tail[..n]);
    }
}

/// Parses `n` catalog entries from `b`.
pub fn parse_catalog(b: &[u8], n: usize) -> Vec<u32> {
    b.chunks_exact(4)
        .take(n)
        .map(|c| LE::read_u32(&c[0..]))
        .collect()
}
