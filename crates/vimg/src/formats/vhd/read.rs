//! The VHD reader: answers `map` from the BAT and the sector bitmaps that `open.rs` checked.

use std::sync::{Arc, Mutex};

use super::header::{DynHeader, Footer, SectorBitmap, BAT_UNUSED, FOOTER_SIZE, SECTOR};
use crate::check::CheckReport;
use crate::error::Result;
use crate::formats::Format;
use crate::mapping::{
    BackingRef, Extent, ExternalRef, FileId, GuestOffset, HostOffset, ImageReader, MapKind,
};
use crate::storage::{read_exact, Storage};

/// Bytes of sector bitmaps cached per open image.
const BITMAP_CACHE_BYTES: u64 = 4 << 20;

/// Which kind of VHD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskKind {
    /// Data then footer.
    Fixed,
    /// Blocks through the BAT; unallocated reads as zero.
    Dynamic,
    /// Blocks through the BAT; unallocated comes from the parent.
    Differencing,
}

/// The dynamic part of an open image.
pub(super) struct Dynamic {
    /// First byte past the header and the BAT (sector-rounded).
    pub(super) metadata_end: u64,
    pub(super) header: DynHeader,
    pub(super) bat: Vec<u32>,
    pub(super) block_size: u64,
    pub(super) block_shift: u32,
    pub(super) bitmap_size: u64,
    pub(super) cache: BitmapCache,
}

/// One cache slot: the block whose bitmap it holds, and the bitmap.
type Slot = Mutex<Option<(u32, Arc<SectorBitmap>)>>;

/// A small direct-mapped cache of sector bitmaps, bounded in bytes.
pub(super) struct BitmapCache {
    pub(super) slots: Vec<Slot>,
}

impl BitmapCache {
    pub(super) fn new(bitmap_bytes: u64) -> BitmapCache {
        let n = (BITMAP_CACHE_BYTES / bitmap_bytes.max(1)).clamp(1, 1024) as usize;
        BitmapCache {
            slots: (0..n).map(|_| Mutex::new(None)).collect(),
        }
    }

    fn slot(&self, block: u32) -> Option<&Slot> {
        self.slots.get(block as usize % self.slots.len().max(1))
    }

    fn get(&self, block: u32) -> Option<Arc<SectorBitmap>> {
        let slot = self.slot(block)?.lock().ok()?;
        match &*slot {
            Some((b, bm)) if *b == block => Some(bm.clone()),
            _ => None,
        }
    }

    fn put(&self, block: u32, bm: Arc<SectorBitmap>) {
        if let Some(Ok(mut slot)) = self.slot(block).map(|s| s.lock()) {
            *slot = Some((block, bm));
        }
    }
}

/// An open VHD.
pub struct VhdReader {
    pub(super) storage: Arc<dyn Storage>,
    pub(super) footer: Footer,
    pub(super) footer_offset: u64,
    pub(super) kind: DiskKind,
    pub(super) virtual_size: u64,
    pub(super) dynamic: Option<Dynamic>,
    pub(super) backing: Option<BackingRef>,
    pub(super) refs: Vec<ExternalRef>,
    pub(super) warnings: Vec<String>,
}

impl VhdReader {
    /// The footer in use.
    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    /// Where the footer in use was read (the end of the file, or 0 when only the copy at
    /// the start was valid).
    pub fn footer_offset(&self) -> u64 {
        self.footer_offset
    }

    /// Fixed, dynamic or differencing.
    pub fn kind(&self) -> DiskKind {
        self.kind
    }

    /// The dynamic disk header, for dynamic and differencing disks.
    pub fn dyn_header(&self) -> Option<&DynHeader> {
        self.dynamic.as_ref().map(|d| &d.header)
    }

    fn bitmap(&self, d: &Dynamic, block: u32, entry: u32) -> Result<Arc<SectorBitmap>> {
        if let Some(b) = d.cache.get(block) {
            return Ok(b);
        }
        let sectors = d.block_size / SECTOR;
        let mut buf = vec![0u8; sectors.div_ceil(8) as usize];
        read_exact(
            &*self.storage,
            &mut buf,
            u64::from(entry) * SECTOR,
            format_args!("sector bitmap of VHD block {block}"),
        )?;
        let bm = Arc::new(SectorBitmap::parse(&buf, sectors)?);
        d.cache.put(block, bm.clone());
        Ok(bm)
    }

    fn map_fixed(&self, pos: u64, end: u64) -> Result<Extent> {
        // A hole in a fixed disk is zeros: the disk has no parent to show through.
        let e = Extent {
            start: GuestOffset(pos),
            len: end - pos,
            kind: MapKind::Data {
                file: FileId(0),
                offset: HostOffset(pos),
            },
        };
        crate::mapping::trim_at_holes(&*self.storage, e)
    }

    fn map_dynamic(&self, d: &Dynamic, pos: u64, end: u64) -> Result<Extent> {
        let mut cur = pos;
        let mut first: Option<MapKind> = None;
        while cur < end {
            let block = cur >> d.block_shift;
            let block_start = block << d.block_shift;
            let block_end = (block_start + d.block_size).min(end);
            let in_block = cur - block_start;
            let entry = usize::try_from(block)
                .ok()
                .and_then(|b| d.bat.get(b))
                .copied()
                .unwrap_or(BAT_UNUSED);
            let (kind, run_end) = if entry == BAT_UNUSED {
                (MapKind::Unallocated, block_end)
            } else {
                // validate_bat() proved the block lies inside the file.
                let bm = self.bitmap(d, block as u32, entry)?;
                let data = MapKind::Data {
                    file: FileId(0),
                    offset: HostOffset(u64::from(entry) * SECTOR + d.bitmap_size + in_block),
                };
                if bm.is_full() {
                    (data, block_end)
                } else {
                    let sector = in_block / SECTOR;
                    let (set, n) = bm.run(sector);
                    let run_end = (block_start + (sector + n) * SECTOR).min(block_end);
                    (
                        if set { data } else { MapKind::Unallocated },
                        run_end.max(cur + 1),
                    )
                }
            };
            match first {
                None => first = Some(kind),
                Some(MapKind::Unallocated) if kind == MapKind::Unallocated => {}
                Some(_) => break,
            }
            cur = run_end;
            // Data never continues into the next block: its bitmap sits in between.
            if kind != MapKind::Unallocated || run_end < block_end.min(end) {
                break;
            }
        }
        let e = Extent {
            start: GuestOffset(pos),
            len: cur - pos,
            kind: first.unwrap_or(MapKind::Unallocated),
        };
        crate::mapping::trim_at_holes(&*self.storage, e)
    }
}

impl ImageReader for VhdReader {
    fn format(&self) -> Format {
        Format::Vpc
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn cluster_size(&self) -> Option<u64> {
        // qemu-img reports the block size for dynamic and differencing disks, none for fixed.
        self.dynamic.as_ref().map(|d| d.block_size)
    }

    fn map(&self, offset: GuestOffset, max_len: u64) -> Result<Extent> {
        let (pos, end) = crate::mapping::map_range(offset, max_len, self.virtual_size)?;
        match &self.dynamic {
            None => self.map_fixed(pos, end),
            Some(d) => self.map_dynamic(d, pos, end),
        }
    }

    fn file(&self, id: FileId) -> Option<&Arc<dyn Storage>> {
        (id.0 == 0).then_some(&self.storage)
    }

    fn files(&self) -> Vec<Arc<dyn Storage>> {
        vec![self.storage.clone()]
    }

    fn backing(&self) -> Option<&BackingRef> {
        self.backing.as_ref()
    }

    fn external_refs(&self) -> Vec<ExternalRef> {
        self.refs.clone()
    }

    fn warnings(&self) -> Vec<String> {
        self.warnings.clone()
    }

    fn check(&self) -> Result<CheckReport> {
        // Structural errors (bad checksums, entries past the end of the file, into metadata
        // or onto one another) already fail at open. What remains worth reporting: the two
        // footer copies disagreeing, and the allocation statistics qemu-img prints.
        let mut r = CheckReport::default();
        for w in &self.warnings {
            r.corruption(format!("ERROR {w}"));
        }
        let Some(d) = &self.dynamic else {
            return Ok(r);
        };
        let blocks = self.virtual_size.div_ceil(d.block_size);
        let slot = d.block_size + d.bitmap_size;
        let mut allocated = 0u64;
        let mut fragmented = 0u64;
        let mut prev: Option<u64> = None;
        let mut end = d.metadata_end;
        for &v in d.bat.iter().take(blocks as usize) {
            if v == BAT_UNUSED {
                continue;
            }
            allocated += 1;
            let start = u64::from(v) * SECTOR;
            if prev.is_some_and(|p| p + slot != start) {
                fragmented += 1;
            }
            prev = Some(start);
            end = end.max(start + slot);
        }
        r.total_clusters = Some(blocks);
        r.allocated_clusters = Some(allocated);
        r.fragmented_clusters = Some(fragmented);
        r.compressed_clusters = Some(0);
        // The footer follows the last block.
        r.image_end_offset = Some(end + FOOTER_SIZE as u64);
        Ok(r)
    }
}
