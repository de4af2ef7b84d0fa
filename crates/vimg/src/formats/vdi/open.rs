//! Opening a VDI: the header checked in qemu's order and the block map checked entry by
//! entry (VirtualBox's VDI header, `VDIHEADER1`). `read.rs` answers `map`.

use std::sync::Arc;

use super::error::VdiError;
use super::header::{
    self, Header, BLOCK_FREE, BLOCK_SIZE, BLOCK_ZERO, HEADER_AT, HEADER_SIZE, HEADER_SIZE_1_1,
    HEADER_SIZE_MAX, SECTOR_SIZE, SIGNATURE, TYPE_DIFF, TYPE_FIXED, TYPE_NORMAL, TYPE_UNDO,
    VERSION_1_1,
};
use super::read::VdiReader;
use crate::error::{ErrorKind, Result};
use crate::limits;
use crate::storage::{read_exact, Storage};

/// qemu's limit on blocks per image (a block map just under 2 GiB).
pub const MAX_BLOCKS: u32 = (0x8000_0000u32 - 512) / 4;
/// qemu's limit on the disk size ([`MAX_BLOCKS`] blocks of 1 MiB).
pub const MAX_DISK_SIZE: u64 = MAX_BLOCKS as u64 * BLOCK_SIZE as u64;

/// A condition qemu-img has words for: its message, then where vimg found it.
fn qemu(words: impl Into<String>, detail: impl Into<String>) -> VdiError {
    VdiError::Qemu {
        words: words.into(),
        detail: detail.into(),
        kind: ErrorKind::Unsupported,
    }
}

fn unsupported(field: &'static str, at: u64, value: u64, expected: impl Into<String>) -> VdiError {
    VdiError::Unsupported {
        field,
        at,
        value,
        expected: expected.into(),
    }
}

/// Checks the header fields, in qemu's order where qemu checks them.
fn validate_header(h: &Header, len: u64) -> Result<u64, VdiError> {
    if h.signature != SIGNATURE {
        return Err(VdiError::Signature { found: h.signature });
    }
    if h.version != VERSION_1_1 {
        return Err(VdiError::Version {
            version: h.version,
            major: h.version >> 16,
            minor: h.version & 0xffff,
        });
    }
    if !(HEADER_SIZE_1_1..=HEADER_SIZE_MAX).contains(&h.header_size) {
        return Err(VdiError::HeaderSize {
            value: h.header_size,
        });
    }
    match h.image_type {
        TYPE_NORMAL | TYPE_FIXED => {}
        TYPE_UNDO | TYPE_DIFF => {
            return Err(VdiError::Differencing(format!(
                "image type {} ({})",
                h.image_type,
                if h.image_type == TYPE_DIFF {
                    "diff"
                } else {
                    "undo"
                }
            )))
        }
        value => return Err(VdiError::ImageType { value }),
    }
    // From here qemu's order and qemu's words (block/vdi.c, vdi_open), each followed by
    // where vimg found the value; in qemu-img compatibility mode only qemu's words are
    // printed.
    let sector = u64::from(SECTOR_SIZE);
    if h.disk_size > MAX_DISK_SIZE {
        return Err(qemu(
            format!(
                "Unsupported VDI image size (size is {:#x}, max supported is {MAX_DISK_SIZE:#x})",
                h.disk_size
            ),
            "disk size at 0x170",
        ));
    }
    // VBoxManage convertfromraw writes disk sizes that are not whole sectors; qemu reads them
    // rounded up, and so does vimg (the rest of the last sector is in the last block).
    let disk_size = h.disk_size.div_ceil(sector) * sector;
    if !u64::from(h.offset_bmap).is_multiple_of(sector) {
        return Err(qemu(
            format!(
                "unsupported VDI image (unaligned block map offset {:#x})",
                h.offset_bmap
            ),
            "block map offset at 0x154, it must be a multiple of 512",
        ));
    }
    if !u64::from(h.offset_data).is_multiple_of(sector) {
        return Err(qemu(
            format!(
                "unsupported VDI image (unaligned data offset {:#x})",
                h.offset_data
            ),
            "data offset at 0x158, it must be a multiple of 512",
        ));
    }
    if h.sector_size != SECTOR_SIZE {
        return Err(qemu(
            format!(
                "unsupported VDI image (sector size {} is not {SECTOR_SIZE})",
                h.sector_size
            ),
            "sector size at 0x168",
        ));
    }
    if h.block_size != BLOCK_SIZE {
        return Err(qemu(
            format!(
                "unsupported VDI image (block size {} is not {BLOCK_SIZE})",
                h.block_size
            ),
            "block size at 0x178",
        ));
    }
    let room = u64::from(h.blocks_in_image) * u64::from(BLOCK_SIZE);
    if disk_size > room {
        return Err(VdiError::Qemu {
            words: format!(
                "unsupported VDI image (disk size {disk_size}, image bitmap has room for {room})"
            ),
            detail: format!(
                "disk size at 0x170 needs {} blocks of 1 MiB, blocks in image at 0x180 is {}",
                disk_size.div_ceil(u64::from(BLOCK_SIZE)),
                h.blocks_in_image
            ),
            kind: ErrorKind::Invalid,
        });
    }
    if h.uuid_link != [0; 16] {
        return Err(qemu(
            "unsupported VDI image (non-NULL link UUID)",
            format!(
                "{} at 0x1a8; differencing VDIs are not supported",
                uuid::Uuid::from_bytes_le(h.uuid_link)
            ),
        ));
    }
    if h.uuid_parent != [0; 16] {
        return Err(qemu(
            "unsupported VDI image (non-NULL parent UUID)",
            format!(
                "{} at 0x1b8; differencing VDIs are not supported",
                uuid::Uuid::from_bytes_le(h.uuid_parent)
            ),
        ));
    }
    if h.blocks_in_image > MAX_BLOCKS {
        return Err(qemu(
            format!(
                "unsupported VDI image (too many blocks {}, max is {MAX_BLOCKS})",
                h.blocks_in_image
            ),
            "blocks in image at 0x180",
        ));
    }
    // vimg's own check after qemu's (qemu ignores the field).
    if h.block_extra != 0 {
        return Err(unsupported(
            "extra bytes per block",
            0x17c,
            h.block_extra.into(),
            "it must be 0",
        ));
    }
    let header_end = HEADER_AT + u64::from(h.header_size);
    let bmap_at = u64::from(h.offset_bmap);
    let bmap_bytes = u64::from(h.blocks_in_image) * 4;
    if bmap_at < header_end {
        return Err(VdiError::Layout(format!(
            "block map offset {bmap_at:#x} (at 0x154) lies inside the header (which ends at {header_end:#x})"
        )));
    }
    if bmap_at + bmap_bytes > len {
        return Err(VdiError::MapPastEof {
            offset: bmap_at,
            bytes: bmap_bytes,
            len,
        });
    }
    let data_at = u64::from(h.offset_data);
    if data_at < bmap_at + bmap_bytes {
        return Err(VdiError::Layout(format!(
            "data offset {data_at:#x} (at 0x158) lies inside the block map ({bmap_at:#x}..{:#x})",
            bmap_at + bmap_bytes
        )));
    }
    Ok(disk_size)
}

/// Checks every block map entry: in range, inside the file, and used once.
fn validate_map(map: &[u32], blocks: u32, data_at: u64, len: u64) -> Result<(), VdiError> {
    // One bit per block of the data area: which entry claimed it first is found again only
    // when a duplicate turns up.
    let mut seen = vec![0u64; (blocks as usize).div_ceil(64)];
    let block = u64::from(BLOCK_SIZE);
    for (i, &v) in map.iter().enumerate() {
        if v == BLOCK_FREE || v == BLOCK_ZERO {
            continue;
        }
        let index = i as u32;
        if v >= blocks {
            return Err(VdiError::EntryOutOfRange {
                index,
                value: v,
                blocks,
            });
        }
        let start = data_at + u64::from(v) * block;
        let end = start + block;
        if end > len {
            return Err(VdiError::EntryPastEof {
                index,
                value: v,
                start,
                end,
                len,
            });
        }
        let (word, bit) = ((v / 64) as usize, v % 64);
        if let Some(w) = seen.get_mut(word) {
            if *w & (1 << bit) != 0 {
                let other = map.iter().position(|x| *x == v).unwrap_or(i) as u32;
                return Err(VdiError::EntryDuplicate {
                    index,
                    other,
                    value: v,
                });
            }
            *w |= 1 << bit;
        }
    }
    Ok(())
}

impl VdiReader {
    /// Opens the VDI in `storage`.
    pub fn open(storage: Arc<dyn Storage>) -> Result<VdiReader> {
        let len = storage.len();
        if len < HEADER_SIZE as u64 {
            return Err(VdiError::TooShort { len }.into());
        }
        let mut hb = [0u8; HEADER_SIZE];
        read_exact(&*storage, &mut hb, 0, "VDI header")?;
        let header = Header::parse(&hb)?;
        let virtual_size = validate_header(&header, len)?;
        let n = limits::check_table_bytes("VDI block map", u64::from(header.blocks_in_image) * 4)?;
        let mut raw = vec![0u8; n];
        read_exact(
            &*storage,
            &mut raw,
            header.offset_bmap.into(),
            "VDI block map",
        )?;
        let map = header::parse_block_map(&raw, header.blocks_in_image as usize)?;
        drop(raw);
        validate_map(&map, header.blocks_in_image, header.offset_data.into(), len)?;
        Ok(VdiReader {
            storage,
            header,
            virtual_size,
            map,
        })
    }
}
