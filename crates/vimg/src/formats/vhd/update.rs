//! Guest-data writes into an existing VHD (`commit` into a vpc base, `convert -n`), in the
//! order of QEMU's block/vpc.c (`vpc_co_pwritev`, `alloc_block`), made crash-safe.
//!
//! - **Fixed** disks: in place (the guest's bytes are the file's first bytes).
//! - **Dynamic** disks: a write into an allocated block goes in place; sectors whose bitmap
//!   bit is clear (they read as zeros) are written whole and their bits set after the data
//!   is flushed (QEMU sets the whole bitmap instead, which would show whatever the clear
//!   sectors hold). A block not yet allocated goes where QEMU puts it, at the end of the
//!   last block the BAT references (or of the BAT): the footer copy at the end moves
//!   behind the new block first (written before the block overwrites the old one, so the
//!   file always ends with a valid footer), then the block is written whole (sector bitmap
//!   all set, as QEMU writes it, and the rest of the block zeros). At
//!   [`VhdUpdate::finish`] the data is flushed, then the changed BAT entries are written
//!   (one write), then flushed: a killed process leaves new blocks that nothing references
//!   yet (QEMU and vimg reuse that space), never an entry pointing at unwritten data.
//! - Zero writes leave unallocated blocks alone (they read as zeros) and write zeros into
//!   allocated ones.
//!
//! Differencing disks are refused (QEMU does not open their parent; vimg reads through it,
//! so a write would have to follow sector bitmaps over a parent it cannot change).

use std::path::Path;

use super::header::{bitmap_size, write_bat, BAT_UNUSED, FOOTER_SIZE, SECTOR};
use super::read::{DiskKind, VhdReader};
use crate::error::{Error, Result};
use crate::formats::inplace_file::UpdateFile;
use crate::image::Image;

/// The dynamic part of a VHD open for writing.
#[derive(Debug)]
struct Dyn {
    bat: Vec<u32>,
    table_offset: u64,
    block_size: u64,
    bitmap_size: u64,
    /// Where the next new block goes (QEMU's `free_data_block_offset`).
    free: u64,
    /// BAT entries changed since the last finish (first, last).
    dirty: Option<(usize, usize)>,
}

/// A VHD open for guest-data writes.
#[derive(Debug)]
pub struct VhdUpdate {
    f: UpdateFile,
    footer: [u8; FOOTER_SIZE],
    virtual_size: u64,
    dynamic: Option<Dyn>,
}

impl VhdUpdate {
    /// Opens the VHD at `path` read-write; the reader checks it first.
    pub fn open(path: &Path) -> Result<VhdUpdate> {
        let (f, storage) = UpdateFile::open(path)?;
        let r = VhdReader::open(storage)?;
        let dynamic = match r.kind {
            DiskKind::Fixed => None,
            DiskKind::Differencing => {
                return Err(Error::unsupported(
                    "vimg does not write guest data into differencing VHD images",
                ))
            }
            DiskKind::Dynamic => {
                let d = r
                    .dynamic
                    .as_ref()
                    .ok_or_else(|| Error::corrupt("a dynamic VHD without its header"))?;
                let slot = d.bitmap_size + d.block_size;
                let mut free = d.metadata_end.div_ceil(SECTOR) * SECTOR;
                for &e in &d.bat {
                    if e != BAT_UNUSED {
                        free = free.max(u64::from(e) * SECTOR + slot);
                    }
                }
                Some(Dyn {
                    bat: d.bat.clone(),
                    table_offset: d.header.table_offset,
                    block_size: d.block_size,
                    bitmap_size: bitmap_size(d.block_size),
                    free,
                    dirty: None,
                })
            }
        };
        Ok(VhdUpdate {
            f,
            footer: r.footer.to_bytes(),
            virtual_size: r.virtual_size,
            dynamic,
        })
    }

    /// The (device, inode) of the file.
    pub fn identity(&self) -> Result<(u64, u64)> {
        self.f.identity()
    }

    /// The virtual size.
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// The block size of a dynamic disk (the unit of allocation); a sector for fixed ones.
    pub fn block_size(&self) -> u64 {
        self.dynamic.as_ref().map_or(SECTOR, |d| d.block_size)
    }

    fn range(&self, off: u64, len: u64) -> Result<u64> {
        off.checked_add(len)
            .filter(|e| *e <= self.virtual_size)
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "write of {len} bytes at {off:#x} past the end of the VHD ({:#x} bytes)",
                    self.virtual_size
                ))
            })
    }

    /// Writes `data` at guest offset `off`; a new block's other bytes come from `backing`
    /// (none for a VHD qemu opens) or are zeros.
    pub fn write_at(&mut self, off: u64, data: &[u8], backing: Option<&Image>) -> Result<()> {
        let end = self.range(off, data.len() as u64)?;
        if self.dynamic.is_none() {
            return self.f.write_at(data, off);
        }
        let bs = self.block_size();
        let mut pos = off;
        while pos < end {
            let block = (pos / bs) as usize;
            let within = pos % bs;
            let n = (bs - within).min(end - pos);
            let piece = &data[(pos - off) as usize..(pos - off + n) as usize];
            self.write_in_block(block, within, piece, backing)?;
            pos += n;
        }
        Ok(())
    }

    fn write_in_block(
        &mut self,
        block: usize,
        within: u64,
        piece: &[u8],
        backing: Option<&Image>,
    ) -> Result<()> {
        let Some(d) = self.dynamic.as_mut() else {
            return Ok(());
        };
        let bs = d.block_size;
        let bmp = d.bitmap_size;
        let entry = d.bat.get(block).copied().unwrap_or(BAT_UNUSED);
        if entry != BAT_UNUSED {
            let start = u64::from(entry) * SECTOR;
            return self.write_allocated(start, within, piece);
        }
        let at = d.free;
        let new_end = at
            .checked_add(bmp + bs)
            .filter(|e| (e / SECTOR) <= u64::from(u32::MAX) && *e < (1u64 << 62))
            .ok_or_else(|| {
                Error::unsupported("the VHD would grow past what its BAT can address")
            })?;
        if backing.is_none() {
            // The footer moves first, so the file keeps ending with one; zeros are written
            // only where the file had bytes (a header's huge block size does not size the
            // work).
            let zero_from = self.f.len()?;
            let footer = self.footer;
            self.f.write_at(&footer, new_end)?;
            self.f.write_at(&vec![0xff; bmp as usize], at)?;
            self.f
                .write_new_unit(at + bmp, bs, within, piece, zero_from)?;
        } else {
            self.write_new_block(at, new_end, within, piece, backing, block)?;
        }
        let Some(d) = self.dynamic.as_mut() else {
            return Ok(());
        };
        if let Some(e) = d.bat.get_mut(block) {
            *e = (at / SECTOR) as u32;
        }
        d.free = new_end;
        d.dirty = Some(match d.dirty {
            None => (block, block),
            Some((a, z)) => (a.min(block), z.max(block)),
        });
        Ok(())
    }

    /// A new block written whole from one buffer, with `backing`'s bytes around `piece`.
    fn write_new_block(
        &mut self,
        at: u64,
        new_end: u64,
        within: u64,
        piece: &[u8],
        backing: Option<&Image>,
        block: usize,
    ) -> Result<()> {
        let (bs, bmp) = self
            .dynamic
            .as_ref()
            .map_or((SECTOR, 0), |d| (d.block_size, d.bitmap_size));
        let mut buf = vec![0u8; (bmp + bs) as usize];
        buf[..bmp as usize].fill(0xff);
        if let Some(b) = backing {
            let g = block as u64 * bs;
            let m = b.virtual_size().saturating_sub(g).min(bs) as usize;
            if m > 0 {
                b.read_at(&mut buf[bmp as usize..bmp as usize + m], g)?;
            }
        }
        let from = (bmp + within) as usize;
        buf[from..from + piece.len()].copy_from_slice(piece);
        // The footer moves first, so the file keeps ending with one.
        let footer = self.footer;
        self.f.write_at(&footer, new_end)?;
        self.f.write_at(&buf, at)
    }

    /// Writes `piece` at `within` of the allocated block at `start` (its bitmap first).
    fn write_allocated(&mut self, start: u64, within: u64, piece: &[u8]) -> Result<()> {
        let Some(d) = self.dynamic.as_ref() else {
            return Ok(());
        };
        let bmp_len = ((d.block_size / SECTOR).div_ceil(8)) as usize;
        let data_at = start + d.bitmap_size;
        let mut bitmap = vec![0u8; bmp_len];
        self.f.read_at(&mut bitmap, start)?;
        let s0 = within / SECTOR;
        let s1 = (within + piece.len() as u64).div_ceil(SECTOR);
        let bit = |b: &[u8], s: u64| b[(s / 8) as usize] & (0x80 >> (s % 8)) != 0;
        if (s0..s1).all(|s| bit(&bitmap, s)) {
            return self.f.write_at(piece, data_at + within);
        }
        // Whole sectors: those with a clear bit read as zeros until now.
        let mut buf = vec![0u8; ((s1 - s0) * SECTOR) as usize];
        for s in s0..s1 {
            if bit(&bitmap, s) {
                let i = ((s - s0) * SECTOR) as usize;
                self.f
                    .read_at(&mut buf[i..i + SECTOR as usize], data_at + s * SECTOR)?;
            }
        }
        let from = (within - s0 * SECTOR) as usize;
        buf[from..from + piece.len()].copy_from_slice(piece);
        self.f.write_at(&buf, data_at + s0 * SECTOR)?;
        self.f.sync()?;
        for s in s0..s1 {
            bitmap[(s / 8) as usize] |= 0x80 >> (s % 8);
        }
        self.f.write_at(&bitmap, start)
    }

    /// Makes `[off, off + len)` read as zeros.
    pub fn write_zeroes(&mut self, off: u64, len: u64) -> Result<()> {
        let end = self.range(off, len)?;
        let bs = self.block_size().max(SECTOR);
        let step = 1u64 << 20;
        let zeros = vec![0u8; step.min(len) as usize];
        let mut pos = off;
        while pos < end {
            let within = pos % bs;
            let n = (bs - within).min(end - pos).min(step);
            let allocated = match &self.dynamic {
                None => true,
                Some(d) => {
                    d.bat
                        .get((pos / bs) as usize)
                        .copied()
                        .unwrap_or(BAT_UNUSED)
                        != BAT_UNUSED
                }
            };
            if allocated {
                self.write_at(pos, &zeros[..n as usize], None)?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Flushes the data, then writes the changed BAT entries and flushes again.
    pub fn finish(&mut self) -> Result<()> {
        self.f.sync()?;
        let Some(d) = self.dynamic.as_mut() else {
            return Ok(());
        };
        let Some((first, last)) = d.dirty.take() else {
            return Ok(());
        };
        let mut bytes = vec![0u8; (last + 1 - first) * 4];
        write_bat(&d.bat[first..=last], &mut bytes);
        let at = d.table_offset + 4 * first as u64;
        self.f.write_at(&bytes, at)?;
        self.f.sync()
    }
}
