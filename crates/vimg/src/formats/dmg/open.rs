//! Opening a dmg: finds the UDIF trailer, reads the chunk tables from the XML property list
//! and checks them (known types, inside the file, no overlaps, every sector of the disk in a
//! chunk). `read.rs` answers `map` by binary search.

use std::sync::Arc;

use super::error::DmgError;
use super::header::{
    base64_decode, Chunk, Koly, Mish, CHUNK_ADC, CHUNK_BZIP2, CHUNK_IGNORE, CHUNK_LZFSE, CHUNK_RAW,
    CHUNK_SIZE, CHUNK_ZERO, CHUNK_ZLIB, KOLY_MAGIC, KOLY_SIZE, MISH_HEADER_SIZE, MISH_MAGIC,
};
use super::read::{DmgReader, Run};
use crate::error::Result;
use crate::storage::{read_exact, Storage};

/// QEMU's limit on the property list.
pub const MAX_PLIST: u64 = 16 << 20;
/// QEMU's limit on a chunk's bytes in the file.
pub const MAX_LENGTH: u64 = 64 << 20;
/// QEMU's limit on a data chunk's sectors.
pub const MAX_SECTORS: u64 = MAX_LENGTH / 512;

fn field(field: &'static str, at: u64, value: u64, why: impl Into<String>) -> DmgError {
    DmgError::Field {
        field,
        at,
        value,
        why: why.into(),
    }
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

impl DmgReader {
    /// Opens the dmg in `storage`.
    pub fn open(storage: Arc<dyn Storage>) -> Result<DmgReader> {
        let len = storage.len();
        if len < KOLY_SIZE as u64 {
            return Err(DmgError::TooShort { len }.into());
        }
        let at = len - KOLY_SIZE as u64;
        let mut kb = [0u8; KOLY_SIZE];
        read_exact(&*storage, &mut kb, at, "UDIF trailer")?;
        let k = Koly::parse(&kb)?;
        if k.magic != KOLY_MAGIC {
            return Err(DmgError::Trailer { at }.into());
        }
        if k.data_fork_offset > at {
            return Err(field(
                "data fork offset",
                at + 0x18,
                k.data_fork_offset,
                "past the trailer",
            )
            .into());
        }
        if k.rsrc_fork_offset >= at || k.rsrc_fork_length > at - k.rsrc_fork_offset {
            return Err(field(
                "resource fork offset",
                at + 0x28,
                k.rsrc_fork_offset,
                format!(
                    "with length {:#x}, it runs past the trailer",
                    k.rsrc_fork_length
                ),
            )
            .into());
        }
        if k.plist_offset >= at || k.plist_length > at - k.plist_offset {
            return Err(field(
                "property list offset",
                at + 0xd8,
                k.plist_offset,
                format!(
                    "with length {:#x}, it runs past the trailer",
                    k.plist_length
                ),
            )
            .into());
        }
        let virtual_size = k
            .sector_count
            .checked_mul(512)
            .filter(|v| *v <= i64::MAX as u64)
            .ok_or_else(|| field("sector count", at + 0x1ec, k.sector_count, "too large"))?;
        if k.rsrc_fork_length != 0 {
            return Err(DmgError::Unsupported(
                "the chunk tables are in a resource fork (an old UDIF layout); vimg reads them from the XML property list only".into(),
            )
            .into());
        }
        if k.plist_length == 0 || k.plist_length > MAX_PLIST {
            return Err(field(
                "property list length",
                at + 0xe0,
                k.plist_length,
                "must be 1 byte to 16 MiB",
            )
            .into());
        }
        let mut plist = vec![0u8; k.plist_length as usize];
        read_exact(&*storage, &mut plist, k.plist_offset, "dmg property list")?;
        // QEMU scans the list as a C string.
        if let Some(nul) = plist.iter().position(|b| *b == 0) {
            plist.truncate(nul);
        }
        let mut runs = Vec::new();
        let mut pos = 0;
        while let Some(b) = find(&plist, b"<data>", pos) {
            let start = b + 6;
            let end = find(&plist, b"</data>", start).ok_or_else(|| {
                field(
                    "property list",
                    k.plist_offset + b as u64,
                    b as u64,
                    "a <data> element has no </data>",
                )
            })?;
            let mish = base64_decode(&plist[start..end]);
            read_mish(&mish, &k, at, &mut runs)?;
            pos = end + 7;
        }
        runs.sort_by_key(|r| r.sector);
        let total = k.sector_count;
        let mut next = 0u64;
        for w in runs.windows(2) {
            if w[0].sector + w[0].count > w[1].sector {
                return Err(DmgError::Chunk(format!(
                    "chunks for sectors {}..{} and {}..{} overlap",
                    w[0].sector,
                    w[0].sector + w[0].count,
                    w[1].sector,
                    w[1].sector + w[1].count
                ))
                .into());
            }
        }
        for r in &runs {
            if r.sector >= total {
                break;
            }
            if r.sector > next {
                break;
            }
            next = r.sector + r.count;
        }
        if next < total {
            return Err(DmgError::Chunk(format!(
                "sectors from {next} on (of {total}) are in no chunk (qemu-img fails reading them)"
            ))
            .into());
        }
        Ok(DmgReader {
            storage,
            koly: k,
            virtual_size,
            runs,
        })
    }
}

/// Adds the chunks of one decoded mish block to `runs`, as QEMU does: blocks that are not
/// mish blocks are skipped, and so are comment, end and unknown chunk types; compressed
/// types vimg cannot decode are refused. Data must end before the trailer at `koly_at`.
fn read_mish(b: &[u8], k: &Koly, koly_at: u64, runs: &mut Vec<Run>) -> Result<(), DmgError> {
    if b.len() < MISH_HEADER_SIZE + CHUNK_SIZE || Mish::parse(b).magic != MISH_MAGIC {
        return Ok(());
    }
    let m = Mish::parse(b);
    let in_offset = k.data_fork_offset.checked_add(m.data_offset);
    let n = (b.len() - MISH_HEADER_SIZE) / CHUNK_SIZE;
    for i in 0..n {
        let at = MISH_HEADER_SIZE + i * CHUNK_SIZE;
        let c = Chunk::parse(&b[at..at + CHUNK_SIZE]);
        let name = match c.kind {
            CHUNK_ZERO | CHUNK_IGNORE | CHUNK_RAW | CHUNK_ZLIB | CHUNK_BZIP2 => None,
            CHUNK_LZFSE => Some("lzfse (ULFO)"),
            CHUNK_ADC => Some("ADC (UDCO)"),
            _ => continue,
        };
        if let Some(name) = name {
            return Err(DmgError::Unsupported(format!(
                "chunk {i} of the mish block for sector {} is {name} compressed, which vimg does not decode",
                m.first_sector
            )));
        }
        if c.sector_count == 0 {
            continue;
        }
        let bad = |why: String| {
            DmgError::Chunk(format!(
                "chunk {i} (type {:#x}) of the mish block for sector {}: {why}",
                c.kind, m.first_sector
            ))
        };
        let sector = m
            .first_sector
            .checked_add(c.sector)
            // The chunk's end must be a byte offset too: a zero chunk is not held to the
            // sector-count limit, and `(sector + count) * 512` must not wrap in map().
            .filter(|s| {
                s.checked_add(c.sector_count)
                    .and_then(|e| e.checked_mul(512))
                    .is_some()
            })
            .ok_or_else(|| bad(format!("sector {:#x} is out of range", c.sector)))?;
        let zero = matches!(c.kind, CHUNK_ZERO | CHUNK_IGNORE);
        if !zero {
            if c.sector_count > MAX_SECTORS {
                return Err(bad(format!(
                    "sector count {} is larger than max ({MAX_SECTORS})",
                    c.sector_count
                )));
            }
            if c.length > MAX_LENGTH || c.length == 0 {
                return Err(bad(format!(
                    "length {} is 0 or larger than max ({MAX_LENGTH})",
                    c.length
                )));
            }
        }
        let offset = in_offset.and_then(|o| o.checked_add(c.offset));
        let offset = match offset {
            Some(o) if zero || o.checked_add(c.length).is_some_and(|e| e <= koly_at) => o,
            _ => {
                return Err(bad(format!(
                    "its {:#x} bytes at {:#x} (plus the data fork and block offsets) run into the trailer or past the end of the file",
                    c.length, c.offset
                )))
            }
        };
        if c.kind == CHUNK_RAW && c.length != c.sector_count * 512 {
            return Err(bad(format!(
                "a raw chunk of {} sectors holds {} bytes",
                c.sector_count, c.length
            )));
        }
        runs.push(Run {
            sector,
            count: c.sector_count,
            kind: c.kind,
            offset,
            length: c.length,
        });
    }
    Ok(())
}
