//! The VHDX reader: the block mapping, over what `open.rs` opened and checked.
//!
//! How payload block states map (§2.5.1.1):
//!
//! | state | dynamic / fixed | differencing |
//! |---|---|---|
//! | 0 not present | unallocated (reads zeros) | unallocated (the parent's data) |
//! | 1 undefined, 3 unmapped, 5 (v0.95 unmapped) | unallocated (zeros) | zero |
//! | 2 zero | zero | zero |
//! | 6 fully present | data | data |
//! | 7 partially present | invalid | per sector: data where the sector bitmap bit is 1, else the parent's data |
//!
//! State 4 is reserved and refused. qemu reads states 0, 1, 2, 3 and 5 of dynamic and
//! fixed images as zeros; vimg reads the same bytes and reports states other than "zero" as
//! unallocated so `map` shows what the file really stores (qemu-img map shows every vhdx as
//! one data run). Holes of the host file inside an allocated block (sparse data written
//! into a fresh block) map as zero, so they are neither read nor copied.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::error::VhdxError;
use super::geometry::Geometry;
use super::header::*;
use super::open::guid_text;
use crate::check::CheckReport;
use crate::error::Result;
use crate::formats::Format;
use crate::mapping::{
    BackingRef, Extent, ExternalRef, FileId, GuestOffset, HostOffset, ImageReader, MapKind,
};
use crate::storage::{read_exact, Storage};

/// Sector bitmaps of partially present blocks kept in memory (each at most 64 KiB).
const BITMAP_CACHE_BLOCKS: usize = 32;

/// Everything `open` learned about the image.
#[derive(Clone, Debug)]
pub struct Parsed {
    /// The creator string of the file identifier.
    pub creator: String,
    /// The current header.
    pub header: Header,
    /// Which header is current (1 or 2).
    pub header_index: u8,
    /// The BAT region.
    pub bat_region: RegionEntry,
    /// The metadata region.
    pub metadata_region: RegionEntry,
    /// File parameters.
    pub params: FileParameters,
    /// Physical sector size.
    pub physical_sector: u32,
    /// The page 83 (virtual disk) identifier.
    pub page83: Guid,
    /// The parent locator of a differencing image.
    pub parent: Option<ParentLocator>,
    /// Block layout.
    pub geometry: Geometry,
}

/// How one payload block reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Block {
    Data(u64),
    Partial(u64),
    Zero,
    Unallocated,
}

/// Reads a VHDX image.
pub struct VhdxReader {
    pub(super) storage: Arc<dyn Storage>,
    /// What `FileId(0)` reads: the file, or the file with the log replayed over it.
    pub(super) view: Arc<dyn Storage>,
    pub(super) parsed: Parsed,
    pub(super) bat: Vec<u64>,
    pub(super) backing: Option<BackingRef>,
    pub(super) refs: Vec<ExternalRef>,
    pub(super) warnings: Vec<String>,
    /// The log holds an active sequence (replayed in memory only).
    pub(super) log_pending: bool,
    pub(super) bitmaps: Mutex<VecDeque<(u64, Arc<[u8]>)>>,
}

impl std::fmt::Debug for VhdxReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhdxReader")
            .field("parsed", &self.parsed)
            .finish()
    }
}

impl VhdxReader {
    /// What `open` parsed.
    pub fn parsed(&self) -> &Parsed {
        &self.parsed
    }

    fn classify(&self, block: u64) -> Result<Block> {
        let g = &self.parsed.geometry;
        let idx = g.payload_entry(block);
        let e = BatEntry(self.bat.get(idx as usize).copied().unwrap_or(0));
        Ok(match e.state() {
            PAYLOAD_FULLY_PRESENT => Block::Data(e.file_offset()),
            PAYLOAD_PARTIALLY_PRESENT if g.differencing => Block::Partial(e.file_offset()),
            PAYLOAD_NOT_PRESENT => Block::Unallocated,
            PAYLOAD_ZERO => Block::Zero,
            PAYLOAD_UNDEFINED | PAYLOAD_UNMAPPED | PAYLOAD_UNMAPPED_V095 => {
                if g.differencing {
                    Block::Zero
                } else {
                    Block::Unallocated
                }
            }
            s => {
                // `open` refuses these; a second line of defence.
                return Err(VhdxError::BatEntry {
                    index: idx,
                    offset: self.parsed.bat_region.file_offset + idx * 8,
                    value: e.0,
                    reason: format!("state {s} is not valid here"),
                }
                .into());
            }
        })
    }

    /// Shortens a data run at the first hole of the host file, and reports a hole as zeros:
    /// an allocated block is mostly holes when the data written to it was sparse, and
    /// reading holes costs as much as reading data.
    fn trim_at_holes(&self, kind: MapKind, pos: u64, run_end: u64) -> Result<(MapKind, u64)> {
        let e = Extent {
            start: GuestOffset(pos),
            len: run_end - pos,
            kind,
        };
        let e = crate::mapping::trim_at_holes(&*self.view, e)?;
        Ok((e.kind, e.end()))
    }

    /// The sector bitmap bits of payload block `block` (one bit per logical sector).
    fn block_bitmap(&self, block: u64) -> Result<Arc<[u8]>> {
        if let Ok(cache) = self.bitmaps.lock() {
            if let Some((_, b)) = cache.iter().find(|(k, _)| *k == block) {
                return Ok(b.clone());
            }
        }
        let g = &self.parsed.geometry;
        let chunk = block / g.chunk_ratio;
        let sb = BatEntry(
            self.bat
                .get(g.bitmap_entry(chunk) as usize)
                .copied()
                .unwrap_or(0),
        );
        let spb = g.sectors_per_block();
        let first_bit = (block % g.chunk_ratio) * spb;
        let mut bits = vec![0u8; (spb / 8) as usize];
        read_exact(
            &*self.view,
            &mut bits,
            sb.file_offset() + first_bit / 8,
            format_args!("VHDX sector bitmap of block {block}"),
        )?;
        let bits: Arc<[u8]> = bits.into();
        if let Ok(mut cache) = self.bitmaps.lock() {
            if cache.len() >= BITMAP_CACHE_BLOCKS {
                cache.pop_front();
            }
            cache.push_back((block, bits.clone()));
        }
        Ok(bits)
    }
}
impl ImageReader for VhdxReader {
    fn format(&self) -> Format {
        Format::Vhdx
    }

    fn virtual_size(&self) -> u64 {
        self.parsed.geometry.virtual_size
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.parsed.geometry.block_size)
    }

    fn map(&self, offset: GuestOffset, max_len: u64) -> Result<Extent> {
        let g = &self.parsed.geometry;
        let (pos, end) = crate::mapping::map_range(offset, max_len, g.virtual_size)?;
        let bs = g.block_size;
        let block = pos / bs;
        let within = pos % bs;
        let first = self.classify(block)?;
        let block_end = ((block + 1) * bs).min(end);
        let (kind, run_end) = match first {
            Block::Partial(off) => {
                let ls = g.logical_sector;
                let bits = self.block_bitmap(block)?;
                let bit = |s: u64| bits[(s / 8) as usize] >> (s % 8) & 1;
                let s0 = within / ls;
                let v = bit(s0);
                let spb = g.sectors_per_block();
                let mut s = s0 + 1;
                while s < spb && (s * ls) < block_end - block * bs && bit(s) == v {
                    s += 1;
                }
                let run_end = (block * bs + s * ls).min(block_end);
                let kind = if v == 1 {
                    MapKind::Data {
                        file: FileId(0),
                        offset: HostOffset(off + within),
                    }
                } else {
                    MapKind::Unallocated
                };
                (kind, run_end)
            }
            _ => {
                // Extend over following blocks that read the same way (contiguous on disk
                // for data).
                let mut b = block + 1;
                let mut run_end = block_end;
                while run_end < end {
                    let next = self.classify(b)?;
                    let same = match (first, next) {
                        (Block::Data(o1), Block::Data(o2)) => o2 == o1 + (b - block) * bs,
                        (x, y) => x == y,
                    };
                    if !same {
                        break;
                    }
                    b += 1;
                    run_end = (b * bs).min(end);
                }
                let kind = match first {
                    Block::Data(off) => MapKind::Data {
                        file: FileId(0),
                        offset: HostOffset(off + within),
                    },
                    Block::Zero => MapKind::Zero,
                    _ => MapKind::Unallocated,
                };
                (kind, run_end)
            }
        };
        let (kind, run_end) = self.trim_at_holes(kind, pos, run_end)?;
        Ok(Extent {
            start: offset,
            len: run_end - pos,
            kind,
        })
    }

    fn file(&self, id: FileId) -> Option<&Arc<dyn Storage>> {
        (id.0 == 0).then_some(&self.view)
    }

    fn files(&self) -> Vec<Arc<dyn Storage>> {
        vec![self.storage.clone()]
    }

    fn backing(&self) -> Option<&BackingRef> {
        self.backing.as_ref()
    }

    /// The DataWriteGuid of the current header: what a child's `parent_linkage` names.
    fn link_identity(&self, what: &str) -> Option<String> {
        (what == "DataWriteGuid").then(|| guid_text(&self.parsed.header.data_write_guid))
    }

    fn external_refs(&self) -> Vec<ExternalRef> {
        self.refs.clone()
    }

    fn warnings(&self) -> Vec<String> {
        self.warnings.clone()
    }

    /// `open` has already checked every table (qemu's check does the same BAT walk); what is
    /// left to say is whether a log needed replay.
    fn check(&self) -> Result<CheckReport> {
        // Every BAT entry, region and metadata item was verified at open (an image that
        // fails those checks does not open). What remains: the redundant copy of the region
        // table, which open uses only when table 1 is damaged. The two are written together
        // (§2.2.3) and must agree; a damaged or different copy is a corruption, as a
        // disagreeing VHD footer copy or VMDK redundant grain directory is.
        if self.log_pending {
            // qemu-img check opens the image read-only and refuses it with these words;
            // `check -r` replays the log to the file first (update.rs).
            let name = self
                .storage
                .path()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            return Err(crate::error::Error::corrupt(format!(
                "VHDX image file '{name}' opened read-only, but contains a log that needs to be replayed\nTo replay the log, run:\nqemu-img check -r all '{name}'"
            )));
        }
        // A log GUID with no valid entry sequence stays a warning of the open (info,
        // convert): qemu-img check says nothing of it, and neither does this report.
        let mut r = CheckReport::default();
        let mut tables = Vec::new();
        for (i, off) in [(1, REGION_TABLE1_OFFSET), (2, REGION_TABLE2_OFFSET)] {
            let mut buf = vec![0u8; REGION_TABLE_SIZE];
            let parsed = read_exact(&*self.view, &mut buf, off, "VHDX region table")
                .map_err(|e| e.to_string())
                .and_then(|_| RegionTable::parse(&buf).map_err(|e| e.0));
            match parsed {
                Ok(t) => tables.push(t),
                Err(e) => r.corruption(format!(
                    "ERROR VHDX region table {i} at {off:#x} is damaged ({e}); the other copy is used"
                )),
            }
        }
        if let [t1, t2] = tables.as_slice() {
            if t1 != t2 {
                r.corruption("ERROR VHDX region tables 1 and 2 differ; table 1 is used");
            }
        }
        Ok(r)
    }
}
