//! The VDI reader: answers `map` from the block map alone (`open.rs` checked the header and
//! every entry).

use std::sync::Arc;

use super::header::{Header, BLOCK_FREE, BLOCK_SIZE, BLOCK_ZERO};
use crate::check::CheckReport;
use crate::error::Result;
use crate::formats::Format;
use crate::mapping::{Extent, FileId, GuestOffset, HostOffset, ImageReader, MapKind};
use crate::storage::Storage;

/// An open VDI.
pub struct VdiReader {
    pub(super) storage: Arc<dyn Storage>,
    pub(super) header: Header,
    pub(super) virtual_size: u64,
    pub(super) map: Vec<u32>,
}

impl VdiReader {
    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The block map.
    pub fn block_map(&self) -> &[u32] {
        &self.map
    }

    fn entry(&self, block: u64) -> u32 {
        usize::try_from(block)
            .ok()
            .and_then(|b| self.map.get(b))
            .copied()
            .unwrap_or(BLOCK_FREE)
    }
}

fn kind_of(entry: u32, data_at: u64, in_block: u64) -> MapKind {
    match entry {
        BLOCK_FREE => MapKind::Unallocated,
        BLOCK_ZERO => MapKind::Zero,
        v => MapKind::Data {
            file: FileId(0),
            offset: HostOffset(data_at + u64::from(v) * u64::from(BLOCK_SIZE) + in_block),
        },
    }
}

impl ImageReader for VdiReader {
    fn format(&self) -> Format {
        Format::Vdi
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(BLOCK_SIZE.into())
    }

    fn map(&self, offset: GuestOffset, max_len: u64) -> Result<Extent> {
        let (pos, end) = crate::mapping::map_range(offset, max_len, self.virtual_size)?;
        let bs = u64::from(BLOCK_SIZE);
        let data_at = u64::from(self.header.offset_data);
        let mut block = pos / bs;
        let first = self.entry(block);
        let kind = kind_of(first, data_at, pos % bs);
        let mut cur = ((block + 1) * bs).min(end);
        // Merge following blocks of the same kind: free or zero runs, or data blocks that
        // sit one after the other in the file (static images, sequentially written ones).
        while cur < end {
            block += 1;
            let e = self.entry(block);
            let same = match (first, e) {
                (BLOCK_FREE, BLOCK_FREE) | (BLOCK_ZERO, BLOCK_ZERO) => true,
                (a, b) if a < BLOCK_ZERO && b < BLOCK_ZERO => {
                    u64::from(b) == u64::from(a) + (block - pos / bs)
                }
                _ => false,
            };
            if !same {
                break;
            }
            cur = ((block + 1) * bs).min(end);
        }
        crate::mapping::trim_at_holes(
            &*self.storage,
            Extent {
                start: offset,
                len: cur - pos,
                kind,
            },
        )
    }

    fn file(&self, id: FileId) -> Option<&Arc<dyn Storage>> {
        (id.0 == 0).then_some(&self.storage)
    }

    fn files(&self) -> Vec<Arc<dyn Storage>> {
        vec![self.storage.clone()]
    }

    fn check(&self) -> Result<CheckReport> {
        // What qemu-img checks: entries in range and used once (refused at open here), and
        // the allocated-blocks count in the header.
        let mut r = CheckReport::default();
        let allocated = self.map.iter().filter(|v| **v < BLOCK_ZERO).count() as u64;
        if allocated != u64::from(self.header.blocks_allocated) {
            r.corruption(format!(
                "ERROR: allocated blocks mismatch, is {allocated}, should be {}",
                self.header.blocks_allocated
            ));
        }
        Ok(r)
    }
}
