//! The dmg reader: answers `map` by binary search over the chunks `open.rs` read and checked.

use std::sync::Arc;

use super::header::{Koly, CHUNK_BZIP2, CHUNK_RAW, CHUNK_ZLIB};
use crate::codec::Codec;
use crate::error::Result;
use crate::formats::Format;
use crate::mapping::{Extent, FileId, GuestOffset, HostOffset, ImageReader, MapKind};
use crate::storage::Storage;

/// One chunk, with absolute sectors and file offsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Run {
    pub(super) sector: u64,
    pub(super) count: u64,
    pub(super) kind: u32,
    pub(super) offset: u64,
    pub(super) length: u64,
}

/// An open dmg.
pub struct DmgReader {
    pub(super) storage: Arc<dyn Storage>,
    pub(super) koly: Koly,
    pub(super) virtual_size: u64,
    pub(super) runs: Vec<Run>,
}

impl DmgReader {
    /// The trailer.
    pub fn koly(&self) -> &Koly {
        &self.koly
    }
}

impl ImageReader for DmgReader {
    fn reports_allocation(&self) -> bool {
        // qemu's driver has no block status: qemu-img maps everything as data.
        false
    }

    fn format(&self) -> Format {
        Format::Dmg
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn map(&self, offset: GuestOffset, max_len: u64) -> Result<Extent> {
        let (pos, end) = crate::mapping::map_range(offset, max_len, self.virtual_size)?;
        let sector = pos / 512;
        let i = self.runs.partition_point(|r| r.sector + r.count <= sector);
        let r = self
            .runs
            .get(i)
            .filter(|r| r.sector <= sector)
            .ok_or_else(|| crate::Error::corrupt(format!("dmg sector {sector} is in no chunk")))?;
        let start = r.sector * 512;
        let stop = ((r.sector + r.count) * 512).min(end);
        let kind = match r.kind {
            CHUNK_RAW => MapKind::Data {
                file: FileId(0),
                offset: HostOffset(r.offset + (pos - start)),
            },
            CHUNK_ZLIB | CHUNK_BZIP2 => MapKind::Compressed {
                file: FileId(0),
                offset: HostOffset(r.offset),
                len: r.length,
                codec: if r.kind == CHUNK_BZIP2 {
                    Codec::Bzip2
                } else {
                    Codec::Zlib
                },
                unit_start: GuestOffset(start),
                unit_len: r.count * 512,
            },
            _ => MapKind::Zero,
        };
        Ok(Extent {
            start: offset,
            len: stop - pos,
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
