//! The cloop V2.0 image layout, as the Linux cloop driver writes it and QEMU's
//! block/cloop.c reads it (all big-endian):
//!
//! | offset | field |
//! |---|---|
//! | 0x00 | 128 bytes: a shell preamble starting with [`crate::formats::unread::CLOOP_MAGIC`] |
//! | 0x80 | block size in bytes (u32) |
//! | 0x84 | number of blocks (u32) |
//! | 0x88 | offsets: `n_blocks + 1` u64, block `i` is the zlib stream at `offsets[i]..offsets[i+1]` |

use super::error::CloopError;

/// Size of the header: preamble, block size, block count.
pub const HEADER_SIZE: usize = 136;
/// Offset of the offsets table.
pub const OFFSETS_AT: u64 = 136;

/// The cloop header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 0x00 the shell preamble.
    pub preamble: [u8; 128],
    /// 0x80 uncompressed block size.
    pub block_size: u32,
    /// 0x84 number of blocks.
    pub n_blocks: u32,
}

impl Header {
    /// Parses the first [`HEADER_SIZE`] bytes of `b`.
    pub fn parse(b: &[u8]) -> Result<Header, CloopError> {
        if b.len() < HEADER_SIZE {
            return Err(CloopError::TooShort {
                len: b.len() as u64,
            });
        }
        let mut preamble = [0u8; 128];
        preamble.copy_from_slice(&b[..128]);
        Ok(Header {
            preamble,
            block_size: u32::from_be_bytes([b[128], b[129], b[130], b[131]]),
            n_blocks: u32::from_be_bytes([b[132], b[133], b[134], b[135]]),
        })
    }

    /// Writes it into the first [`HEADER_SIZE`] bytes of `b`.
    pub fn write_to(&self, b: &mut [u8]) {
        b[..128].copy_from_slice(&self.preamble);
        b[128..132].copy_from_slice(&self.block_size.to_be_bytes());
        b[132..136].copy_from_slice(&self.n_blocks.to_be_bytes());
    }
}

/// Parses `n` big-endian u64 offsets from `b`.
pub fn parse_offsets(b: &[u8], n: usize) -> Vec<u64> {
    b.chunks_exact(8)
        .take(n)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_be_bytes(a)
        })
        .collect()
}
