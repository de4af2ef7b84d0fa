//! The cloop reader: validates the header and the whole offsets table at open; every block
//! maps to one zlib-compressed unit.

use std::sync::Arc;

use super::error::CloopError;
use super::header::{self, Header, HEADER_SIZE, OFFSETS_AT};
use crate::error::Result;
use crate::formats::unread::CLOOP_MAGIC;
use crate::formats::Format;
use crate::limits;
use crate::mapping::{Codec, Extent, FileId, GuestOffset, HostOffset, ImageReader, MapKind};
use crate::storage::{read_exact, Storage};

/// QEMU's largest block size, 64 MiB.
pub const MAX_BLOCK_SIZE: u32 = 64 << 20;
/// QEMU's largest offsets table, 512 MiB (vimg's table limit applies first).
pub const MAX_OFFSETS_BYTES: u64 = 512 << 20;

/// An open cloop image.
pub struct CloopReader {
    storage: Arc<dyn Storage>,
    header: Header,
    block_size: u64,
    offsets: Vec<u64>,
}

fn field(field: &'static str, at: u64, value: u64, why: impl Into<String>) -> CloopError {
    CloopError::Field {
        field,
        at,
        value,
        why: why.into(),
    }
}

impl CloopReader {
    /// Opens the cloop image in `storage`.
    pub fn open(storage: Arc<dyn Storage>) -> Result<CloopReader> {
        let len = storage.len();
        if len < HEADER_SIZE as u64 {
            return Err(CloopError::TooShort { len }.into());
        }
        let mut hb = [0u8; HEADER_SIZE];
        read_exact(&*storage, &mut hb, 0, "cloop header")?;
        let h = Header::parse(&hb)?;
        if !h.preamble.starts_with(CLOOP_MAGIC) {
            return Err(CloopError::Signature.into());
        }
        let bs = h.block_size;
        if bs == 0 {
            return Err(field("block size", 0x80, 0, "block_size cannot be zero").into());
        }
        if !bs.is_multiple_of(512) {
            return Err(field("block size", 0x80, bs.into(), "must be a multiple of 512").into());
        }
        if bs > MAX_BLOCK_SIZE {
            return Err(field("block size", 0x80, bs.into(), "must be 64 MB or less").into());
        }
        let entries = u64::from(h.n_blocks) + 1;
        let bytes = entries * 8;
        if bytes > MAX_OFFSETS_BYTES {
            return Err(field(
                "block count",
                0x84,
                h.n_blocks.into(),
                "image requires too many offsets, try increasing block size",
            )
            .into());
        }
        if OFFSETS_AT + bytes > len {
            return Err(CloopError::TablePastEof { bytes, len }.into());
        }
        let n = limits::check_table_bytes("cloop offsets table", bytes)?;
        let mut raw = vec![0u8; n];
        read_exact(&*storage, &mut raw, OFFSETS_AT, "cloop offsets table")?;
        let offsets = header::parse_offsets(&raw, entries as usize);
        drop(raw);
        let table_end = OFFSETS_AT + bytes;
        let max_block = 2 * u64::from(MAX_BLOCK_SIZE);
        for (i, &o) in offsets.iter().enumerate() {
            let bad = |why: String| CloopError::Offset {
                index: i as u32,
                at: OFFSETS_AT + 8 * i as u64,
                value: o,
                why,
            };
            if o < table_end {
                return Err(bad(format!(
                    "it lies inside the header and offsets table (which end at {table_end:#x})"
                ))
                .into());
            }
            if o > len {
                return Err(
                    bad(format!("it lies past the end of the file ({len:#x} bytes)")).into(),
                );
            }
            if i > 0 {
                let prev = offsets[i - 1];
                if o < prev {
                    return Err(bad(format!(
                        "offsets not monotonically increasing (the previous one is {prev:#x})"
                    ))
                    .into());
                }
                if o - prev > max_block {
                    return Err(
                        bad(format!("invalid compressed block size {:#x}", o - prev)).into(),
                    );
                }
            }
        }
        Ok(CloopReader {
            storage,
            header: h,
            block_size: bs.into(),
            offsets,
        })
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }
}

impl ImageReader for CloopReader {
    fn reports_allocation(&self) -> bool {
        // qemu's driver has no block status: qemu-img maps everything as data.
        false
    }

    fn format(&self) -> Format {
        Format::Cloop
    }

    fn virtual_size(&self) -> u64 {
        u64::from(self.header.n_blocks) * self.block_size
    }

    fn map(&self, offset: GuestOffset, max_len: u64) -> Result<Extent> {
        let (pos, end) = crate::mapping::map_range(offset, max_len, self.virtual_size())?;
        let bs = self.block_size;
        let i = (pos / bs) as usize;
        let (start, stop) = match (self.offsets.get(i), self.offsets.get(i + 1)) {
            (Some(a), Some(b)) => (*a, *b),
            _ => {
                return Err(crate::Error::corrupt(format!(
                    "cloop block {i} has no offset"
                )))
            }
        };
        let unit_start = i as u64 * bs;
        Ok(Extent {
            start: offset,
            len: (unit_start + bs).min(end) - pos,
            kind: MapKind::Compressed {
                file: FileId(0),
                offset: HostOffset(start),
                len: stop - start,
                codec: Codec::Zlib,
                unit_start: GuestOffset(unit_start),
                unit_len: bs,
            },
        })
    }

    fn file(&self, id: FileId) -> Option<&Arc<dyn Storage>> {
        (id.0 == 0).then_some(&self.storage)
    }

    fn files(&self) -> Vec<Arc<dyn Storage>> {
        vec![self.storage.clone()]
    }
}
