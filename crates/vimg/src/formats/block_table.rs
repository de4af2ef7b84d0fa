//! The block table of a BAT-style image being written (vdi's block map, vhd's and vhdx's
//! BAT): one entry per guest block, set the first time data for the block arrives (or for
//! every block at creation, in fixed images), and the per-block loops of `allocate`, `write`
//! and `write_zeroes`, which cut a guest range at block boundaries. A format says how its
//! entries are spelled and where a block's data lies ([`Placement`]); the table holds no
//! format's bytes and writes only data.
//!
//! Blocks are placed in the order they are first asked for: the engine allocates in guest
//! order, so the layout does not depend on thread timing. One short lock covers the entry
//! update; data is written outside it.

use std::sync::{Mutex, MutexGuard};

use crate::error::{Error, ErrorKind, Result};
use crate::output::OutFile;

/// How one format spells its entries.
pub(crate) trait Placement: Send + Sync {
    /// The entry of a block that holds no data.
    const UNUSED: u32;
    /// The entry for `block`, the `nth` block placed (counting from 0).
    fn place(&self, block: u64, nth: u64) -> Result<u32>;
    /// File offset of the data of a block whose entry is `entry`.
    fn data_offset(&self, entry: u32) -> u64;
    /// Called once a block is placed, outside the lock, before its data is written
    /// (vhd writes the block's sector bitmap here).
    fn placed(&self, _file: &OutFile, _data_offset: u64) -> Result<()> {
        Ok(())
    }
}

/// The entries and how many blocks were placed.
pub(crate) struct Entries {
    /// One entry per guest block.
    pub entries: Vec<u32>,
    /// Blocks placed so far (fixed images count every block).
    pub placed: u64,
}

/// The block table of an image being written.
pub(crate) struct BlockTable<P> {
    /// The format's name in messages ("VDI", "VHD", "VHDX").
    what: &'static str,
    /// Guest size in bytes.
    size: u64,
    block_size: u64,
    placement: P,
    state: Mutex<Entries>,
}

impl<P: Placement> BlockTable<P> {
    /// A table of `entries` (of which `placed` are placed) for a guest of `size` bytes.
    pub fn new(
        what: &'static str,
        size: u64,
        block_size: u64,
        placement: P,
        entries: Vec<u32>,
        placed: u64,
    ) -> Self {
        BlockTable {
            what,
            size,
            block_size,
            placement,
            state: Mutex::new(Entries { entries, placed }),
        }
    }

    /// The format's placement rules.
    pub fn placement(&self) -> &P {
        &self.placement
    }

    /// The entries, under the lock.
    pub fn lock(&self) -> Result<MutexGuard<'_, Entries>> {
        self.state
            .lock()
            .map_err(|_| Error::msg(ErrorKind::Io, format!("{} writer lock poisoned", self.what)))
    }

    /// The end of `[offset, offset + len)`, which must lie inside the guest.
    pub fn check(&self, offset: u64, len: u64) -> Result<u64> {
        offset
            .checked_add(len)
            .filter(|e| *e <= self.size)
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "write of {len} bytes at {offset:#x} past the end of the {} ({:#x} bytes)",
                    self.what, self.size
                ))
            })
    }

    /// The end of `[offset, offset + len)` cut at the guest's end; `offset` must lie inside.
    pub fn clamp(&self, offset: u64, len: u64) -> Result<u64> {
        Ok(self.check(offset, 0)?.saturating_add(len).min(self.size))
    }

    /// File offset of `block`'s data, placing the block when `allocate`; `None` when it
    /// holds no data and `allocate` is false.
    pub fn block(&self, file: &OutFile, block: u64, allocate: bool) -> Result<Option<u64>> {
        let (entry, fresh) = {
            let mut a = self.lock()?;
            let entry = usize::try_from(block)
                .ok()
                .and_then(|i| a.entries.get(i).copied())
                .ok_or_else(|| {
                    Error::invalid_argument(format!(
                        "block {block} is past the end of the {}",
                        self.what
                    ))
                })?;
            if entry != P::UNUSED {
                (entry, false)
            } else if !allocate {
                return Ok(None);
            } else {
                let entry = self.placement.place(block, a.placed)?;
                a.entries[block as usize] = entry;
                a.placed += 1;
                (entry, true)
            }
        };
        let at = self.placement.data_offset(entry);
        if fresh {
            self.placement.placed(file, at)?;
        }
        Ok(Some(at))
    }

    /// Places every block that `[offset, end)` touches.
    pub fn allocate(&self, file: &OutFile, offset: u64, end: u64) -> Result<()> {
        let bs = self.block_size;
        let mut block = offset / bs;
        while block * bs < end {
            self.block(file, block, true)?;
            block += 1;
        }
        Ok(())
    }

    /// Writes `data` at guest `offset`, block by block, placing blocks as needed.
    pub fn write(&self, file: &OutFile, offset: u64, data: &[u8]) -> Result<()> {
        let end = self.check(offset, data.len() as u64)?;
        self.each_block(offset, end, |block, pos, within, n| {
            let Some(host) = self.block(file, block, true)? else {
                return Ok(());
            };
            let from = (pos - offset) as usize;
            file.write_all_at(&data[from..from + n as usize], host + within)
        })
    }

    /// Zeroes `[offset, end)` where blocks hold data; blocks without data read as zero
    /// already and stay unplaced.
    pub fn write_zeroes(&self, file: &OutFile, offset: u64, end: u64) -> Result<()> {
        self.each_block(offset, end, |block, _, within, n| {
            match self.block(file, block, false)? {
                Some(host) => file.zero_range(host + within, n),
                None => Ok(()),
            }
        })
    }

    /// Calls `f(block, pos, offset in block, len)` for each piece of `[offset, end)` cut
    /// at block boundaries.
    fn each_block(
        &self,
        offset: u64,
        end: u64,
        mut f: impl FnMut(u64, u64, u64, u64) -> Result<()>,
    ) -> Result<()> {
        let bs = self.block_size;
        let mut pos = offset;
        while pos < end {
            let within = pos % bs;
            let n = (bs - within).min(end - pos);
            f(pos / bs, pos, within, n)?;
            pos += n;
        }
        Ok(())
    }
}
