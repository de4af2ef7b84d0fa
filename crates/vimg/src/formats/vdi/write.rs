//! The VDI writer, laid out as `qemu-img create -f vdi` lays it out: the 512-byte header,
//! the block map at 0x200 (padded to sectors), the data blocks from there on.
//!
//! - dynamic (default): blocks are appended in the order their first data arrives, from
//!   any number of threads (a short lock covers the block map update); the block map and
//!   the header, with the allocated count, are written at `finish`.
//! - static (`static=on`): every block is allocated at creation, block `i` at data block
//!   `i`; the header and block map are written first, so the writer also works on a stream
//!   (data in ascending order).

use std::sync::Mutex;

use super::error::VdiError;
use super::header::{
    write_block_map, Header, BLOCK_FREE, BLOCK_SIZE, HEADER_SIZE, HEADER_SIZE_1_1, QEMU_TEXT,
    SECTOR_SIZE, SIGNATURE, TYPE_FIXED, TYPE_NORMAL, VERSION_1_1,
};
use crate::error::{Error, ErrorKind, Result};
use crate::output::OutFile;
use crate::writer::{EncodedUnit, ImageWriter, WriterCaps};

/// Offset of the block map in images vimg writes.
pub const BMAP_OFFSET: u64 = HEADER_SIZE as u64;

/// Bytes of block map (rounded to sectors) for `blocks` blocks.
pub fn bmap_bytes(blocks: u64) -> u64 {
    (blocks * 4).div_ceil(u64::from(SECTOR_SIZE)) * u64::from(SECTOR_SIZE)
}

/// The header of a new image of `size` bytes.
pub fn new_header(size: u64, blocks: u32, fixed: bool) -> Header {
    let mut text = [0u8; 64];
    text[..QEMU_TEXT.len()].copy_from_slice(QEMU_TEXT);
    Header {
        text,
        signature: SIGNATURE,
        version: VERSION_1_1,
        header_size: HEADER_SIZE_1_1,
        image_type: if fixed { TYPE_FIXED } else { TYPE_NORMAL },
        image_flags: 0,
        description: [0; 256],
        offset_bmap: BMAP_OFFSET as u32,
        offset_data: (BMAP_OFFSET + bmap_bytes(blocks.into())) as u32,
        cylinders: 0,
        heads: 0,
        sectors: 0,
        sector_size: SECTOR_SIZE,
        unused1: 0,
        disk_size: size,
        block_size: BLOCK_SIZE,
        block_extra: 0,
        blocks_in_image: blocks,
        blocks_allocated: if fixed { blocks } else { 0 },
        // VirtualBox stores UUIDs with little-endian fields.
        uuid_image: uuid::Uuid::new_v4().to_bytes_le(),
        uuid_last_snap: uuid::Uuid::new_v4().to_bytes_le(),
        uuid_link: [0; 16],
        uuid_parent: [0; 16],
        tail: [0; 56],
    }
}

struct Alloc {
    map: Vec<u32>,
    allocated: u32,
}

/// Writes a VDI (dynamic or static).
pub struct VdiWriter {
    file: OutFile,
    size: u64,
    fixed: bool,
    header: Header,
    alloc: Mutex<Alloc>,
}

impl VdiWriter {
    /// A VDI of `size` bytes into `file`; `fixed` for a static image.
    pub fn new(file: OutFile, size: u64, fixed: bool) -> Result<VdiWriter> {
        let bs = u64::from(BLOCK_SIZE);
        // qemu rounds the disk size up to whole sectors.
        let size = size
            .checked_next_multiple_of(u64::from(SECTOR_SIZE))
            .ok_or_else(|| VdiError::Option(format!("size {size} is too large")))?;
        let blocks = u32::try_from(size.div_ceil(bs))
            .ok()
            .filter(|b| *b <= super::open::MAX_BLOCKS)
            .ok_or_else(|| {
                VdiError::Option(format!(
                    "Unsupported VDI image size (size is {size:#x}, max supported is {:#x})",
                    super::open::MAX_DISK_SIZE
                ))
            })?;
        // The block map is held in memory, as the reader holds it: the same cap (8 TiB of
        // 1 MiB blocks), checked before anything is allocated.
        crate::limits::check_table_bytes("VDI block map", u64::from(blocks) * 4)?;
        if file.is_stream() && !fixed {
            return Err(Error::unsupported(
                "a dynamic VDI keeps its block map in front of the data and cannot be written to a stream; use static=on",
            ));
        }
        let header = new_header(size, blocks, fixed);
        let map: Vec<u32> = if fixed {
            (0..blocks).collect()
        } else {
            vec![BLOCK_FREE; blocks as usize]
        };
        let w = VdiWriter {
            file,
            size,
            fixed,
            header,
            alloc: Mutex::new(Alloc {
                map,
                allocated: if fixed { blocks } else { 0 },
            }),
        };
        if fixed {
            // Everything but the data is known now: write it first, in order.
            w.write_metadata()?;
            w.file
                .set_len(u64::from(w.header.offset_data) + u64::from(blocks) * bs)?;
        }
        Ok(w)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Alloc>> {
        self.alloc
            .lock()
            .map_err(|_| Error::msg(ErrorKind::Io, "VDI writer lock poisoned"))
    }

    fn write_metadata(&self) -> Result<u64> {
        let a = self.lock()?;
        let mut h = self.header.clone();
        h.blocks_allocated = a.allocated;
        self.file.write_all_at(&h.to_bytes(), 0)?;
        let mut bmap = vec![0u8; bmap_bytes(a.map.len() as u64) as usize];
        write_block_map(&a.map, &mut bmap);
        self.file.write_all_at(&bmap, BMAP_OFFSET)?;
        Ok(u64::from(h.offset_data) + u64::from(a.allocated) * u64::from(BLOCK_SIZE))
    }

    /// Host offset of block `block`'s data, allocating it when `allocate`.
    fn block_data(&self, block: usize, allocate: bool) -> Result<Option<u64>> {
        let mut a = self.lock()?;
        let entry = a.map.get(block).copied().ok_or_else(|| {
            Error::invalid_argument(format!("block {block} is past the end of the VDI"))
        })?;
        let index = if entry != BLOCK_FREE {
            entry
        } else if !allocate {
            return Ok(None);
        } else {
            let i = a.allocated;
            a.map[block] = i;
            a.allocated += 1;
            i
        };
        Ok(Some(
            u64::from(self.header.offset_data) + u64::from(index) * u64::from(BLOCK_SIZE),
        ))
    }

    fn check(&self, offset: u64, len: u64) -> Result<u64> {
        offset
            .checked_add(len)
            .filter(|e| *e <= self.size)
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "write of {len} bytes at {offset:#x} past the end of the VDI ({:#x} bytes)",
                    self.size
                ))
            })
    }
}

impl ImageWriter for VdiWriter {
    fn caps(&self) -> WriterCaps {
        WriterCaps {
            unit: u64::from(SECTOR_SIZE),
            ordered: self.file.is_stream(),
            encodes: false,
        }
    }

    /// Blocks are placed in the order they are first allocated: the engine calls this in
    /// guest order, so the layout does not depend on thread timing.
    fn allocate(&self, offset: u64, len: u64) -> Result<bool> {
        if self.file.is_stream() {
            return Ok(false);
        }
        let end = self.check(offset, len)?;
        let bs = u64::from(BLOCK_SIZE);
        let mut block = offset / bs;
        while block * bs < end {
            self.block_data(block as usize, true)?
                .ok_or_else(|| Error::msg(ErrorKind::Io, "VDI block allocation failed"))?;
            block += 1;
        }
        Ok(true)
    }

    fn write(&self, offset: u64, data: &[u8], _encoded: &[EncodedUnit]) -> Result<()> {
        let end = self.check(offset, data.len() as u64)?;
        let bs = u64::from(BLOCK_SIZE);
        let mut pos = offset;
        while pos < end {
            let block = (pos / bs) as usize;
            let in_block = pos % bs;
            // Static images have every block in place: write runs across blocks at once.
            let n = if self.fixed {
                end - pos
            } else {
                (bs - in_block).min(end - pos)
            };
            let host = self
                .block_data(block, true)?
                .ok_or_else(|| Error::msg(ErrorKind::Io, "VDI block allocation failed"))?;
            let from = (pos - offset) as usize;
            self.file
                .write_all_at(&data[from..from + n as usize], host + in_block)?;
            pos += n;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let end = self.check(offset, 0)?.saturating_add(len).min(self.size);
        if self.file.is_stream() {
            return Ok(());
        }
        let bs = u64::from(BLOCK_SIZE);
        let mut pos = offset;
        while pos < end {
            let block = (pos / bs) as usize;
            let in_block = pos % bs;
            let n = (bs - in_block).min(end - pos);
            // Blocks never written already read as zero.
            if let Some(host) = self.block_data(block, false)? {
                self.file.zero_range(host + in_block, n)?;
            }
            pos += n;
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        if self.fixed {
            // Header and block map went out first; the stream (or file) is padded to the
            // full length by the commit.
            return Ok(());
        }
        let end = self.write_metadata()?;
        self.file.set_len(end)
    }
}
