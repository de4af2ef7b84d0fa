//! The VDI on-disk structures, as VirtualBox defines them (src/VBox/Storage/VDICore.h:
//! `VDIPREHEADER`, `VDIHEADER1` and `VDIHEADER1PLUS`), all little-endian:
//!
//! - the pre-header: 64 bytes of text, the signature `0xbeda107f`, the version (1.1);
//! - the version 1.1 header: header size, image type, flags, comment, block map and data
//!   offsets, legacy geometry, disk size, block size, extra bytes per block, block counts,
//!   four UUIDs (image, last modification, link = parent image, parent modification) and,
//!   in the "plus" variant (header size 0x190), the logical CHS geometry;
//! - the block map: one u32 per block, the index of the block in the data area, or
//!   [`BLOCK_FREE`] (never written: reads as zero, or as the parent in a differencing
//!   image) or [`BLOCK_ZERO`] (discarded: reads as zero).
//!
//! [`Header`] covers the first 512 bytes (pre-header, header and padding) and round-trips
//! them byte for byte.

use byteorder::{ByteOrder, LittleEndian as LE};

use super::error::VdiError;

/// Size of the header block: pre-header, header and padding.
pub const HEADER_SIZE: usize = 512;
/// Offset of the version 1.x header (after the pre-header).
pub const HEADER_AT: u64 = 0x48;
/// 0xbeda107f: the VDI signature at offset 0x40.
pub const SIGNATURE: u32 = 0xbeda_107f;
/// Version 1.1 of the header (major in the high 16 bits).
pub const VERSION_1_1: u32 = 0x0001_0001;
/// Size of a version 1.1 header without the logical geometry (what qemu writes).
pub const HEADER_SIZE_1_1: u32 = 0x180;
/// Size of a version 1.1 header with the logical geometry (what VirtualBox writes).
pub const HEADER_SIZE_1_1_PLUS: u32 = 0x190;
/// The largest header size that fits the 512-byte header block.
pub const HEADER_SIZE_MAX: u32 = HEADER_SIZE as u32 - HEADER_AT as u32;
/// Image type "normal": blocks allocated on demand (qemu: dynamic).
pub const TYPE_NORMAL: u32 = 1;
/// Image type "fixed": every block allocated at creation (qemu: static).
pub const TYPE_FIXED: u32 = 2;
/// Image type "undo" (VirtualBox undo disks).
pub const TYPE_UNDO: u32 = 3;
/// Image type "diff": a differencing image over a parent.
pub const TYPE_DIFF: u32 = 4;
/// The only block size VirtualBox and qemu use, 1 MiB.
pub const BLOCK_SIZE: u32 = 1 << 20;
/// The only sector size, 512 bytes.
pub const SECTOR_SIZE: u32 = 512;
/// Block map entry of a block never written.
pub const BLOCK_FREE: u32 = 0xffff_ffff;
/// Block map entry of a discarded block (reads as zeros).
pub const BLOCK_ZERO: u32 = 0xffff_fffe;
/// The pre-header text qemu writes.
pub const QEMU_TEXT: &[u8] = b"<<< QEMU VM Virtual Disk Image >>>\n";

fn arr<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[at..at + N]);
    a
}

/// The first 512 bytes of a VDI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 0x000 free text, NUL padded ("<<< Oracle VM VirtualBox Disk Image >>>\n").
    pub text: [u8; 64],
    /// 0x040 [`SIGNATURE`].
    pub signature: u32,
    /// 0x044 version ([`VERSION_1_1`]).
    pub version: u32,
    /// 0x048 size of the header from 0x48 on (0x180 or 0x190).
    pub header_size: u32,
    /// 0x04c image type ([`TYPE_NORMAL`], [`TYPE_FIXED`], [`TYPE_UNDO`], [`TYPE_DIFF`]).
    pub image_type: u32,
    /// 0x050 image flags.
    pub image_flags: u32,
    /// 0x054 comment (256 bytes).
    pub description: [u8; 256],
    /// 0x154 offset of the block map.
    pub offset_bmap: u32,
    /// 0x158 offset of the data area.
    pub offset_data: u32,
    /// 0x15c legacy geometry: cylinders.
    pub cylinders: u32,
    /// 0x160 legacy geometry: heads.
    pub heads: u32,
    /// 0x164 legacy geometry: sectors.
    pub sectors: u32,
    /// 0x168 sector size ([`SECTOR_SIZE`]).
    pub sector_size: u32,
    /// 0x16c unused.
    pub unused1: u32,
    /// 0x170 disk size in bytes.
    pub disk_size: u64,
    /// 0x178 block size ([`BLOCK_SIZE`]).
    pub block_size: u32,
    /// 0x17c extra bytes in front of each block (0).
    pub block_extra: u32,
    /// 0x180 number of blocks (block map entries).
    pub blocks_in_image: u32,
    /// 0x184 number of allocated blocks.
    pub blocks_allocated: u32,
    /// 0x188 UUID of this image.
    pub uuid_image: [u8; 16],
    /// 0x198 UUID of the last modification (snapshot).
    pub uuid_last_snap: [u8; 16],
    /// 0x1a8 UUID of the parent image (differencing images), zero otherwise.
    pub uuid_link: [u8; 16],
    /// 0x1b8 UUID of the parent's last modification, zero otherwise.
    pub uuid_parent: [u8; 16],
    /// 0x1c8 logical geometry (cylinders, heads, sectors, sector size) of 0x190-byte
    /// headers, then padding: kept as bytes.
    pub tail: [u8; 56],
}

impl Header {
    /// Parses the first 512 bytes. Fails only when `buf` is short; the reader validates.
    pub fn parse(buf: &[u8]) -> Result<Header, VdiError> {
        let b: [u8; HEADER_SIZE] = buf
            .get(..HEADER_SIZE)
            .and_then(|s| s.try_into().ok())
            .ok_or(VdiError::TooShort {
                len: buf.len() as u64,
            })?;
        Ok(Header {
            text: arr(&b, 0),
            signature: LE::read_u32(&b[0x40..]),
            version: LE::read_u32(&b[0x44..]),
            header_size: LE::read_u32(&b[0x48..]),
            image_type: LE::read_u32(&b[0x4c..]),
            image_flags: LE::read_u32(&b[0x50..]),
            description: arr(&b, 0x54),
            offset_bmap: LE::read_u32(&b[0x154..]),
            offset_data: LE::read_u32(&b[0x158..]),
            cylinders: LE::read_u32(&b[0x15c..]),
            heads: LE::read_u32(&b[0x160..]),
            sectors: LE::read_u32(&b[0x164..]),
            sector_size: LE::read_u32(&b[0x168..]),
            unused1: LE::read_u32(&b[0x16c..]),
            disk_size: LE::read_u64(&b[0x170..]),
            block_size: LE::read_u32(&b[0x178..]),
            block_extra: LE::read_u32(&b[0x17c..]),
            blocks_in_image: LE::read_u32(&b[0x180..]),
            blocks_allocated: LE::read_u32(&b[0x184..]),
            uuid_image: arr(&b, 0x188),
            uuid_last_snap: arr(&b, 0x198),
            uuid_link: arr(&b, 0x1a8),
            uuid_parent: arr(&b, 0x1b8),
            tail: arr(&b, 0x1c8),
        })
    }

    /// Writes the 512 bytes into `out[..512]`.
    pub fn write_to(&self, out: &mut [u8]) {
        let b = &mut out[..HEADER_SIZE];
        b[0..0x40].copy_from_slice(&self.text);
        b[0x40..0x44].copy_from_slice(&self.signature.to_le_bytes());
        b[0x44..0x48].copy_from_slice(&self.version.to_le_bytes());
        b[0x48..0x4c].copy_from_slice(&self.header_size.to_le_bytes());
        b[0x4c..0x50].copy_from_slice(&self.image_type.to_le_bytes());
        b[0x50..0x54].copy_from_slice(&self.image_flags.to_le_bytes());
        b[0x54..0x154].copy_from_slice(&self.description);
        b[0x154..0x158].copy_from_slice(&self.offset_bmap.to_le_bytes());
        b[0x158..0x15c].copy_from_slice(&self.offset_data.to_le_bytes());
        b[0x15c..0x160].copy_from_slice(&self.cylinders.to_le_bytes());
        b[0x160..0x164].copy_from_slice(&self.heads.to_le_bytes());
        b[0x164..0x168].copy_from_slice(&self.sectors.to_le_bytes());
        b[0x168..0x16c].copy_from_slice(&self.sector_size.to_le_bytes());
        b[0x16c..0x170].copy_from_slice(&self.unused1.to_le_bytes());
        b[0x170..0x178].copy_from_slice(&self.disk_size.to_le_bytes());
        b[0x178..0x17c].copy_from_slice(&self.block_size.to_le_bytes());
        b[0x17c..0x180].copy_from_slice(&self.block_extra.to_le_bytes());
        b[0x180..0x184].copy_from_slice(&self.blocks_in_image.to_le_bytes());
        b[0x184..0x188].copy_from_slice(&self.blocks_allocated.to_le_bytes());
        b[0x188..0x198].copy_from_slice(&self.uuid_image);
        b[0x198..0x1a8].copy_from_slice(&self.uuid_last_snap);
        b[0x1a8..0x1b8].copy_from_slice(&self.uuid_link);
        b[0x1b8..0x1c8].copy_from_slice(&self.uuid_parent);
        b[0x1c8..].copy_from_slice(&self.tail);
    }

    /// The 512 bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        self.write_to(&mut b);
        b
    }

    /// The pre-header text up to its first NUL or newline, for messages.
    pub fn text(&self) -> String {
        let end = self
            .text
            .iter()
            .position(|c| *c == 0 || *c == b'\n')
            .unwrap_or(self.text.len());
        String::from_utf8_lossy(&self.text[..end]).into_owned()
    }
}

/// Parses a block map of `entries` little-endian u32s from `buf`.
pub fn parse_block_map(buf: &[u8], entries: usize) -> Result<Vec<u32>, VdiError> {
    let need = entries
        .checked_mul(4)
        .filter(|n| *n <= buf.len())
        .ok_or_else(|| {
            VdiError::Layout(format!(
                "block map is cut short ({} bytes for {entries} entries)",
                buf.len()
            ))
        })?;
    Ok(buf[..need]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Writes `map` little-endian into `out`; the rest of `out` is zero.
pub fn write_block_map(map: &[u32], out: &mut [u8]) {
    out.fill(0);
    for (c, e) in out.chunks_exact_mut(4).zip(map) {
        c.copy_from_slice(&e.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-annotated header of a 10 MiB dynamic image with 9 blocks allocated, as qemu
    /// writes it.
    fn fixture() -> Vec<u8> {
        let mut b = Vec::new();
        let mut text = [0u8; 64]; // 0x000 pre-header text
        text[..QEMU_TEXT.len()].copy_from_slice(QEMU_TEXT);
        b.extend_from_slice(&text);
        b.extend_from_slice(&[0x7f, 0x10, 0xda, 0xbe]); // 0x040 signature 0xbeda107f
        b.extend_from_slice(&[1, 0, 1, 0]); // 0x044 version 1.1
        b.extend_from_slice(&[0x80, 1, 0, 0]); // 0x048 header size 0x180
        b.extend_from_slice(&[1, 0, 0, 0]); // 0x04c image type: normal (dynamic)
        b.extend_from_slice(&[0; 4]); // 0x050 flags
        b.extend_from_slice(&[0; 256]); // 0x054 comment
        b.extend_from_slice(&[0, 2, 0, 0]); // 0x154 block map at 0x200
        b.extend_from_slice(&[0, 4, 0, 0]); // 0x158 data at 0x400
        b.extend_from_slice(&[0; 12]); // 0x15c legacy geometry C/H/S: unset
        b.extend_from_slice(&[0, 2, 0, 0]); // 0x168 sector size 512
        b.extend_from_slice(&[0; 4]); // 0x16c unused
        b.extend_from_slice(&[0, 0, 0xa0, 0, 0, 0, 0, 0]); // 0x170 disk size 10 MiB
        b.extend_from_slice(&[0, 0, 0x10, 0]); // 0x178 block size 1 MiB
        b.extend_from_slice(&[0; 4]); // 0x17c block extra 0
        b.extend_from_slice(&[10, 0, 0, 0]); // 0x180 blocks in image 10
        b.extend_from_slice(&[9, 0, 0, 0]); // 0x184 blocks allocated 9
        b.extend_from_slice(&[0x11; 16]); // 0x188 image UUID
        b.extend_from_slice(&[0x22; 16]); // 0x198 last modification UUID
        b.extend_from_slice(&[0; 16]); // 0x1a8 link (parent) UUID: none
        b.extend_from_slice(&[0; 16]); // 0x1b8 parent modification UUID: none
        b.resize(512, 0); // 0x1c8 logical geometry and padding
        b
    }

    #[test]
    fn header_round_trip() {
        let b = fixture();
        let h = Header::parse(&b).unwrap();
        assert_eq!(h.signature, SIGNATURE);
        assert_eq!(h.version, VERSION_1_1);
        assert_eq!(h.header_size, HEADER_SIZE_1_1);
        assert_eq!(h.image_type, TYPE_NORMAL);
        assert_eq!((h.offset_bmap, h.offset_data), (0x200, 0x400));
        assert_eq!(h.sector_size, SECTOR_SIZE);
        assert_eq!(h.disk_size, 10 << 20);
        assert_eq!(h.block_size, BLOCK_SIZE);
        assert_eq!((h.blocks_in_image, h.blocks_allocated), (10, 9));
        assert_eq!(h.uuid_image, [0x11; 16]);
        assert_eq!(h.text(), "<<< QEMU VM Virtual Disk Image >>>");
        assert_eq!(h.to_bytes().to_vec(), b);
        assert!(matches!(
            Header::parse(&b[..511]),
            Err(VdiError::TooShort { len: 511 })
        ));
    }

    #[test]
    fn block_map_round_trip() {
        // Block 0 never written, block 1 at data block 0, block 2 discarded.
        let raw = [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0xfe, 0xff, 0xff, 0xff];
        let map = parse_block_map(&raw, 3).unwrap();
        assert_eq!(map, vec![BLOCK_FREE, 0, BLOCK_ZERO]);
        let mut out = [1u8; 16];
        write_block_map(&map, &mut out);
        assert_eq!(&out[..12], &raw);
        assert_eq!(&out[12..], &[0; 4]);
        assert!(parse_block_map(&raw, 4).is_err());
    }
}
