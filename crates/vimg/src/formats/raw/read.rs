//! The raw reader: data where the filesystem has data, zero in holes.

use std::sync::Arc;

use crate::error::Result;
use crate::formats::Format;
use crate::mapping::{Extent, FileId, GuestOffset, HostOffset, ImageReader, MapKind};
use crate::storage::Storage;

/// Reads a raw image.
pub struct RawReader {
    storage: Arc<dyn Storage>,
    /// See [`ImageReader::status_alignment`].
    align: u64,
}

impl RawReader {
    /// A reader over `storage`; the virtual size is the file length rounded up to a whole
    /// sector, as qemu counts it (the bytes past the end read as zeros).
    pub fn new(storage: Arc<dyn Storage>) -> RawReader {
        RawReader { storage, align: 1 }
    }

    /// A reader over a file the user opened with `cache.direct=on`: block status is
    /// reported in whole sectors, as qemu's file driver reports it under `O_DIRECT`.
    pub fn direct(storage: Arc<dyn Storage>) -> RawReader {
        RawReader {
            storage,
            align: 512,
        }
    }
}

impl ImageReader for RawReader {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn virtual_size(&self) -> u64 {
        self.storage.len().div_ceil(512).saturating_mul(512)
    }

    fn map(&self, offset: GuestOffset, max_len: u64) -> Result<Extent> {
        let pos = offset.get();
        let len = self.storage.len();
        let end = pos.saturating_add(max_len).min(self.virtual_size());
        if pos >= len {
            // The rounding tail past the end of the file.
            return Ok(Extent {
                start: offset,
                len: end.saturating_sub(pos).max(1),
                kind: MapKind::Zero,
            });
        }
        let end = end.min(len);
        // A hole in a raw file is part of the image and reads as zero; it never lets a
        // backing image show through (raw has none), as qemu reports it.
        let e = Extent {
            start: offset,
            len: end - pos,
            kind: MapKind::Data {
                file: FileId(0),
                offset: HostOffset(pos),
            },
        };
        crate::mapping::trim_at_holes(&*self.storage, e)
    }

    fn file(&self, id: FileId) -> Option<&Arc<dyn Storage>> {
        (id.0 == 0).then_some(&self.storage)
    }

    fn files(&self) -> Vec<Arc<dyn Storage>> {
        vec![self.storage.clone()]
    }

    fn zero_location(&self, e: &Extent) -> Option<(FileId, HostOffset)> {
        Some((FileId(0), HostOffset(e.start.get())))
    }

    fn status_alignment(&self) -> u64 {
        self.align
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    #[test]
    fn size_rounds_up_to_a_sector_with_a_zero_tail() {
        let r = RawReader::new(Arc::new(MemStorage::new(vec![1u8; 1000])));
        assert_eq!(r.virtual_size(), 1024);
        let e = r.map(GuestOffset(0), 1024).unwrap();
        assert_eq!(e.len, 1000);
        let e = r.map(GuestOffset(1000), 24).unwrap();
        assert_eq!((e.len, e.kind), (24, MapKind::Zero));
    }

    #[test]
    fn memory_is_all_data() {
        let r = RawReader::new(Arc::new(MemStorage::new(vec![1u8; 1000])));
        let e = r.map(GuestOffset(100), 10_000).unwrap();
        assert_eq!(e.len, 900);
        assert_eq!(
            e.kind,
            MapKind::Data {
                file: FileId(0),
                offset: HostOffset(100)
            }
        );
    }
}
