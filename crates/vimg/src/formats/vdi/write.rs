//! The VDI writer, laid out as `qemu-img create -f vdi` lays it out: the 512-byte header,
//! the block map at 0x200 (padded to sectors), the data blocks from there on.
//!
//! - dynamic (default): blocks are appended in the order their first data arrives, from
//!   any number of threads (a short lock covers the block map update); the block map and
//!   the header, with the allocated count, are written at `finish`.
//! - static (`static=on`): every block is allocated at creation, block `i` at data block
//!   `i`; the header and block map are written first, so the writer also works on a stream
//!   (data in ascending order).

use super::error::VdiError;
use super::header::{
    write_block_map, Header, BLOCK_FREE, BLOCK_SIZE, HEADER_SIZE, HEADER_SIZE_1_1, QEMU_TEXT,
    SECTOR_SIZE, SIGNATURE, TYPE_FIXED, TYPE_NORMAL, VERSION_1_1,
};
use crate::error::{Error, Result};
use crate::formats::block_table::{BlockTable, Placement};
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

/// Block map entries: the index of the block in the data area, in placement order.
struct VdiPlacement {
    offset_data: u64,
}

impl Placement for VdiPlacement {
    const UNUSED: u32 = BLOCK_FREE;

    fn place(&self, _block: u64, nth: u64) -> Result<u32> {
        // nth < blocks_in_image, which fits a u32.
        u32::try_from(nth).map_err(|_| Error::unsupported("too many VDI blocks"))
    }

    fn data_offset(&self, entry: u32) -> u64 {
        self.offset_data + u64::from(entry) * u64::from(BLOCK_SIZE)
    }
}

/// Writes a VDI (dynamic or static).
pub struct VdiWriter {
    file: OutFile,
    fixed: bool,
    header: Header,
    table: BlockTable<VdiPlacement>,
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
        let placement = VdiPlacement {
            offset_data: header.offset_data.into(),
        };
        let placed = if fixed { blocks.into() } else { 0 };
        let w = VdiWriter {
            file,
            fixed,
            header,
            table: BlockTable::new("VDI", size, bs, placement, map, placed),
        };
        if fixed {
            // Everything but the data is known now: write it first, in order.
            w.write_metadata()?;
            w.file
                .set_len(u64::from(w.header.offset_data) + u64::from(blocks) * bs)?;
        }
        Ok(w)
    }

    fn write_metadata(&self) -> Result<u64> {
        let a = self.table.lock()?;
        let mut h = self.header.clone();
        h.blocks_allocated = a.placed as u32;
        self.file.write_all_at(&h.to_bytes(), 0)?;
        let mut bmap = vec![0u8; bmap_bytes(a.entries.len() as u64) as usize];
        write_block_map(&a.entries, &mut bmap);
        self.file.write_all_at(&bmap, BMAP_OFFSET)?;
        Ok(u64::from(h.offset_data) + a.placed * u64::from(BLOCK_SIZE))
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
        let end = self.table.check(offset, len)?;
        self.table.allocate(&self.file, offset, end)?;
        Ok(true)
    }

    fn write(&self, offset: u64, data: &[u8], _encoded: &[EncodedUnit]) -> Result<()> {
        self.table.write(&self.file, offset, data)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let end = self.table.clamp(offset, len)?;
        if self.file.is_stream() {
            return Ok(());
        }
        self.table.write_zeroes(&self.file, offset, end)
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
