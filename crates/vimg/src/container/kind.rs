//! Which compression a container uses, told by its magic bytes.

use std::fmt;

use serde::Serialize;

/// A compression container.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Compression {
    /// xz (LZMA2), `.xz`.
    Xz,
    /// gzip (deflate), `.gz`.
    Gzip,
    /// Zstandard, `.zst`.
    Zstd,
}

impl Compression {
    /// The name used in messages, JSON and `-o compress=`: `xz`, `gzip`, `zstd`.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Xz => "xz",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// xz stream header magic: 0xFD "7zXZ" 0x00.
pub(super) const XZ_MAGIC: [u8; 6] = [0xfd, b'7', b'z', b'X', b'Z', 0x00];
/// gzip member magic (ID1 ID2) and CM = 8 (deflate), the only method defined.
pub(super) const GZIP_MAGIC: [u8; 3] = [0x1f, 0x8b, 0x08];
/// zstd frame magic 0xFD2FB528, little-endian.
pub(super) const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// bzip2: "BZh" + block size digit + the block magic (pi) — recognised only to refuse it.
pub(super) const BZIP2_BLOCK_MAGIC: [u8; 6] = [0x31, 0x41, 0x59, 0x26, 0x53, 0x59];

/// Recognises a compression container from the first bytes of a source. The checks go past
/// the magic where the format allows (xz stream flags and their CRC, gzip reserved flag bits,
/// zstd's reserved descriptor bit), so a raw disk is not mistaken for a container by chance.
pub fn detect(head: &[u8]) -> Option<Compression> {
    if head.len() >= 12 && head[..6] == XZ_MAGIC {
        let flags = &head[6..8];
        let crc = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
        if flags[0] == 0 && flags[1] & 0xf0 == 0 && crc32fast::hash(flags) == crc {
            return Some(Compression::Xz);
        }
    }
    // FLG bits 5..7 are reserved and must be zero (RFC 1952, 2.3.1).
    if head.len() >= 10 && head[..3] == GZIP_MAGIC && head[3] & 0xe0 == 0 {
        return Some(Compression::Gzip);
    }
    if head.len() >= 5 && head[..4] == ZSTD_MAGIC && head[4] & 0x08 == 0 {
        return Some(Compression::Zstd);
    }
    // Skippable frames (pzstd writes one first): magic 0x184D2A5?.
    if head.len() >= 8 && head[0] & 0xf0 == 0x50 && head[1..4] == [0x2a, 0x4d, 0x18] {
        return Some(Compression::Zstd);
    }
    None
}

/// True when `head` starts like a bzip2 stream (which vimg does not decode).
pub fn is_bzip2(head: &[u8]) -> bool {
    head.len() >= 10
        && head.starts_with(b"BZh")
        && (b'1'..=b'9').contains(&head[3])
        && head[4..10] == BZIP2_BLOCK_MAGIC
}
