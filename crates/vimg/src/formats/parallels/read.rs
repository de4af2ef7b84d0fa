//! The Parallels reader: answers `map` from the BAT alone (`open.rs` checked the header,
//! every BAT entry and the Format Extension).

use std::sync::Arc;

use super::header::{Header, INUSE_OPEN, SECTOR};
use crate::check::CheckReport;
use crate::error::Result;
use crate::formats::Format;
use crate::mapping::{
    Extent, FileId, FormatSpecific, GuestOffset, HostOffset, ImageReader, MapKind,
};
use crate::storage::Storage;

/// One dirty bitmap from the Format Extension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Its identifier, as a UUID.
    pub id: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Its size in sectors.
    pub size: u64,
}

/// An open Parallels image.
pub struct ParallelsReader {
    pub(super) storage: Arc<dyn Storage>,
    pub(super) header: Header,
    pub(super) virtual_size: u64,
    pub(super) cluster_size: u64,
    /// Sectors per BAT unit: 1 ("WithoutFreeSpace") or the cluster size in sectors.
    pub(super) multiplier: u64,
    pub(super) data_start: u64,
    pub(super) bat: Vec<u32>,
    pub(super) bitmaps: Vec<BitmapInfo>,
}

impl ParallelsReader {
    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The BAT.
    pub fn bat(&self) -> &[u32] {
        &self.bat
    }

    /// The dirty bitmaps of the Format Extension.
    pub fn bitmaps(&self) -> &[BitmapInfo] {
        &self.bitmaps
    }

    fn host(&self, cluster: u64) -> Option<u64> {
        let v = usize::try_from(cluster)
            .ok()
            .and_then(|c| self.bat.get(c))
            .copied()?;
        (v != 0).then(|| u64::from(v) * self.multiplier * SECTOR)
    }
}

impl ImageReader for ParallelsReader {
    fn map_probes_host_holes(&self) -> bool {
        // qemu's parallels block status sets no BDRV_BLOCK_RECURSE.
        false
    }

    fn format(&self) -> Format {
        Format::Parallels
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn cluster_size(&self) -> Option<u64> {
        // qemu-img info shows no cluster size for parallels.
        None
    }

    fn map(&self, offset: GuestOffset, max_len: u64) -> Result<Extent> {
        let (pos, end) = crate::mapping::map_range(offset, max_len, self.virtual_size)?;
        let cs = self.cluster_size;
        let first_cluster = pos / cs;
        let first = self.host(first_cluster);
        let mut cluster = first_cluster;
        let mut cur = ((cluster + 1) * cs).min(end);
        // Merge following clusters: unallocated runs, or clusters one after the other in
        // the file.
        while cur < end {
            cluster += 1;
            if first.is_none() && cluster >= self.bat.len() as u64 {
                // Past the BAT everything is unallocated: one step to the end, so the work
                // stays bounded by the file, not by the disk size the header claims.
                cur = end;
                break;
            }
            let same = match (first, self.host(cluster)) {
                (None, None) => true,
                (Some(a), Some(b)) => b == a + (cluster - first_cluster) * cs,
                _ => false,
            };
            if !same {
                break;
            }
            cur = ((cluster + 1) * cs).min(end);
        }
        let kind = match first {
            None => MapKind::Unallocated,
            Some(h) => MapKind::Data {
                file: FileId(0),
                offset: HostOffset(h + pos % cs),
            },
        };
        // Whole clusters, holes in the file included: QEMU leaves holes inside the
        // clusters it allocates, and counts them as data (measure, map).
        Ok(Extent {
            start: offset,
            len: cur - pos,
            kind,
        })
    }

    fn file(&self, id: FileId) -> Option<&Arc<dyn Storage>> {
        (id.0 == 0).then_some(&self.storage)
    }

    fn files(&self) -> Vec<Arc<dyn Storage>> {
        vec![self.storage.clone()]
    }

    fn warnings(&self) -> Vec<String> {
        if self.header.inuse == INUSE_OPEN {
            vec!["the Parallels image was not closed correctly (in-use flag set); it is read as its BAT says, as qemu-img reads it".to_string()]
        } else {
            Vec::new()
        }
    }

    fn persistent_bitmaps(&self) -> Option<Vec<(String, u64)>> {
        // QEMU's parallels driver can hold persistent bitmaps, so qemu-img measure prints
        // a bitmaps figure; the ones it loads from the Format Extension are not persistent
        // to it, so the figure is 0 (measured on the corpus sample with a bitmap).
        Some(Vec::new())
    }

    fn format_specific(&self) -> Option<FormatSpecific> {
        // qemu-img shows nothing here; vimg lists the dirty bitmaps it tolerates.
        if self.bitmaps.is_empty() {
            return None;
        }
        let mut data = serde_json::Map::new();
        let list: Vec<serde_json::Value> = self
            .bitmaps
            .iter()
            .map(|b| {
                serde_json::json!({
                    "id": b.id,
                    "granularity": b.granularity,
                    "size": b.size * SECTOR,
                })
            })
            .collect();
        data.insert("dirty-bitmaps".to_string(), serde_json::Value::Array(list));
        Some(FormatSpecific {
            kind: "parallels".to_string(),
            data,
        })
    }

    fn check(&self) -> Result<CheckReport> {
        // What qemu-img check reports for an image that opens: the unclean flag, the
        // allocation and fragmentation counts, and space past the last BAT cluster.
        let mut r = CheckReport::default();
        if self.header.inuse == INUSE_OPEN {
            r.corruption("ERROR image was not closed correctly");
        }
        let cs = self.cluster_size;
        let mut allocated = 0u64;
        let mut fragmented = 0u64;
        let mut prev: Option<u64> = None;
        let mut end = self.data_start;
        for i in 0..self.bat.len() as u64 {
            match self.host(i) {
                None => prev = None,
                Some(h) => {
                    allocated += 1;
                    if prev.is_some_and(|p| p + cs != h) {
                        fragmented += 1;
                    }
                    prev = Some(h);
                    end = end.max(h + cs);
                }
            }
        }
        let len = self.storage.len();
        if len > end {
            let leaked = len - end;
            r.leaks += leaked.div_ceil(cs);
            r.messages.push(format!(
                "ERROR space leaked at the end of the image {leaked}"
            ));
        }
        r.image_end_offset = Some(end);
        // qemu-img leaves out the counts that are zero.
        let some = |n: u64| (n != 0).then_some(n);
        r.total_clusters = some(self.bat.len() as u64);
        r.allocated_clusters = some(allocated);
        r.fragmented_clusters = some(fragmented);
        Ok(r)
    }
}
