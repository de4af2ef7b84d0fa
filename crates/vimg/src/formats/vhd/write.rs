//! The VHD writers: fixed (data at its guest offset, then the footer) and dynamic (blocks
//! appended as data arrives, BAT and headers at `finish`). Both lay the file out exactly as
//! `qemu-img create -f vpc` does, and fill the footer as qemu does (creator "qemu", or
//! "qem2" with `force_size=on`, so that every reader that keys the size rule on the creator
//! application sizes the image as intended).

use std::time::{SystemTime, UNIX_EPOCH};

use super::error::VhdError;
use super::geometry::Chs;
use super::header::{
    bitmap_size, write_bat, DynHeader, Footer, ParentLocator, SectorBitmap, BAT_UNUSED,
    DISK_TYPE_DYNAMIC, DISK_TYPE_FIXED, DYN_COOKIE, DYN_HEADER_SIZE, FEATURE_RESERVED,
    FOOTER_COOKIE, FOOTER_SIZE, LOCATOR_COUNT, NO_DATA_OFFSET, SECTOR, VERSION_1_0, VHD_EPOCH,
};
use crate::error::{Error, Result};
use crate::formats::block_table::{BlockTable, Placement};
use crate::output::OutFile;
use crate::writer::{EncodedUnit, ImageWriter, WriterCaps};

/// Block size of the dynamic disks vimg writes (qemu's and Hyper-V's default, 2 MiB).
pub const BLOCK_SIZE: u64 = 2 << 20;

/// Offset of the BAT in the dynamic disks vimg writes: after the footer copy and the header.
pub const BAT_OFFSET: u64 = (FOOTER_SIZE + DYN_HEADER_SIZE) as u64;

/// Bytes of BAT (rounded to sectors) for a disk of `size` bytes with 2 MiB blocks.
pub fn bat_bytes(size: u64) -> u64 {
    (size.div_ceil(BLOCK_SIZE) * 4).div_ceil(SECTOR) * SECTOR
}

/// The footer of a new image.
pub fn new_footer(size: u64, chs: Chs, disk_type: u32, force_size: bool) -> Footer {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(VHD_EPOCH);
    let mut f = Footer {
        cookie: FOOTER_COOKIE,
        features: FEATURE_RESERVED,
        version: VERSION_1_0,
        data_offset: if disk_type == DISK_TYPE_FIXED {
            NO_DATA_OFFSET
        } else {
            FOOTER_SIZE as u64
        },
        timestamp: now.saturating_sub(VHD_EPOCH).min(u64::from(u32::MAX)) as u32,
        // qemu's spellings: "qem2" tells qemu (and vimg) to trust current_size.
        creator_app: if force_size { *b"qem2" } else { *b"qemu" },
        // Virtual PC 2007's version, as qemu writes it.
        creator_version: 0x0005_0003,
        creator_os: *b"Wi2k",
        original_size: size,
        current_size: size,
        cylinders: chs.cylinders,
        heads: chs.heads,
        sectors_per_track: chs.sectors_per_track,
        disk_type,
        checksum: 0,
        uuid: *uuid::Uuid::new_v4().as_bytes(),
        saved_state: 0,
        reserved: [0; 427],
    };
    f.seal();
    f
}

fn check_write(offset: u64, len: usize, size: u64) -> Result<u64> {
    offset
        .checked_add(len as u64)
        .filter(|e| *e <= size)
        .ok_or_else(|| {
            Error::invalid_argument(format!(
                "write of {len} bytes at {offset:#x} past the end of the VHD ({size:#x} bytes)"
            ))
        })
}

/// Writes a fixed VHD: the guest's bytes at their own offsets, then the footer. Works on a
/// stream (stdout) by asking for ascending order.
pub struct FixedWriter {
    file: OutFile,
    size: u64,
    footer: Footer,
}

impl FixedWriter {
    /// A fixed VHD of `size` bytes (already rounded) with geometry `chs`, into `file`.
    pub fn new(file: OutFile, size: u64, chs: Chs, force_size: bool) -> Result<FixedWriter> {
        let footer = new_footer(size, chs, DISK_TYPE_FIXED, force_size);
        let total = size
            .checked_add(FOOTER_SIZE as u64)
            .ok_or_else(|| VhdError::Option(format!("size {size} is too large")))?;
        file.set_len(total)?;
        Ok(FixedWriter { file, size, footer })
    }
}

impl ImageWriter for FixedWriter {
    fn caps(&self) -> WriterCaps {
        WriterCaps {
            unit: SECTOR,
            ordered: self.file.is_stream(),
            encodes: false,
        }
    }

    /// Every byte has its fixed place: nothing to allocate, writes may run in any order.
    fn allocate(&self, _offset: u64, _len: u64) -> Result<bool> {
        Ok(true)
    }

    fn write(&self, offset: u64, data: &[u8], _encoded: &[EncodedUnit]) -> Result<()> {
        check_write(offset, data.len(), self.size)?;
        self.file.write_all_at(data, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        check_write(offset, 0, self.size)?;
        if self.file.is_stream() {
            // A stream reads as zero where nothing was written.
            return Ok(());
        }
        self.file.zero_range(offset, len.min(self.size - offset))
    }

    fn finish(self: Box<Self>) -> Result<()> {
        self.file.write_all_at(&self.footer.to_bytes(), self.size)
    }
}

/// BAT entries: the sector of the block's bitmap; blocks are appended after the BAT, each
/// a sector bitmap (every bit set, as qemu writes it) followed by the data.
struct VhdPlacement {
    /// First sector after the BAT.
    first: u64,
    bitmap: Vec<u8>,
}

impl VhdPlacement {
    /// Sectors one block takes in the file: bitmap and data.
    fn slot(&self) -> u64 {
        (BLOCK_SIZE + self.bitmap.len() as u64) / SECTOR
    }
}

impl Placement for VhdPlacement {
    const UNUSED: u32 = BAT_UNUSED;

    fn place(&self, _block: u64, nth: u64) -> Result<u32> {
        nth.checked_mul(self.slot())
            .and_then(|s| s.checked_add(self.first))
            .and_then(|s| u32::try_from(s).ok())
            .filter(|v| *v != BAT_UNUSED)
            .ok_or_else(|| Error::unsupported("the VHD grew past what a BAT entry can address"))
    }

    fn data_offset(&self, entry: u32) -> u64 {
        u64::from(entry) * SECTOR + self.bitmap.len() as u64
    }

    fn placed(&self, file: &OutFile, data_offset: u64) -> Result<()> {
        file.write_all_at(&self.bitmap, data_offset - self.bitmap.len() as u64)
    }
}

/// Writes a dynamic VHD. Blocks are placed in the order their first data arrives (any
/// order, from many threads: the lock covers only the BAT update); each block's bitmap has
/// every sector set, as qemu writes it. The BAT, the header and both footers are written
/// at `finish`.
pub struct DynamicWriter {
    file: OutFile,
    size: u64,
    footer: Footer,
    table: BlockTable<VhdPlacement>,
}

impl DynamicWriter {
    /// A dynamic VHD of `size` bytes (already rounded) with geometry `chs`, into `file`.
    pub fn new(file: OutFile, size: u64, chs: Chs, force_size: bool) -> Result<DynamicWriter> {
        if file.is_stream() {
            return Err(Error::unsupported(
                "a dynamic VHD keeps its block table in front of the data and cannot be written to a stream; use subformat=fixed",
            ));
        }
        let footer = new_footer(size, chs, DISK_TYPE_DYNAMIC, force_size);
        let blocks = size.div_ceil(BLOCK_SIZE);
        let bat = vec![
            BAT_UNUSED;
            usize::try_from(blocks)
                .map_err(|_| VhdError::Option(format!("size {size} is too large")))?
        ];
        let first = BAT_OFFSET + bat_bytes(size);
        let mut bitmap = vec![0u8; bitmap_size(BLOCK_SIZE) as usize];
        SectorBitmap::all_set(BLOCK_SIZE / SECTOR).write_to(&mut bitmap);
        let placement = VhdPlacement {
            first: first / SECTOR,
            bitmap,
        };
        Ok(DynamicWriter {
            file,
            size,
            footer,
            table: BlockTable::new("VHD", size, BLOCK_SIZE, placement, bat, 0),
        })
    }
}

impl ImageWriter for DynamicWriter {
    fn caps(&self) -> WriterCaps {
        WriterCaps {
            unit: SECTOR,
            ordered: false,
            encodes: false,
        }
    }

    /// Blocks are placed in the order they are first allocated: the engine calls this in
    /// guest order, so the layout does not depend on thread timing.
    fn allocate(&self, offset: u64, len: u64) -> Result<bool> {
        let end = self.table.clamp(offset, len)?;
        self.table.allocate(&self.file, offset, end)?;
        Ok(true)
    }

    fn write(&self, offset: u64, data: &[u8], _encoded: &[EncodedUnit]) -> Result<()> {
        self.table.write(&self.file, offset, data)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let end = self.table.clamp(offset, len)?;
        self.table.write_zeroes(&self.file, offset, end)
    }

    fn finish(self: Box<Self>) -> Result<()> {
        let a = self.table.lock()?;
        let p = self.table.placement();
        let end = (p.first + a.placed * p.slot()) * SECTOR;
        let footer = self.footer.to_bytes();
        self.file.set_len(end + FOOTER_SIZE as u64)?;
        self.file.write_all_at(&footer, 0)?;
        let mut header = DynHeader {
            cookie: DYN_COOKIE,
            data_offset: NO_DATA_OFFSET,
            table_offset: BAT_OFFSET,
            version: VERSION_1_0,
            max_table_entries: a.entries.len() as u32,
            block_size: BLOCK_SIZE as u32,
            checksum: 0,
            parent_uuid: [0; 16],
            parent_timestamp: 0,
            reserved: 0,
            parent_name: [0; 512],
            locators: [ParentLocator::default(); LOCATOR_COUNT],
            reserved2: [0; 256],
        };
        header.seal();
        self.file
            .write_all_at(&header.to_bytes(), FOOTER_SIZE as u64)?;
        let mut bat = vec![0u8; bat_bytes(self.size) as usize];
        write_bat(&a.entries, &mut bat);
        self.file.write_all_at(&bat, BAT_OFFSET)?;
        self.file.write_all_at(&footer, end)
    }
}
