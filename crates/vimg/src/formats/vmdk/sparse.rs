//! The grain-table walk shared by the three sparse extent kinds: hosted (KDMV, including
//! stream-optimized), ESX Server (COWD, vmfsSparse) and ESXi seSparse.
//!
//! Opening a sparse extent reads its grain directory (bounded by
//! [`crate::limits::MAX_TABLE_BYTES`]) and then every grain table it names once, checking
//! each entry: inside the file, not in the header, descriptor, directories or another grain
//! table, and no two entries at one grain. The cost is linear in the allocated tables, and
//! afterwards `map` only needs a bounded cache of grain tables.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use byteorder::{ByteOrder, LittleEndian as LE};

use super::error::VmdkError;
use super::header::*;
use crate::error::{Error, Result};
use crate::limits;
use crate::mapping::{Codec, Extent, FileId, GuestOffset, HostOffset, MapKind};
use crate::storage::{read_exact, Storage};

/// How grain table entries are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// Hosted sparse extent (u32 sector entries; 1 = zeroed grain when flagged).
    Hosted {
        /// Grains are zlib-compressed.
        compressed: bool,
        /// Compressed grains start with a 12-byte grain marker.
        markers: bool,
        /// Entry 1 means "zeroed grain".
        zero_grain: bool,
    },
    /// COWD (u32 sector entries).
    Cowd,
    /// seSparse (u64 entries with a type nibble).
    SeSparse {
        /// First sector of the grain area.
        grains_offset: u64,
    },
}

/// A decoded grain table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gte {
    Unallocated,
    Zero,
    /// Host sector of the grain (or of its grain marker when compressed).
    At(u64),
}

/// What `open` needs to know to walk one sparse extent.
pub struct SparseParams {
    /// For messages: "extent 1".
    pub label: String,
    /// The file and its id in the reader.
    pub file: FileId,
    /// The file.
    pub storage: Arc<dyn Storage>,
    /// Entry encoding.
    pub flavor: Flavor,
    /// Guest bytes the extent covers.
    pub len: u64,
    /// Grain size in sectors.
    pub grain_sectors: u64,
    /// Entries per grain table.
    pub gtes_per_gt: u64,
    /// Bytes per entry (4 or 8).
    pub entry_size: u64,
    /// Grain directory entries, already decoded to grain table sectors (0 = none).
    pub gd: Vec<u32>,
    /// The redundant directory, when in use (for `check`).
    pub rgd: Option<Vec<u32>>,
    /// Metadata ranges in sectors `[start, end)` no grain may point into (header,
    /// descriptor, directories, footer).
    pub metadata: Vec<(u64, u64)>,
}

/// One opened sparse extent.
pub struct SparseExtent {
    p: SparseParams,
    grain: u64,
    gt_sectors: u64,
    cache: Mutex<HashMap<u64, Arc<Vec<u64>>>>,
    cache_cap: usize,
    /// Grain tables found all zero at open: `map` answers for them without reading.
    empty: Vec<bool>,
}

/// Most allocated grains whose host positions are kept to detect two entries at one grain
/// (8 bytes each). Past it the duplicate check is skipped, which `check` reports.
const MAX_TRACKED_GRAINS: usize = 16 << 20;

fn entry_err(table: String, index: u64, value: u64, why: &'static str) -> Error {
    VmdkError::BadEntry {
        table,
        index,
        value,
        why,
    }
    .into()
}

impl SparseExtent {
    /// Checks the directories and every grain table, and returns the extent.
    pub fn open(p: SparseParams) -> Result<SparseExtent> {
        let grain = p
            .grain_sectors
            .checked_mul(SECTOR)
            .ok_or_else(|| Error::invalid("grain size overflows"))?;
        let gt_bytes = p.gtes_per_gt * p.entry_size;
        let gt_sectors = gt_bytes.div_ceil(SECTOR);
        let file_len = p.storage.len();
        let cache_cap = (limits::TABLE_CACHE_BYTES / (p.gtes_per_gt * 8).max(1)).max(4) as usize;
        let mut s = SparseExtent {
            grain,
            gt_sectors,
            cache: Mutex::new(HashMap::new()),
            cache_cap,
            empty: Vec::new(),
            p,
        };
        s.validate(file_len)?;
        Ok(s)
    }

    fn gd_name(&self) -> String {
        format!("{} grain directory", self.p.label)
    }

    fn validate(&mut self, file_len: u64) -> Result<()> {
        // Grain tables: each inside the file, none named twice (which would let one table's
        // grains appear at many guest offsets).
        let mut gts: Vec<(u32, u64)> = Vec::new();
        for (i, &gt) in self.p.gd.iter().enumerate() {
            if gt == 0 {
                continue;
            }
            let start = u64::from(gt) * SECTOR;
            let end = start + self.gt_sectors * SECTOR;
            if end > file_len {
                return Err(VmdkError::PastEof {
                    table: format!("{} grain table {i}", self.p.label),
                    offset: start,
                    len: self.gt_sectors * SECTOR,
                    file_len,
                }
                .into());
            }
            if self.in_metadata(gt.into(), self.gt_sectors) {
                return Err(entry_err(
                    self.gd_name(),
                    i as u64,
                    gt.into(),
                    "grain table overlaps the header, descriptor or a directory",
                ));
            }
            gts.push((gt, i as u64));
        }
        gts.sort_unstable();
        for w in gts.windows(2) {
            if u64::from(w[1].0) < u64::from(w[0].0) + self.gt_sectors {
                return Err(entry_err(
                    self.gd_name(),
                    w[1].1,
                    w[1].0.into(),
                    "grain table overlaps another grain table",
                ));
            }
        }
        let gt_starts: Vec<u32> = gts.iter().map(|g| g.0).collect();

        let mut seen: Vec<u64> = Vec::new();
        let mut track = true;
        let mut buf = vec![0u8; (self.p.gtes_per_gt * self.p.entry_size) as usize];
        let mut empty = vec![false; self.p.gd.len()];
        // Where the file's next data starts, from SEEK_DATA: tables inside a hole are all
        // zero and need no read (qemu-img preallocates every table of a 2 TiB disk as holes).
        let mut hole = (0u64, 0u64);
        let mut data = (0u64, 0u64);
        for (gt_index, &gt) in self.p.gd.iter().enumerate() {
            if gt == 0 {
                continue;
            }
            let start = u64::from(gt) * SECTOR;
            let end = start + self.gt_sectors * SECTOR;
            let known = (start >= hole.0 && end <= hole.1) || (start >= data.0 && start < data.1);
            if !known {
                match self.p.storage.next_data(start) {
                    Ok(Some((s, e))) if s > start => {
                        hole = (start, s);
                        data = (s, e);
                    }
                    Ok(Some(d)) => data = d,
                    Ok(None) => hole = (start, u64::MAX),
                    Err(_) => {}
                }
            }
            if start >= hole.0 && end <= hole.1 {
                empty[gt_index] = true;
                continue;
            }
            let gt_index = gt_index as u64;
            read_exact(
                &*self.p.storage,
                &mut buf,
                start,
                format_args!("{} grain table {gt_index}", self.p.label),
            )?;
            if buf.iter().all(|&b| b == 0) {
                empty[gt_index as usize] = true;
                continue;
            }
            for e in 0..self.p.gtes_per_gt {
                let raw = self.raw_entry(&buf, e);
                let table = || format!("{} grain table {gt_index}", self.p.label);
                let g = gt_index * self.p.gtes_per_gt + e;
                let guest = g.saturating_mul(self.grain);
                let gte = self
                    .decode(raw)
                    .map_err(|why| entry_err(table(), e, raw, why))?;
                let sector = match gte {
                    Gte::Unallocated => continue,
                    Gte::Zero => continue,
                    Gte::At(s) => s,
                };
                if guest >= self.p.len {
                    // Entries past the extent's end are never read; VMware leaves them 0.
                    return Err(entry_err(
                        table(),
                        e,
                        raw,
                        "grain is past the end of the extent",
                    ));
                }
                let need = if self.compressed() {
                    GRAIN_MARKER_LEN as u64
                } else {
                    self.grain.min(self.p.len - guest)
                };
                let inside = sector
                    .checked_mul(SECTOR)
                    .and_then(|s| s.checked_add(need))
                    .is_some_and(|e| e <= file_len);
                if !inside {
                    return Err(entry_err(
                        table(),
                        e,
                        raw,
                        "grain is past the end of the file",
                    ));
                };
                if let Flavor::Hosted {
                    compressed: true,
                    markers: true,
                    ..
                } = self.p.flavor
                {
                    self.check_grain_marker(sector, g, guest)
                        .map_err(|why| entry_err(table(), e, raw, why))?;
                }
                let sectors = need.div_ceil(SECTOR);
                if self.in_metadata(sector, sectors)
                    || in_tables(&gt_starts, self.gt_sectors, sector, sectors)
                {
                    return Err(entry_err(table(), e, raw, "grain points into metadata"));
                }
                if track {
                    if seen.len() >= MAX_TRACKED_GRAINS {
                        track = false;
                        seen = Vec::new();
                    } else {
                        seen.push(sector);
                    }
                }
            }
        }
        self.empty = empty;
        if track {
            seen.sort_unstable();
            let min_gap = if self.compressed() {
                1
            } else {
                self.p.grain_sectors
            };
            if let Some(w) = seen.windows(2).find(|w| w[1] - w[0] < min_gap) {
                return Err(VmdkError::BadEntry {
                    table: format!("{} grain tables", self.p.label),
                    index: 0,
                    value: w[1],
                    why: "two grain entries share one grain",
                }
                .into());
            }
        }
        Ok(())
    }

    /// Reads the grain marker at `sector` and checks it names grain `g` and that its
    /// compressed bytes lie inside the file.
    fn check_grain_marker(
        &self,
        sector: u64,
        g: u64,
        guest: u64,
    ) -> std::result::Result<(), &'static str> {
        let mut m = [0u8; GRAIN_MARKER_LEN];
        let at = sector * SECTOR;
        if self.p.storage.read_exact_at(&mut m, at).is_err() {
            return Err("grain marker cannot be read");
        }
        let gm = GrainMarker::parse(&m);
        let size = u64::from(gm.size);
        if size == 0 || size > 2 * self.grain + 1024 {
            return Err("grain marker has an invalid size");
        }
        if at + GRAIN_MARKER_LEN as u64 + size > self.p.storage.len() {
            return Err("compressed grain extends past the end of the file");
        }
        if gm.lba != guest / SECTOR {
            let _ = g;
            return Err("grain marker names another grain");
        }
        Ok(())
    }

    fn in_metadata(&self, sector: u64, sectors: u64) -> bool {
        let end = sector.saturating_add(sectors);
        self.p.metadata.iter().any(|&(s, e)| s < end && sector < e)
    }

    fn compressed(&self) -> bool {
        matches!(
            self.p.flavor,
            Flavor::Hosted {
                compressed: true,
                ..
            }
        )
    }

    fn raw_entry(&self, buf: &[u8], i: u64) -> u64 {
        let at = (i * self.p.entry_size) as usize;
        if self.p.entry_size == 8 {
            LE::read_u64(&buf[at..])
        } else {
            LE::read_u32(&buf[at..]).into()
        }
    }

    fn decode(&self, raw: u64) -> std::result::Result<Gte, &'static str> {
        match self.p.flavor {
            Flavor::Hosted { zero_grain, .. } => match raw {
                0 => Ok(Gte::Unallocated),
                1 if zero_grain => Ok(Gte::Zero),
                s => Ok(Gte::At(s)),
            },
            Flavor::Cowd => Ok(if raw == 0 {
                Gte::Unallocated
            } else {
                Gte::At(raw)
            }),
            Flavor::SeSparse { grains_offset } => match raw >> 60 {
                0 if raw == 0 => Ok(Gte::Unallocated),
                0 => Err("unallocated seSparse entry with bits set"),
                1 | 2 => Ok(Gte::Zero),
                3 => {
                    let cluster = ((raw & 0x0fff_0000_0000_0000) >> 48)
                        | ((raw & 0x0000_ffff_ffff_ffff) << 12);
                    cluster
                        .checked_mul(self.p.grain_sectors)
                        .and_then(|c| c.checked_add(grains_offset))
                        .map(Gte::At)
                        .ok_or("seSparse grain offset overflows")
                }
                _ => Err("unknown seSparse entry type"),
            },
        }
    }

    fn table(&self, gt_index: u64) -> Result<Option<Arc<Vec<u64>>>> {
        if self.empty.get(gt_index as usize) == Some(&true) {
            return Ok(None);
        }
        let gt = match self.p.gd.get(gt_index as usize) {
            Some(&0) => return Ok(None),
            Some(&gt) => gt,
            None => {
                return Err(Error::corrupt(format!(
                    "{}: grain directory has no entry {gt_index}",
                    self.p.label
                )))
            }
        };
        if let Some(t) = self
            .cache
            .lock()
            .map_err(|_| Error::corrupt("grain table cache poisoned"))?
            .get(&gt_index)
        {
            return Ok(Some(t.clone()));
        }
        let mut buf = vec![0u8; (self.p.gtes_per_gt * self.p.entry_size) as usize];
        read_exact(
            &*self.p.storage,
            &mut buf,
            u64::from(gt) * SECTOR,
            format_args!("{} grain table {gt_index}", self.p.label),
        )?;
        let t: Arc<Vec<u64>> = Arc::new(
            (0..self.p.gtes_per_gt)
                .map(|i| self.raw_entry(&buf, i))
                .collect(),
        );
        let mut c = self
            .cache
            .lock()
            .map_err(|_| Error::corrupt("grain table cache poisoned"))?;
        if c.len() >= self.cache_cap {
            // Memory stays bounded; a sequential walk refills what it needs.
            c.clear();
        }
        c.insert(gt_index, t.clone());
        Ok(Some(t))
    }

    /// Maps `[off, off + max)` of the extent (extent-relative offsets), returning an extent
    /// whose `start` is `base + off`.
    pub fn map(&self, base: u64, off: u64, max: u64) -> Result<Extent> {
        let g = off / self.grain;
        let gt_index = g / self.p.gtes_per_gt;
        let gt_end_guest = ((gt_index + 1) * self.p.gtes_per_gt * self.grain).min(self.p.len);
        let limit = (off + max).min(gt_end_guest);
        let start = GuestOffset(base + off);
        let Some(t) = self.table(gt_index)? else {
            return Ok(Extent {
                start,
                len: limit - off,
                kind: MapKind::Unallocated,
            });
        };
        let first = (g % self.p.gtes_per_gt) as usize;
        let raw = t[first];
        let label = || format!("{} grain table {gt_index}", self.p.label);
        let gte = self
            .decode(raw)
            .map_err(|why| entry_err(label(), first as u64, raw, why))?;
        let grain_end = ((g + 1) * self.grain).min(self.p.len);
        match gte {
            Gte::Unallocated | Gte::Zero => {
                let mut end = grain_end.min(limit);
                let mut i = first + 1;
                while end < limit {
                    let next = self.decode(t[i]).unwrap_or(Gte::At(0));
                    if next != gte {
                        break;
                    }
                    end = (end + self.grain).min(limit);
                    i += 1;
                }
                let kind = if gte == Gte::Zero {
                    MapKind::Zero
                } else {
                    MapKind::Unallocated
                };
                Ok(Extent {
                    start,
                    len: end - off,
                    kind,
                })
            }
            Gte::At(sector) if self.compressed() => {
                let unit_start = g * self.grain;
                let unit_len = grain_end - unit_start;
                // Checked again: the table was re-read since it was validated.
                let host = sector.checked_mul(SECTOR).ok_or_else(|| {
                    entry_err(label(), first as u64, raw, "grain offset overflows")
                })?;
                let (offset, len) = match self.p.flavor {
                    Flavor::Hosted { markers: true, .. } => {
                        let mut m = [0u8; GRAIN_MARKER_LEN];
                        read_exact(
                            &*self.p.storage,
                            &mut m,
                            host,
                            format_args!("{} grain marker", self.p.label),
                        )?;
                        let gm = GrainMarker::parse(&m);
                        let size = u64::from(gm.size);
                        let body = host + GRAIN_MARKER_LEN as u64;
                        if size == 0 || size > 2 * self.grain + 1024 {
                            return Err(entry_err(
                                label(),
                                first as u64,
                                raw,
                                "grain marker has an invalid size",
                            ));
                        }
                        if body + size > self.p.storage.len() {
                            return Err(VmdkError::PastEof {
                                table: format!("{} compressed grain {g}", self.p.label),
                                offset: body,
                                len: size,
                                file_len: self.p.storage.len(),
                            }
                            .into());
                        }
                        if gm.lba != unit_start / SECTOR {
                            return Err(entry_err(
                                label(),
                                first as u64,
                                raw,
                                "grain marker names another grain",
                            ));
                        }
                        (body, size)
                    }
                    _ => (host, 2 * self.grain),
                };
                Ok(Extent {
                    start,
                    len: grain_end.min(limit) - off,
                    kind: MapKind::Compressed {
                        file: self.p.file,
                        offset: HostOffset(offset),
                        len,
                        codec: Codec::Zlib,
                        unit_start: GuestOffset(base + unit_start),
                        unit_len,
                    },
                })
            }
            Gte::At(sector) => {
                let in_grain = off - g * self.grain;
                let host = sector
                    .checked_mul(SECTOR)
                    .and_then(|h| h.checked_add(in_grain))
                    .ok_or_else(|| {
                        entry_err(label(), first as u64, raw, "grain offset overflows")
                    })?;
                let mut end = grain_end.min(limit);
                let mut i = first + 1;
                let mut next_sector = sector + self.p.grain_sectors;
                while end < limit {
                    match self.decode(t[i]) {
                        Ok(Gte::At(s)) if s == next_sector => {}
                        _ => break,
                    }
                    end = (end + self.grain).min(limit);
                    next_sector += self.p.grain_sectors;
                    i += 1;
                }
                Ok(Extent {
                    start,
                    len: end - off,
                    kind: MapKind::Data {
                        file: self.p.file,
                        offset: HostOffset(host),
                    },
                })
            }
        }
    }

    /// Bytes of directories this extent keeps in memory.
    pub fn metadata_bytes(&self) -> u64 {
        (self.p.gd.len() + self.p.rgd.as_ref().map_or(0, Vec::len)) as u64 * 4
    }

    /// Shares the table cache budget with `n - 1` other extents of the same image, so the
    /// image's cache stays within [`limits::TABLE_CACHE_BYTES`].
    pub fn share_cache(&mut self, n: usize) {
        self.cache_cap = (self.cache_cap / n.max(1)).max(4);
    }

    /// What `open` was given (the updater's view of the extent's tables).
    pub(super) fn params(&self) -> &SparseParams {
        &self.p
    }

    /// Grain size in bytes.
    pub fn grain_bytes(&self) -> u64 {
        self.grain
    }

    /// True when grains are compressed.
    pub fn is_compressed(&self) -> bool {
        self.compressed()
    }
}

/// True when `[sector, sector + sectors)` overlaps one of the grain tables starting at the
/// sorted `starts`, each `gt_sectors` long.
fn in_tables(starts: &[u32], gt_sectors: u64, sector: u64, sectors: u64) -> bool {
    let end = sector.saturating_add(sectors);
    // The last table starting before `end` is the only one that can overlap.
    let idx = starts.partition_point(|&s| u64::from(s) < end);
    idx > 0 && u64::from(starts[idx - 1]) + gt_sectors > sector
}

/// Reads a directory of `entries` u32 values at `sector`, checked against the file.
pub fn read_directory(
    storage: &dyn Storage,
    label: &str,
    what: &str,
    sector: u64,
    entries: u64,
) -> Result<Vec<u32>> {
    let bytes = entries
        .checked_mul(4)
        .ok_or_else(|| Error::invalid(format!("{label} {what} is too large")))?;
    let n = limits::check_table_bytes(&format!("{label} {what}"), bytes)?;
    let start = sector.checked_mul(SECTOR);
    let file_len = storage.len();
    match start {
        Some(s) if s.checked_add(bytes).is_some_and(|e| e <= file_len) => {
            let mut buf = vec![0u8; n];
            read_exact(storage, &mut buf, s, format_args!("{label} {what}"))?;
            Ok(buf.chunks_exact(4).map(LE::read_u32).collect())
        }
        _ => Err(VmdkError::PastEof {
            table: format!("{label} {what}"),
            offset: sector.saturating_mul(SECTOR),
            len: bytes,
            file_len,
        }
        .into()),
    }
}
