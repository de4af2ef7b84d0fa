//! The qcow (version 1) reader: answers `map` from the tables `open.rs` read and checked.

use std::sync::Arc;

use super::header::{Header, COMPRESSED};
use crate::error::Result;
use crate::formats::cluster_tables::ClusterTables;
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

    fn tables(&self) -> ClusterTables<'_> {
        ClusterTables {
            l2: &self.l2,
            per: 1 << self.l2_bits,
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
        let tables = self.tables();
        let e0 = tables.entry(c0);
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
        let cur = tables.run_end(c0, cs, end, |c, e| {
            if e0 == 0 {
                e == 0
            } else {
                e & COMPRESSED == 0 && e == e0 + (c - c0) * cs
            }
        });
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
