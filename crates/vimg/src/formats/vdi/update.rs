//! Guest-data writes into an existing VDI (`commit` into a vdi base, `convert -n`), in the
//! order of QEMU's block/vdi.c `vdi_co_pwritev`, made crash-safe:
//!
//! - a write into an allocated block goes in place;
//! - a block not yet allocated (never written, or discarded) gets the next block of the
//!   data area, index `blocks_allocated` (as QEMU allocates: past every block in use), and
//!   is written whole (the rest zeros, as QEMU writes it; a VDI has no backing file);
//! - at [`VdiUpdate::finish`] the new blocks are flushed, then the header (with the new
//!   allocated-blocks count) and the block map entries that changed are written, then
//!   flushed. With the block map right after the header (0x200, where QEMU and VirtualBox
//!   put it) both go in one write, so a killed process leaves either the old header and map
//!   (the new blocks unreferenced past the last one in use) or the new ones, never a count
//!   that disagrees with the map (`qemu-img check`'s "allocated blocks mismatch"). With the
//!   map elsewhere, the header goes first (QEMU's order): a crash between the two
//!   overstates the count, which never lets a later allocation reuse a block in use.
//!
//! Zero writes leave unallocated blocks alone (they read as zeros already) and write zeros
//! into allocated ones: QEMU's driver has no other way to express zeros either.
//!
//! Refused before anything is written: what the reader refuses (every entry checked), and a
//! header whose allocated count is below a block in use (the next allocation would reuse
//! it) or that leaves no index for a block the write needs.

use super::header::{write_block_map, Header, BLOCK_FREE, BLOCK_SIZE, BLOCK_ZERO, HEADER_SIZE};
use super::read::VdiReader;
use crate::error::{Error, Result};
use crate::formats::inplace_file::UpdateFile;
use crate::image::Image;
use std::path::Path;

/// A VDI open for guest-data writes.
#[derive(Debug)]
pub struct VdiUpdate {
    f: UpdateFile,
    header: Header,
    map: Vec<u32>,
    virtual_size: u64,
    /// Block map entries changed since the last [`VdiUpdate::finish`] (first, last).
    dirty: Option<(usize, usize)>,
}

impl VdiUpdate {
    /// Opens the VDI at `path` read-write; the reader checks it first.
    pub fn open(path: &Path) -> Result<VdiUpdate> {
        let (f, storage) = UpdateFile::open(path)?;
        let r = VdiReader::open(storage)?;
        Ok(VdiUpdate {
            f,
            header: r.header.clone(),
            map: r.map.clone(),
            virtual_size: r.virtual_size,
            dirty: None,
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

    /// The block size (the unit of allocation).
    pub fn block_size(&self) -> u64 {
        u64::from(BLOCK_SIZE)
    }

    /// Checks that blocks can be allocated without reusing one in use.
    pub fn check_writable(&self) -> Result<()> {
        let count = self.header.blocks_allocated;
        if let Some((i, v)) = self
            .map
            .iter()
            .enumerate()
            .find(|(_, v)| **v < BLOCK_ZERO && **v >= count)
        {
            return Err(Error::unsupported(format!(
                "the VDI header counts {count} allocated blocks (at 0x184), but block map entry {i} uses data block {v}; vimg does not write into it (a new block would reuse one in use)"
            )));
        }
        // The next block goes at the end of those counted: past the end of the file, the
        // header would make a small write grow the file by what it claims.
        let next = self.data_at(count);
        let len = self.f.len()?;
        if next > len {
            return Err(Error::unsupported(format!(
                "the next VDI data block would start at {next:#x} (data offset {:#x} at 0x158, {count} blocks allocated at 0x184), past the end of the file ({len:#x} bytes); vimg does not write into it",
                self.header.offset_data
            )));
        }
        Ok(())
    }

    fn data_at(&self, entry: u32) -> u64 {
        u64::from(self.header.offset_data) + u64::from(entry) * u64::from(BLOCK_SIZE)
    }

    fn range(&self, off: u64, len: u64) -> Result<u64> {
        off.checked_add(len)
            .filter(|e| *e <= self.virtual_size)
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "write of {len} bytes at {off:#x} past the end of the VDI ({:#x} bytes)",
                    self.virtual_size
                ))
            })
    }

    /// Writes `data` at guest offset `off`. A new block's other bytes come from `backing`
    /// (none for a VDI qemu opens) or are zeros.
    pub fn write_at(&mut self, off: u64, data: &[u8], backing: Option<&Image>) -> Result<()> {
        let end = self.range(off, data.len() as u64)?;
        let bs = u64::from(BLOCK_SIZE);
        let mut pos = off;
        while pos < end {
            let block = pos / bs;
            let within = pos % bs;
            let n = (bs - within).min(end - pos);
            let piece = &data[(pos - off) as usize..(pos - off + n) as usize];
            let entry = self.map[block as usize];
            if entry < BLOCK_ZERO {
                let at = self.data_at(entry) + within;
                self.f.write_at(piece, at)?;
            } else {
                let index = self.header.blocks_allocated;
                if index >= self.header.blocks_in_image {
                    return Err(Error::unsupported(format!(
                        "the VDI has no free data block left for block {block} (the header counts {index} of {} allocated)",
                        self.header.blocks_in_image
                    )));
                }
                let mut buf = vec![0u8; bs as usize];
                if entry == BLOCK_FREE {
                    if let Some(b) = backing {
                        let start = block * bs;
                        let m = b.virtual_size().saturating_sub(start).min(bs) as usize;
                        if m > 0 {
                            b.read_at(&mut buf[..m], start)?;
                        }
                    }
                }
                buf[within as usize..(within + n) as usize].copy_from_slice(piece);
                let at = self.data_at(index);
                self.f.write_at(&buf, at)?;
                self.header.blocks_allocated = index + 1;
                self.map[block as usize] = index;
                let b = block as usize;
                self.dirty = Some(match self.dirty {
                    None => (b, b),
                    Some((a, z)) => (a.min(b), z.max(b)),
                });
            }
            pos += n;
        }
        Ok(())
    }

    /// Makes `[off, off + len)` read as zeros.
    pub fn write_zeroes(&mut self, off: u64, len: u64) -> Result<()> {
        let end = self.range(off, len)?;
        let bs = u64::from(BLOCK_SIZE);
        let zeros = vec![0u8; bs as usize];
        let mut pos = off;
        while pos < end {
            let within = pos % bs;
            let n = (bs - within).min(end - pos);
            let entry = self.map[(pos / bs) as usize];
            if entry < BLOCK_ZERO {
                let at = self.data_at(entry) + within;
                self.f.write_at(&zeros[..n as usize], at)?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Flushes the data, then writes the header and the changed block map entries (see the
    /// module documentation), then flushes again.
    pub fn finish(&mut self) -> Result<()> {
        let Some((first, last)) = self.dirty else {
            return self.f.sync();
        };
        self.f.sync()?;
        const PER_SECTOR: usize = 512 / 4;
        // With the map right after the header, the write starts at the map's first sector
        // so that header and entries are one write.
        let contiguous = u64::from(self.header.offset_bmap) == HEADER_SIZE as u64;
        let s0 = if contiguous { 0 } else { first / PER_SECTOR };
        let s1 = last / PER_SECTOR + 1;
        let entries = &self.map[s0 * PER_SECTOR..(s1 * PER_SECTOR).min(self.map.len())];
        let mut map_bytes = vec![0u8; (s1 - s0) * 512];
        write_block_map(entries, &mut map_bytes);
        let map_at = u64::from(self.header.offset_bmap) + (s0 * 512) as u64;
        let head = self.header.to_bytes();
        if contiguous {
            let mut both = head.to_vec();
            both.extend_from_slice(&map_bytes);
            self.f.write_at(&both, 0)?;
        } else {
            self.f.write_at(&head, 0)?;
            self.f.write_at(&map_bytes, map_at)?;
        }
        self.f.sync()?;
        self.dirty = None;
        Ok(())
    }
}
