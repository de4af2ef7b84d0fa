//! The qcow (version 1) reader: answers `map` from the tables `open.rs` read and checked.

use std::sync::Arc;

use super::header::{Header, COMPRESSED};
use crate::error::Result;
use crate::formats::Format;
use crate::mapping::{
    BackingRef, Codec, Extent, ExternalRef, FileId, GuestOffset, HostOffset, ImageReader, MapKind,
};
use crate::storage::Storage;

/// An open qcow image.
pub struct QcowReader {
    pub(super) storage: Arc<dyn Storage>,
    pub(super) header: Header,
    pub(super) virtual_size: u64,
    pub(super) cluster_bits: u32,
    pub(super) l2_bits: u32,
    /// Per L1 entry: the L2 table, or `None` when unallocated.
    pub(super) l2: Vec<Option<Vec<u64>>>,
    pub(super) backing: Option<BackingRef>,
}

impl QcowReader {
    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// True when L1 entry `i` has an L2 table.
    fn has_table(&self, i: u64) -> bool {
        usize::try_from(i)
            .ok()
            .and_then(|i| self.l2.get(i))
            .is_some_and(Option::is_some)
    }

    fn entry(&self, cluster: u64) -> u64 {
        let i = (cluster >> self.l2_bits) as usize;
        let j = (cluster & ((1 << self.l2_bits) - 1)) as usize;
        match self.l2.get(i) {
            Some(Some(t)) => t.get(j).copied().unwrap_or(0),
            _ => 0,
        }
    }
}

/// A compressed entry's file offset and length.
pub(super) fn compressed(e: u64, cluster_bits: u32) -> (u64, u64) {
    let csize = (e >> (63 - cluster_bits)) & ((1 << cluster_bits) - 1);
    let off = e & ((1u64 << (63 - cluster_bits)) - 1);
    (off, csize)
}

impl ImageReader for QcowReader {
    fn format(&self) -> Format {
        Format::Qcow
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(1 << self.cluster_bits)
    }

    fn map(&self, offset: GuestOffset, max_len: u64) -> Result<Extent> {
        let size = self.virtual_size;
        let (pos, end) = crate::mapping::map_range(offset, max_len, size)?;
        let cs = 1u64 << self.cluster_bits;
        let c0 = pos / cs;
        let e0 = self.entry(c0);
        if e0 & COMPRESSED != 0 {
            let (off, len) = compressed(e0, self.cluster_bits);
            let unit_start = c0 * cs;
            return Ok(Extent {
                start: offset,
                len: (unit_start + cs).min(end) - pos,
                kind: MapKind::Compressed {
                    file: FileId(0),
                    offset: HostOffset(off),
                    len,
                    codec: Codec::Deflate,
                    unit_start: GuestOffset(unit_start),
                    unit_len: cs,
                },
            });
        }
        let per = 1u64 << self.l2_bits;
        let mut c = c0;
        let mut cur;
        // A missing L2 table is skipped whole, so the work follows the tables, not the
        // disk size.
        loop {
            let next = if self.has_table(c / per) {
                c + 1
            } else {
                (c / per + 1) * per
            };
            cur = next.saturating_mul(cs).min(end);
            if cur >= end {
                break;
            }
            c = next;
            let e = self.entry(c);
            let same = if e0 == 0 {
                e == 0
            } else {
                e & COMPRESSED == 0 && e == e0 + (c - c0) * cs
            };
            if !same {
                break;
            }
        }
        let kind = if e0 == 0 {
            MapKind::Unallocated
        } else {
            MapKind::Data {
                file: FileId(0),
                offset: HostOffset(e0 + pos % cs),
            }
        };
        // Not cut at holes of the host file: qemu's qcow block status reports a data
        // cluster as data whatever the file holds under it (no BDRV_BLOCK_RECURSE), and
        // `map` shows what qemu-img shows.
        Ok(Extent {
            start: offset,
            len: cur - pos,
            kind,
        })
    }

    fn map_probes_host_holes(&self) -> bool {
        false
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
        self.backing.iter().map(BackingRef::external_ref).collect()
    }
}
