//! The UDIF structures of an Apple disk image, as QEMU's block/dmg.c reads them (all
//! big-endian):
//!
//! - [`Koly`]: the 512-byte trailer at the end of the file ("koly"): where the data fork,
//!   the resource fork and the XML property list are, and the disk size in sectors;
//! - the property list: `<data>` elements holding base64 "mish" blocks ([`Mish`]), each a
//!   header followed by 40-byte [`Chunk`] entries mapping a run of sectors to a run of
//!   bytes in the data fork (raw, zero, or compressed).

use byteorder::{BigEndian as BE, ByteOrder};

use super::error::DmgError;

/// Size of the trailer.
pub const KOLY_SIZE: usize = 512;
/// "koly".
pub const KOLY_MAGIC: [u8; 4] = *b"koly";
/// "mish".
pub const MISH_MAGIC: u32 = 0x6d69_7368;
/// Size of the mish header before the chunk entries.
pub const MISH_HEADER_SIZE: usize = 204;
/// Size of one chunk entry.
pub const CHUNK_SIZE: usize = 40;
/// Chunk type: zeros (UDZE).
pub const CHUNK_ZERO: u32 = 0;
/// Chunk type: raw bytes (UDRW).
pub const CHUNK_RAW: u32 = 1;
/// Chunk type: ignored, reads as zeros (UDIG).
pub const CHUNK_IGNORE: u32 = 2;
/// Chunk type: ADC compressed (UDCO).
pub const CHUNK_ADC: u32 = 0x8000_0004;
/// Chunk type: zlib compressed (UDZO).
pub const CHUNK_ZLIB: u32 = 0x8000_0005;
/// Chunk type: bzip2 compressed (UDBZ).
pub const CHUNK_BZIP2: u32 = 0x8000_0006;
/// Chunk type: lzfse compressed (ULFO).
pub const CHUNK_LZFSE: u32 = 0x8000_0007;
/// Chunk type: comment.
pub const CHUNK_COMMENT: u32 = 0x7fff_fffe;
/// Chunk type: end of the list.
pub const CHUNK_END: u32 = 0xffff_ffff;

/// The fields of the trailer vimg uses; the rest is kept for the round trip.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Koly {
    /// 0x000 [`KOLY_MAGIC`].
    pub magic: [u8; 4],
    /// 0x018 data fork offset.
    pub data_fork_offset: u64,
    /// 0x020 data fork length.
    pub data_fork_length: u64,
    /// 0x028 resource fork offset.
    pub rsrc_fork_offset: u64,
    /// 0x030 resource fork length.
    pub rsrc_fork_length: u64,
    /// 0x0d8 XML property list offset.
    pub plist_offset: u64,
    /// 0x0e0 XML property list length.
    pub plist_length: u64,
    /// 0x1ec disk size in sectors.
    pub sector_count: u64,
    /// The whole trailer as read.
    pub raw: Vec<u8>,
}

impl Koly {
    /// Parses the trailer (the first [`KOLY_SIZE`] bytes of `b`).
    pub fn parse(b: &[u8]) -> Result<Koly, DmgError> {
        if b.len() < KOLY_SIZE {
            return Err(DmgError::TooShort {
                len: b.len() as u64,
            });
        }
        let mut magic = [0u8; 4];
        magic.copy_from_slice(&b[..4]);
        Ok(Koly {
            magic,
            data_fork_offset: BE::read_u64(&b[0x18..]),
            data_fork_length: BE::read_u64(&b[0x20..]),
            rsrc_fork_offset: BE::read_u64(&b[0x28..]),
            rsrc_fork_length: BE::read_u64(&b[0x30..]),
            plist_offset: BE::read_u64(&b[0xd8..]),
            plist_length: BE::read_u64(&b[0xe0..]),
            sector_count: BE::read_u64(&b[0x1ec..]),
            raw: b[..KOLY_SIZE].to_vec(),
        })
    }

    /// Writes the trailer into the first [`KOLY_SIZE`] bytes of `b`.
    pub fn write_to(&self, b: &mut [u8]) {
        b[..KOLY_SIZE].copy_from_slice(&self.raw);
        b[..4].copy_from_slice(&self.magic);
        b[0x18..0x20].copy_from_slice(&self.data_fork_offset.to_be_bytes());
        b[0x20..0x28].copy_from_slice(&self.data_fork_length.to_be_bytes());
        b[0x28..0x30].copy_from_slice(&self.rsrc_fork_offset.to_be_bytes());
        b[0x30..0x38].copy_from_slice(&self.rsrc_fork_length.to_be_bytes());
        b[0xd8..0xe0].copy_from_slice(&self.plist_offset.to_be_bytes());
        b[0xe0..0xe8].copy_from_slice(&self.plist_length.to_be_bytes());
        b[0x1ec..0x1f4].copy_from_slice(&self.sector_count.to_be_bytes());
    }
}

/// The fields of a mish block header vimg uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mish {
    /// 0x00 [`MISH_MAGIC`].
    pub magic: u32,
    /// 0x08 first sector: chunk sectors are relative to it.
    pub first_sector: u64,
    /// 0x18 data offset: chunk offsets are relative to the data fork plus this.
    pub data_offset: u64,
}

impl Mish {
    /// Parses a mish header (`b` holds at least [`MISH_HEADER_SIZE`] bytes).
    pub fn parse(b: &[u8]) -> Mish {
        Mish {
            magic: BE::read_u32(&b[0..]),
            first_sector: BE::read_u64(&b[8..]),
            data_offset: BE::read_u64(&b[0x18..]),
        }
    }
}

/// One chunk entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// 0x00 type ([`CHUNK_ZLIB`] ...).
    pub kind: u32,
    /// 0x08 first sector, relative to the mish block's.
    pub sector: u64,
    /// 0x10 sectors.
    pub sector_count: u64,
    /// 0x18 offset, relative to the data fork plus the mish block's data offset.
    pub offset: u64,
    /// 0x20 bytes in the file.
    pub length: u64,
}

impl Chunk {
    /// Parses a chunk entry (`b` holds at least [`CHUNK_SIZE`] bytes).
    pub fn parse(b: &[u8]) -> Chunk {
        Chunk {
            kind: BE::read_u32(&b[0..]),
            sector: BE::read_u64(&b[8..]),
            sector_count: BE::read_u64(&b[0x10..]),
            offset: BE::read_u64(&b[0x18..]),
            length: BE::read_u64(&b[0x20..]),
        }
    }
}

/// Decodes base64 as GLib's `g_base64_decode` does (which QEMU uses): characters outside the
/// alphabet (whitespace, line breaks) are skipped, and decoding stops at the first `=`.
pub fn base64_decode(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let mut acc = 0u32;
    let mut n = 0;
    for &c in text {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => continue,
        };
        acc = acc << 6 | u32::from(v);
        n += 1;
        if n == 4 {
            out.extend_from_slice(&[(acc >> 16) as u8, (acc >> 8) as u8, acc as u8]);
            acc = 0;
            n = 0;
        }
    }
    match n {
        2 => out.push((acc >> 4) as u8),
        3 => out.extend_from_slice(&[(acc >> 10) as u8, (acc >> 2) as u8]),
        _ => {}
    }
    out
}
