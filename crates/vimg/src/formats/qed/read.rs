//! The QED reader: answers `map` from the tables `open.rs` read and checked.

use std::sync::Arc;

use super::header::{Header, F_NEED_CHECK, ZERO_CLUSTER};
use crate::check::CheckReport;
use crate::error::Result;
use crate::formats::cluster_tables::ClusterTables;
use crate::formats::Format;
use crate::mapping::{
    BackingRef, Extent, ExternalRef, FileId, GuestOffset, HostOffset, ImageReader, MapKind,
};
use crate::storage::Storage;

/// An open QED image.
pub struct QedReader {
    pub(super) storage: Arc<dyn Storage>,
    pub(super) header: Header,
    pub(super) cluster_size: u64,
    /// Guest bytes one L2 table covers.
    pub(super) l2_span: u64,
    /// The whole L1 table as read (entries past the disk included, unchecked).
    pub(super) l1: Vec<u64>,
    /// Per L1 entry: the L2 table's entries, or `None` when unallocated.
    pub(super) l2: Vec<Option<Vec<u64>>>,
    pub(super) backing: Option<BackingRef>,
}

impl QedReader {
    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    fn tables(&self) -> ClusterTables<'_> {
        ClusterTables {
            l2: &self.l2,
            per: self.l2_span / self.cluster_size,
        }
    }
}

fn kind(e: u64) -> u8 {
    match e {
        0 => 0,
        ZERO_CLUSTER => 1,
        _ => 2,
    }
}

impl ImageReader for QedReader {
    fn format(&self) -> Format {
        Format::Qed
    }

    fn virtual_size(&self) -> u64 {
        self.header.image_size
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.cluster_size)
    }

    fn map(&self, offset: GuestOffset, max_len: u64) -> Result<Extent> {
        let size = self.header.image_size;
        let (pos, end) = crate::mapping::map_range(offset, max_len, size)?;
        let cs = self.cluster_size;
        let c0 = pos / cs;
        let tables = self.tables();
        let e0 = tables.entry(c0);
        let cur = tables.run_end(c0, cs, end, |c, e| {
            kind(e) == kind(e0) && (kind(e0) != 2 || e == e0 + (c - c0) * cs)
        });
        let kind = match e0 {
            0 => MapKind::Unallocated,
            ZERO_CLUSTER => MapKind::Zero,
            h => MapKind::Data {
                file: FileId(0),
                offset: HostOffset(h + pos % cs),
            },
        };
        // Not cut at holes of the host file: qemu's qed block status reports a data
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

    fn dirty(&self) -> bool {
        self.header.features & F_NEED_CHECK != 0
    }

    fn warnings(&self) -> Vec<String> {
        if self.dirty() {
            vec!["the QED image has its need-check flag set (not closed cleanly); its tables were checked at open and it is read as they say".into()]
        } else {
            Vec::new()
        }
    }

    fn check(&self) -> Result<CheckReport> {
        // Tables that point outside the file, into metadata or onto one another fail at
        // open; what remains is qemu-img's statistics.
        let mut r = CheckReport::default();
        let cs = self.cluster_size;
        let total = self.header.image_size.div_ceil(cs);
        let (mut allocated, mut fragmented) = (0u64, 0u64);
        // Per L2 table, as qemu-img counts: a data cluster not right after the previous
        // one of the same table is fragmented. Work follows the tables (bounded by the file).
        for t in self.l2.iter().flatten() {
            let mut prev: Option<u64> = None;
            for &e in t.iter().filter(|e| **e > ZERO_CLUSTER) {
                allocated += 1;
                if prev.is_some_and(|p| p + cs != e) {
                    fragmented += 1;
                }
                prev = Some(e);
            }
        }
        // qemu-img leaves out the counts that are zero.
        let some = |n: u64| (n != 0).then_some(n);
        r.total_clusters = some(total);
        r.allocated_clusters = some(allocated);
        r.fragmented_clusters = some(fragmented);
        r.leaks = super::check::leaks(self, self.storage.len());
        Ok(r)
    }
}
