//! The decoded size of a container, learned from its metadata without decoding it.
//!
//! - xz: every stream ends with a footer that locates its index, which lists each block's
//!   compressed and decoded size (xz file format 1.2.0, sections 2.1.2 and 4). Streams are
//!   walked from the end of the file backwards, across stream padding.
//! - zstd: each frame header may carry the frame's content size (RFC 8878, 3.1.1.1); the
//!   frames are walked through their block headers to find the next frame. Skippable frames
//!   are skipped. A frame without a content size makes the size unknown.
//! - gzip keeps only the size modulo 2^32, which is not enough: its size is unknown.

use super::error::ContainerError;
use super::kind::{Compression, XZ_MAGIC, ZSTD_MAGIC};
use crate::error::Result;
use crate::limits::MAX_VIRTUAL_SIZE;
use crate::storage::Storage;

/// xz stream footer magic "YZ".
const XZ_FOOTER_MAGIC: [u8; 2] = *b"YZ";
/// Size of an xz stream header and of a stream footer.
const XZ_HEADER_LEN: u64 = 12;
/// Largest xz index read into memory (a 4 TiB image in 1 MiB blocks needs about 32 MiB).
const MAX_XZ_INDEX: u64 = 64 << 20;
/// Most xz streams in one file.
const MAX_XZ_STREAMS: u32 = 100_000;
/// Most zstd blocks walked before the size is declared unknown (a hostile file of tiny
/// blocks must not make the walk take long).
const MAX_ZSTD_BLOCKS: u64 = 4_000_000;

fn bad(
    c: Compression,
    name: &str,
    what: &'static str,
    offset: u64,
    detail: String,
) -> crate::Error {
    ContainerError::BadMetadata {
        compression: c,
        name: name.to_string(),
        what,
        offset,
        detail,
    }
    .into()
}

fn read(
    s: &dyn Storage,
    buf: &mut [u8],
    off: u64,
    c: Compression,
    name: &str,
    what: &'static str,
) -> Result<()> {
    s.read_exact_at(buf, off)
        .map_err(|e| bad(c, name, what, off, format!("cannot be read: {e}")))
}

/// Parses an xz variable-length integer (up to 9 bytes, 63 bits) at `*pos` in `b`.
fn varint(b: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for i in 0..9 {
        let byte = *b.get(*pos)?;
        *pos += 1;
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            // A multi-byte integer may not end in a zero byte (xz 1.4).
            if i > 0 && byte == 0 {
                return None;
            }
            return Some(v);
        }
    }
    None
}

/// The decoded size of a seekable xz file, from its stream indexes.
pub fn xz_decoded_size(s: &dyn Storage, name: &str) -> Result<u64> {
    let c = Compression::Xz;
    let mut end = s.len();
    let mut total = 0u64;
    let mut streams = 0u32;
    loop {
        // Stream padding: zero bytes in groups of four before the footer (and at the end).
        let mut word = [0u8; 4];
        while end >= 4 {
            read(s, &mut word, end - 4, c, name, "stream padding")?;
            if word != [0u8; 4] {
                break;
            }
            end -= 4;
        }
        if end < 2 * XZ_HEADER_LEN {
            return Err(bad(
                c,
                name,
                "stream footer",
                end,
                "the file is too short".into(),
            ));
        }
        let foot_at = end - XZ_HEADER_LEN;
        let mut foot = [0u8; 12];
        read(s, &mut foot, foot_at, c, name, "stream footer")?;
        if foot[10..12] != XZ_FOOTER_MAGIC {
            return Err(bad(
                c,
                name,
                "stream footer",
                foot_at,
                format!("magic is {:02x?}, expected \"YZ\" (is the file truncated, or followed by other data?)", &foot[10..12]),
            ));
        }
        let crc = u32::from_le_bytes([foot[0], foot[1], foot[2], foot[3]]);
        if crc32fast::hash(&foot[4..10]) != crc {
            return Err(bad(
                c,
                name,
                "stream footer",
                foot_at,
                format!("CRC32 {crc:#010x} does not match"),
            ));
        }
        let backward = u64::from(u32::from_le_bytes([foot[4], foot[5], foot[6], foot[7]]));
        let index_len = (backward + 1) * 4;
        if index_len > MAX_XZ_INDEX || index_len > foot_at {
            return Err(bad(
                c,
                name,
                "index",
                foot_at,
                format!("size {index_len:#x} is out of range"),
            ));
        }
        let index_at = foot_at - index_len;
        let mut index = vec![0u8; index_len as usize];
        read(s, &mut index, index_at, c, name, "index")?;
        let crc_at = index.len() - 4;
        let icrc = u32::from_le_bytes([
            index[crc_at],
            index[crc_at + 1],
            index[crc_at + 2],
            index[crc_at + 3],
        ]);
        if crc32fast::hash(&index[..crc_at]) != icrc {
            return Err(bad(
                c,
                name,
                "index",
                index_at,
                format!("CRC32 {icrc:#010x} does not match"),
            ));
        }
        if index[0] != 0 {
            return Err(bad(
                c,
                name,
                "index",
                index_at,
                format!("indicator is {:#04x}, expected 0", index[0]),
            ));
        }
        let mut p = 1usize;
        let records = varint(&index[..crc_at], &mut p)
            .ok_or_else(|| bad(c, name, "index", index_at, "bad record count".into()))?;
        // Each record takes at least two bytes.
        if records > index_len / 2 {
            return Err(bad(
                c,
                name,
                "index",
                index_at,
                format!("{records} records cannot fit in {index_len} bytes"),
            ));
        }
        let mut blocks = 0u64;
        let mut decoded = 0u64;
        for r in 0..records {
            let unpadded = varint(&index[..crc_at], &mut p);
            let size = varint(&index[..crc_at], &mut p);
            let (Some(unpadded), Some(size)) = (unpadded, size) else {
                return Err(bad(
                    c,
                    name,
                    "index",
                    index_at,
                    format!("record {r} is malformed"),
                ));
            };
            if unpadded < 5 {
                return Err(bad(
                    c,
                    name,
                    "index",
                    index_at,
                    format!("record {r} has unpadded size {unpadded}"),
                ));
            }
            let padded = unpadded
                .checked_add(3)
                .map(|x| x & !3)
                .and_then(|x| blocks.checked_add(x));
            blocks = padded
                .ok_or_else(|| bad(c, name, "index", index_at, "block sizes overflow".into()))?;
            decoded = decoded
                .checked_add(size)
                .ok_or_else(|| bad(c, name, "index", index_at, "decoded sizes overflow".into()))?;
        }
        // Index padding up to a multiple of four, all zero.
        if index[p..crc_at].iter().any(|b| *b != 0) || (crc_at - p) >= 4 {
            return Err(bad(
                c,
                name,
                "index",
                index_at,
                "padding is not zero or too long".into(),
            ));
        }
        let header_at = blocks
            .checked_add(XZ_HEADER_LEN)
            .and_then(|x| index_at.checked_sub(x))
            .ok_or_else(|| {
                bad(
                    c,
                    name,
                    "index",
                    index_at,
                    "blocks extend before the start of the file".into(),
                )
            })?;
        let mut head = [0u8; 12];
        read(s, &mut head, header_at, c, name, "stream header")?;
        if head[..6] != XZ_MAGIC || head[6..8] != foot[8..10] {
            return Err(bad(
                c,
                name,
                "stream header",
                header_at,
                "does not match its footer".into(),
            ));
        }
        total = total
            .checked_add(decoded)
            .filter(|t| *t <= MAX_VIRTUAL_SIZE)
            .ok_or_else(|| {
                bad(
                    c,
                    name,
                    "index",
                    index_at,
                    "decoded size is too large".into(),
                )
            })?;
        streams += 1;
        if header_at == 0 {
            return Ok(total);
        }
        if streams >= MAX_XZ_STREAMS {
            return Err(bad(
                c,
                name,
                "stream header",
                header_at,
                "too many concatenated streams".into(),
            ));
        }
        end = header_at;
    }
}

/// The content size a zstd frame header at the start of `head` declares, if any; for a
/// stream that cannot be walked (a pipe). The frame must be the only one: a stream with
/// more is caught when it decodes past this size.
pub fn zstd_size_from_head(head: &[u8]) -> Option<u64> {
    if head.len() < 4 || head[..4] != ZSTD_MAGIC {
        return None;
    }
    frame_header(&head[4..]).ok().and_then(|h| h.content_size)
}

struct FrameHeader {
    len: usize,
    content_size: Option<u64>,
    checksum: bool,
}

/// Why a zstd frame header is refused.
#[derive(Debug, thiserror::Error)]
enum FrameHeaderFault {
    #[error("no frame header")]
    Missing,
    #[error("reserved bit set")]
    Reserved,
    #[error("frame header is cut short")]
    Short,
}

/// Parses a frame header after the magic (RFC 8878 3.1.1.1).
fn frame_header(b: &[u8]) -> std::result::Result<FrameHeader, FrameHeaderFault> {
    let fhd = *b.first().ok_or(FrameHeaderFault::Missing)?;
    if fhd & 0x08 != 0 {
        return Err(FrameHeaderFault::Reserved);
    }
    let fcs_flag = fhd >> 6;
    let single = fhd & 0x20 != 0;
    let checksum = fhd & 0x04 != 0;
    let did = [0usize, 1, 2, 4][(fhd & 3) as usize];
    let fcs = match (fcs_flag, single) {
        (0, false) => 0,
        (0, true) => 1,
        (1, _) => 2,
        (2, _) => 4,
        _ => 8,
    };
    let mut p = 1 + usize::from(!single) + did;
    let field = b.get(p..p + fcs).ok_or(FrameHeaderFault::Short)?;
    let mut v = 0u64;
    for (i, x) in field.iter().enumerate() {
        v |= u64::from(*x) << (8 * i);
    }
    p += fcs;
    let content_size = match fcs {
        0 => None,
        2 => Some(v + 256),
        _ => Some(v),
    };
    Ok(FrameHeader {
        len: p,
        content_size,
        checksum,
    })
}

/// The decoded size of a seekable zstd file, when every frame declares its content size.
pub fn zstd_decoded_size(s: &dyn Storage, name: &str) -> Result<Option<u64>> {
    let c = Compression::Zstd;
    let len = s.len();
    let mut pos = 0u64;
    let mut total = 0u64;
    let mut blocks = 0u64;
    while pos < len {
        let mut hdr = [0u8; 18];
        let n = ((len - pos).min(18)) as usize;
        read(s, &mut hdr[..n], pos, c, name, "frame header")?;
        if n < 8 {
            return Err(bad(c, name, "frame header", pos, "cut short".into()));
        }
        let magic = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        if magic & 0xffff_fff0 == 0x184d_2a50 {
            let size = u64::from(u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]));
            pos = pos
                .checked_add(8 + size)
                .ok_or_else(|| bad(c, name, "skippable frame", pos, "size overflows".into()))?;
            continue;
        }
        if hdr[..4] != ZSTD_MAGIC {
            return Err(bad(
                c,
                name,
                "frame header",
                pos,
                format!("magic {magic:#010x} is not a zstd frame"),
            ));
        }
        let fh = frame_header(&hdr[4..n])
            .map_err(|d| bad(c, name, "frame header", pos, d.to_string()))?;
        let Some(size) = fh.content_size else {
            return Ok(None);
        };
        total = total
            .checked_add(size)
            .filter(|t| *t <= MAX_VIRTUAL_SIZE)
            .ok_or_else(|| {
                bad(
                    c,
                    name,
                    "frame header",
                    pos,
                    "content sizes add up to too much".into(),
                )
            })?;
        let mut p = pos + 4 + fh.len as u64;
        loop {
            blocks += 1;
            if blocks > MAX_ZSTD_BLOCKS {
                return Ok(None);
            }
            let mut bh = [0u8; 3];
            read(s, &mut bh, p, c, name, "block header")?;
            let v = u32::from(bh[0]) | u32::from(bh[1]) << 8 | u32::from(bh[2]) << 16;
            let last = v & 1 != 0;
            let size = u64::from(v >> 3);
            let body = match (v >> 1) & 3 {
                0 | 2 => size,
                1 => 1,
                _ => {
                    return Err(bad(
                        c,
                        name,
                        "block header",
                        p,
                        "reserved block type".into(),
                    ))
                }
            };
            p = p + 3 + body;
            if p > len {
                return Err(bad(
                    c,
                    name,
                    "block header",
                    p,
                    "block extends past the end of the file (is the file truncated?)".into(),
                ));
            }
            if last {
                break;
            }
        }
        if fh.checksum {
            p += 4;
        }
        pos = p;
    }
    if pos > len {
        return Err(bad(
            c,
            name,
            "frame",
            len,
            "the last frame is cut short".into(),
        ));
    }
    Ok(Some(total))
}
