//! The Bochs reader: validates the header and every catalog entry at open; `map` reads the
//! sector bitmap of the extent it is asked about.

use std::sync::Arc;

use super::error::BochsError;
use super::header::{self, Header, HEADER_SIZE, SECTOR, UNALLOCATED, VERSION_1, VERSION_2};
use crate::error::Result;
use crate::formats::unread::{BOCHS_MAGIC, BOCHS_SUBTYPE, BOCHS_TYPE};
use crate::formats::Format;
use crate::limits;
use crate::mapping::{Extent, FileId, GuestOffset, HostOffset, ImageReader, MapKind};
use crate::storage::{read_exact, Storage};

/// QEMU's limit on catalog entries (enough for bximage's largest image).
pub const MAX_CATALOG: u32 = 0x10_0000;
/// QEMU's limit on the extent size.
pub const MAX_EXTENT: u32 = 0x80_0000;

/// An open Bochs image.
pub struct BochsReader {
    storage: Arc<dyn Storage>,
    header: Header,
    virtual_size: u64,
    extent: u64,
    /// Bytes of bitmap in front of each extent (whole sectors).
    bitmap_bytes: u64,
    data_offset: u64,
    catalog: Vec<u32>,
}

fn field(field: &'static str, at: u64, value: u64, why: impl Into<String>) -> BochsError {
    BochsError::Field {
        field,
        at,
        value,
        why: why.into(),
    }
}

impl BochsReader {
    /// Opens the Bochs image in `storage`.
    pub fn open(storage: Arc<dyn Storage>) -> Result<BochsReader> {
        let len = storage.len();
        if len < HEADER_SIZE as u64 {
            return Err(BochsError::TooShort { len }.into());
        }
        let mut hb = [0u8; HEADER_SIZE];
        read_exact(&*storage, &mut hb, 0, "Bochs header")?;
        let h = Header::parse(&hb)?;
        if !(h.magic.starts_with(BOCHS_MAGIC)
            && h.kind.starts_with(BOCHS_TYPE)
            && h.subtype.starts_with(BOCHS_SUBTYPE))
        {
            return Err(BochsError::Signature(
                "expected a \"Bochs Virtual HD Image\" of type \"Redolog\", subtype \"Growing\""
                    .into(),
            )
            .into());
        }
        if h.version != VERSION_2 && h.version != VERSION_1 {
            return Err(field(
                "version",
                0x40,
                h.version.into(),
                "expected 0x20000 or 0x10000",
            )
            .into());
        }
        if (h.header_size as usize) < HEADER_SIZE {
            return Err(field(
                "header size",
                0x44,
                h.header_size.into(),
                "the catalog would overlap the 512-byte header",
            )
            .into());
        }
        if h.catalog > MAX_CATALOG {
            return Err(field(
                "catalog entries",
                0x48,
                h.catalog.into(),
                "Catalog size is too large",
            )
            .into());
        }
        let extent = h.extent;
        if extent < 512 {
            return Err(field(
                "extent size",
                0x50,
                extent.into(),
                "Extent size must be at least 512",
            )
            .into());
        }
        if !extent.is_power_of_two() {
            return Err(field("extent size", 0x50, extent.into(), "not a power of two").into());
        }
        if extent > MAX_EXTENT {
            return Err(field(
                "extent size",
                0x50,
                extent.into(),
                "too large (QEMU reads at most 0x800000)",
            )
            .into());
        }
        let extent = u64::from(extent);
        let sectors_per_extent = extent / SECTOR;
        if u64::from(h.bitmap) < sectors_per_extent.div_ceil(8) {
            return Err(field(
                "bitmap size",
                0x4c,
                h.bitmap.into(),
                format!(
                    "an extent of {sectors_per_extent} sectors needs {} bytes of bitmap",
                    sectors_per_extent.div_ceil(8)
                ),
            )
            .into());
        }
        let bitmap_bytes = u64::from(h.bitmap).div_ceil(SECTOR) * SECTOR;
        let total_sectors = h.disk / SECTOR;
        let virtual_size = total_sectors * SECTOR;
        let at_disk = if h.version == VERSION_1 { 0x54 } else { 0x58 };
        if total_sectors.div_ceil(sectors_per_extent) > u64::from(h.catalog) {
            return Err(field(
                "disk size",
                at_disk,
                h.disk,
                format!(
                    "Catalog size is too small for this disk size ({} entries)",
                    h.catalog
                ),
            )
            .into());
        }
        let cat_at = u64::from(h.header_size);
        let cat_bytes = u64::from(h.catalog) * 4;
        if cat_at + cat_bytes > len {
            return Err(BochsError::CatalogPastEof {
                at: cat_at,
                bytes: cat_bytes,
                len,
            }
            .into());
        }
        let n = limits::check_table_bytes("Bochs catalog", cat_bytes)?;
        let mut raw = vec![0u8; n];
        read_exact(&*storage, &mut raw, cat_at, "Bochs catalog")?;
        let catalog = header::parse_catalog(&raw, h.catalog as usize);
        drop(raw);
        let data_offset = cat_at + cat_bytes;
        let stride = bitmap_bytes + extent;
        // Entries inside the file fit in this many extents: one bit each for duplicates.
        let slots = (len - data_offset) / stride;
        let mut seen = vec![0u64; (slots as usize).div_ceil(64)];
        for (i, &v) in catalog.iter().enumerate() {
            if v == UNALLOCATED {
                continue;
            }
            let start = data_offset + u64::from(v) * stride;
            let end = start + stride;
            if end > len {
                return Err(BochsError::EntryPastEof {
                    index: i as u32,
                    at: cat_at + 4 * i as u64,
                    value: v,
                    start,
                    end,
                    len,
                }
                .into());
            }
            let (word, bit) = ((v / 64) as usize, v % 64);
            if let Some(w) = seen.get_mut(word) {
                if *w & (1 << bit) != 0 {
                    let other = catalog.iter().position(|x| *x == v).unwrap_or(i) as u32;
                    return Err(BochsError::EntryDuplicate {
                        index: i as u32,
                        other,
                        value: v,
                    }
                    .into());
                }
                *w |= 1 << bit;
            }
        }
        Ok(BochsReader {
            storage,
            header: h,
            virtual_size,
            extent,
            bitmap_bytes,
            data_offset,
            catalog,
        })
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    fn entry(&self, index: u64) -> u32 {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.catalog.get(i))
            .copied()
            .unwrap_or(UNALLOCATED)
    }
}

impl ImageReader for BochsReader {
    fn reports_allocation(&self) -> bool {
        // qemu's driver has no block status: qemu-img maps everything as data.
        false
    }

    fn format(&self) -> Format {
        Format::Bochs
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn map(&self, offset: GuestOffset, max_len: u64) -> Result<Extent> {
        let (pos, end) = crate::mapping::map_range(offset, max_len, self.virtual_size)?;
        let ext = self.extent;
        let index = pos / ext;
        let v = self.entry(index);
        if v == UNALLOCATED {
            // Merge the following unallocated extents.
            let mut i = index;
            let mut cur = ((i + 1) * ext).min(end);
            while cur < end && self.entry(i + 1) == UNALLOCATED {
                i += 1;
                cur = ((i + 1) * ext).min(end);
            }
            return Ok(Extent {
                start: offset,
                len: cur - pos,
                kind: MapKind::Unallocated,
            });
        }
        // One extent at most: its bitmap says sector by sector.
        let stride = self.bitmap_bytes + ext;
        let bitmap_at = self.data_offset + u64::from(v) * stride;
        let stop = ((index + 1) * ext).min(end);
        let first = (pos % ext) / SECTOR;
        let last = (stop - 1) % ext / SECTOR;
        let mut bits = vec![0u8; (last / 8 - first / 8 + 1) as usize];
        read_exact(
            &*self.storage,
            &mut bits,
            bitmap_at + first / 8,
            "Bochs sector bitmap",
        )?;
        let bit = |s: u64| bits[(s / 8 - first / 8) as usize] >> (s % 8) & 1 == 1;
        let set = bit(first);
        let mut s = first + 1;
        while s <= last && bit(s) == set {
            s += 1;
        }
        let run_end = (index * ext + s * SECTOR).min(stop);
        let kind = if set {
            MapKind::Data {
                file: FileId(0),
                offset: HostOffset(bitmap_at + self.bitmap_bytes + pos % ext),
            }
        } else {
            MapKind::Unallocated
        };
        Ok(Extent {
            start: offset,
            len: run_end - pos,
            kind,
        })
    }

    fn file(&self, id: FileId) -> Option<&Arc<dyn Storage>> {
        (id.0 == 0).then_some(&self.storage)
    }

    fn files(&self) -> Vec<Arc<dyn Storage>> {
        vec![self.storage.clone()]
    }
}
