//! Opening a Parallels image: the header, every BAT entry and the Format Extension (dirty
//! bitmaps) checked, each cluster claimed once (QEMU's docs/interop/parallels.rst).
//! `read.rs` answers `map` from the BAT alone.

use std::sync::Arc;

use md5::{Digest, Md5};

use super::error::ParallelsError;
use super::header::{
    self, DirtyBitmap, ExtHeader, FeatureHeader, Header, DIRTY_BITMAP_SIZE, EXT_HEADER_SIZE,
    EXT_MAGIC, FEATURE_DIRTY_BITMAP, FEATURE_END, FEATURE_HEADER_SIZE, FEATURE_NECESSARY,
    HEADER_SIZE, MAGIC_V1, MAGIC_V2, SECTOR, VERSION,
};
use super::read::{BitmapInfo, ParallelsReader};
use crate::error::Result;
use crate::limits;
use crate::storage::{read_exact, Storage};

/// QEMU's limit on the cluster size in sectors ("Invalid image: Too big cluster").
pub const MAX_TRACKS: u32 = i32::MAX as u32 / 513;
/// QEMU's limit on BAT entries ("Catalog too large").
pub const MAX_BAT_ENTRIES: u32 = i32::MAX as u32 / 4;

fn field(field: &'static str, at: u64, value: u64, why: impl Into<String>) -> ParallelsError {
    ParallelsError::Field {
        field,
        at,
        value,
        why: why.into(),
    }
}

fn escape(b: &[u8]) -> String {
    b.iter()
        .flat_map(|c| std::ascii::escape_default(*c))
        .map(char::from)
        .collect()
}

/// Who claims a cluster of the file besides the BAT (all claims are one cluster long).
#[derive(Clone, Copy, Debug)]
enum Who {
    /// The Format Extension cluster.
    Ext,
    /// Cluster `l1` of dirty bitmap number `bitmap`.
    Bitmap(u32, u32),
}

/// A cluster of the file claimed by the extension or a bitmap (BAT clusters are checked
/// from the BAT itself, sorted by index, to keep the memory at 4 bytes per entry).
struct Claim {
    start: u64,
    who: Who,
}

impl ParallelsReader {
    /// Opens the Parallels image in `storage`.
    pub fn open(storage: Arc<dyn Storage>) -> Result<ParallelsReader> {
        // QEMU sees the file in whole sectors (its length rounded up, the tail reading as
        // zeros): a data offset or a cluster ending inside the last partial sector is
        // inside the image, as `check -r` (update.rs) judges it.
        let storage: Arc<dyn Storage> = Arc::new(crate::storage::SectorPadded::new(storage));
        let len = storage.len();
        if len < HEADER_SIZE as u64 {
            return Err(ParallelsError::TooShort { len }.into());
        }
        let mut hb = [0u8; HEADER_SIZE];
        read_exact(&*storage, &mut hb, 0, "Parallels header")?;
        let header = Header::parse(&hb)?;
        if header.version != VERSION || (header.magic != MAGIC_V1 && header.magic != MAGIC_V2) {
            return Err(ParallelsError::Signature {
                magic: escape(&header.magic),
                version: header.version,
            }
            .into());
        }
        if header.tracks == 0 {
            return Err(field("cluster size (tracks)", 0x1c, 0, "zero sectors per cluster").into());
        }
        if header.tracks > MAX_TRACKS {
            return Err(ParallelsError::Unsupported {
                field: "cluster size (tracks)",
                at: 0x1c,
                value: header.tracks.into(),
                why: format!("at most {MAX_TRACKS} sectors are supported (QEMU: too big cluster)"),
            }
            .into());
        }
        if header.bat_entries > MAX_BAT_ENTRIES {
            return Err(ParallelsError::Unsupported {
                field: "BAT entries",
                at: 0x20,
                value: header.bat_entries.into(),
                why: format!("at most {MAX_BAT_ENTRIES} are supported (QEMU: catalog too large)"),
            }
            .into());
        }
        let cluster_size = u64::from(header.tracks) * SECTOR;
        let nb_sectors = if header.is_ext() {
            header.nb_sectors
        } else {
            header.nb_sectors & 0xffff_ffff
        };
        let virtual_size = nb_sectors
            .checked_mul(SECTOR)
            .filter(|v| *v <= i64::MAX as u64)
            .ok_or_else(|| field("disk size (nb_sectors)", 0x24, nb_sectors, "too large"))?;
        let multiplier = if header.is_ext() {
            u64::from(header.tracks)
        } else {
            1
        };
        let bat_bytes = u64::from(header.bat_entries) * 4;
        let bat_end = HEADER_SIZE as u64 + bat_bytes;
        if bat_end > len {
            return Err(ParallelsError::BatPastEof {
                bytes: bat_bytes,
                entries: header.bat_entries,
                len,
            }
            .into());
        }
        // Where data may start: right after the BAT (rounded to sectors; to clusters for
        // "WithouFreSpacExt"), or data_off when set.
        let mut min_off = bat_end.div_ceil(SECTOR);
        if header.is_ext() {
            min_off = min_off.div_ceil(u64::from(header.tracks)) * u64::from(header.tracks);
        }
        let data_start = if header.data_off == 0 {
            if header.is_ext() {
                return Err(field(
                    "data offset (data_off)",
                    0x30,
                    0,
                    "a WithouFreSpacExt image must give its data offset",
                )
                .into());
            }
            min_off * SECTOR
        } else {
            let d = u64::from(header.data_off);
            if d < min_off {
                return Err(field(
                    "data offset (data_off)",
                    0x30,
                    d,
                    format!("in sectors, it lies before {min_off} (the header and BAT end at {bat_end:#x}; a WithouFreSpacExt data area starts on a cluster)"),
                )
                .into());
            }
            if d * SECTOR > len {
                return Err(field(
                    "data offset (data_off)",
                    0x30,
                    d,
                    format!("in sectors, it lies past the end of the file ({len:#x} bytes)"),
                )
                .into());
            }
            d * SECTOR
        };
        let n = limits::check_table_bytes("Parallels BAT", bat_bytes)?;
        let mut raw = vec![0u8; n];
        read_exact(&*storage, &mut raw, HEADER_SIZE as u64, "Parallels BAT")?;
        let bat = header::parse_bat(&raw, header.bat_entries as usize);
        drop(raw);

        let mut used: Vec<u32> = Vec::new();
        for (i, &v) in bat.iter().enumerate() {
            if v == 0 {
                continue;
            }
            let start = u64::from(v) * multiplier * SECTOR;
            let end = start + cluster_size;
            let entry = |why: String| ParallelsError::Entry {
                index: i as u32,
                at: HEADER_SIZE as u64 + 4 * i as u64,
                value: v,
                start,
                end,
                why,
            };
            if start < data_start {
                return Err(entry(format!(
                    "lies before the data area (which starts at {data_start:#x})"
                ))
                .into());
            }
            if end > len {
                return Err(
                    entry(format!("lies past the end of the file ({len:#x} bytes)")).into(),
                );
            }
            used.push(i as u32);
        }
        let mut reader = ParallelsReader {
            storage,
            header,
            virtual_size,
            cluster_size,
            multiplier,
            data_start,
            bat,
            bitmaps: Vec::new(),
        };
        let mut claims: Vec<Claim> = Vec::new();
        if reader.header.ext_off != 0 {
            reader.read_extension(len, &mut claims)?;
        }
        reader.check_overlaps(used, claims)?;
        Ok(reader)
    }

    fn bat_start(&self, i: u32) -> u64 {
        u64::from(self.bat[i as usize]) * self.multiplier * SECTOR
    }

    fn who(&self, w: Who) -> String {
        match w {
            Who::Ext => "Format Extension cluster".to_string(),
            Who::Bitmap(b, l) => format!(
                "dirty bitmap {} cluster {l}",
                self.bitmaps
                    .get(b as usize)
                    .map(|x| x.id.as_str())
                    .unwrap_or("?")
            ),
        }
    }

    /// Every cluster is claimed once: BAT clusters (sorted by where they are), the
    /// extension cluster and bitmap clusters must not overlap one another.
    fn check_overlaps(&self, mut used: Vec<u32>, mut claims: Vec<Claim>) -> Result<()> {
        let cs = self.cluster_size;
        let overlap = |first: String, a: u64, second: String, b: u64| ParallelsError::Overlap {
            first,
            a,
            a_end: a + cs,
            second,
            b,
            b_end: b + cs,
        };
        used.sort_unstable_by_key(|i| self.bat_start(*i));
        for w in used.windows(2) {
            let (a, b) = (self.bat_start(w[0]), self.bat_start(w[1]));
            if b < a + cs {
                return Err(overlap(
                    format!("BAT entry {}", w[0]),
                    a,
                    format!("BAT entry {}", w[1]),
                    b,
                )
                .into());
            }
        }
        claims.sort_by_key(|c| c.start);
        for w in claims.windows(2) {
            if w[1].start < w[0].start + cs {
                return Err(overlap(
                    self.who(w[0].who),
                    w[0].start,
                    self.who(w[1].who),
                    w[1].start,
                )
                .into());
            }
        }
        for c in &claims {
            // The BAT cluster starting last at or before this claim's end.
            let k = used.partition_point(|i| self.bat_start(*i) < c.start + cs);
            if let Some(&i) = k.checked_sub(1).and_then(|k| used.get(k)) {
                let a = self.bat_start(i);
                if a + cs > c.start {
                    return Err(
                        overlap(format!("BAT entry {i}"), a, self.who(c.who), c.start).into(),
                    );
                }
            }
        }
        Ok(())
    }

    /// Reads and checks the Format Extension cluster, recording its dirty bitmaps and the
    /// clusters it and they occupy.
    fn read_extension(&mut self, len: u64, claims: &mut Vec<Claim>) -> Result<()> {
        let cs = self.cluster_size;
        let ext_off = self.header.ext_off;
        let at = ext_off
            .checked_mul(SECTOR)
            .ok_or_else(|| field("extension offset (ext_off)", 0x38, ext_off, "too large"))?;
        if at < self.data_start || at.checked_add(cs).is_none_or(|e| e > len) {
            return Err(field(
                "extension offset (ext_off)",
                0x38,
                ext_off,
                format!(
                    "in sectors, its cluster must lie in the data area ({:#x}..{len:#x})",
                    self.data_start
                ),
            )
            .into());
        }
        let n = limits::check_table_bytes("Parallels Format Extension", cs)?;
        let mut ext = vec![0u8; n];
        read_exact(&*self.storage, &mut ext, at, "Parallels Format Extension")?;
        let eh = ExtHeader::parse(&ext);
        let bad = |off: usize, why: String| ParallelsError::Extension {
            at: at + off as u64,
            why,
        };
        if eh.magic != EXT_MAGIC {
            return Err(bad(
                0,
                format!("magic is {:#018x}, expected {EXT_MAGIC:#018x}", eh.magic),
            )
            .into());
        }
        let sum: [u8; 16] = Md5::digest(&ext[EXT_HEADER_SIZE..]).into();
        if sum != eh.checksum && !cfg!(fuzzing) {
            return Err(bad(8, "MD5 checksum does not match the cluster".to_string()).into());
        }
        claims.push(Claim {
            start: at,
            who: Who::Ext,
        });
        let mut pos = EXT_HEADER_SIZE;
        loop {
            if pos + FEATURE_HEADER_SIZE > ext.len() {
                return Err(bad(
                    pos,
                    "feature list runs past the cluster without an end marker".into(),
                )
                .into());
            }
            let fh = FeatureHeader::parse(&ext[pos..]);
            if fh.magic == FEATURE_END {
                break;
            }
            let data_at = pos + FEATURE_HEADER_SIZE;
            let data_end = data_at
                .checked_add(fh.data_size as usize)
                .filter(|e| *e <= ext.len())
                .ok_or_else(|| {
                    bad(
                        pos + 16,
                        format!(
                            "feature data size {:#x} runs past the cluster",
                            fh.data_size
                        ),
                    )
                })?;
            let data = &ext[data_at..data_end];
            match fh.magic {
                FEATURE_DIRTY_BITMAP => self.read_bitmap(data, at + data_at as u64, len, claims)?,
                m if fh.flags & FEATURE_NECESSARY != 0 => {
                    return Err(ParallelsError::NecessaryFeature {
                        magic: m,
                        at: at + pos as u64,
                        flags: fh.flags,
                    }
                    .into())
                }
                // Unknown and not necessary: the image reads the same without it.
                _ => {}
            }
            pos = data_end.next_multiple_of(8);
        }
        Ok(())
    }

    fn read_bitmap(
        &mut self,
        data: &[u8],
        at: u64,
        len: u64,
        claims: &mut Vec<Claim>,
    ) -> Result<()> {
        let bad = |off: u64, why: String| ParallelsError::Extension { at: at + off, why };
        if data.len() < DIRTY_BITMAP_SIZE {
            return Err(bad(
                0,
                format!(
                    "dirty bitmap feature is {} bytes, less than {DIRTY_BITMAP_SIZE}",
                    data.len()
                ),
            )
            .into());
        }
        let b = DirtyBitmap::parse(data);
        if b.granularity == 0 || !b.granularity.is_power_of_two() {
            return Err(bad(
                24,
                format!(
                    "dirty bitmap granularity {:#x} is not a power of two",
                    b.granularity
                ),
            )
            .into());
        }
        let l1_bytes = u64::from(b.l1_size) * 8;
        if DIRTY_BITMAP_SIZE as u64 + l1_bytes > data.len() as u64 {
            return Err(bad(
                28,
                format!(
                    "dirty bitmap L1 table of {} entries runs past its feature data",
                    b.l1_size
                ),
            )
            .into());
        }
        let l1 = &data[DIRTY_BITMAP_SIZE..];
        let id = uuid::Uuid::from_bytes(b.id).to_string();
        for i in 0..b.l1_size as usize {
            let e = header::l1_entry(l1, i);
            // 0: all clear, 1: all set, else the bitmap cluster's offset in sectors.
            if e <= 1 {
                continue;
            }
            let start = e.checked_mul(SECTOR).filter(|s| *s >= self.data_start);
            let Some(start) =
                start.filter(|s| s.checked_add(self.cluster_size).is_some_and(|e| e <= len))
            else {
                return Err(bad(
                    DIRTY_BITMAP_SIZE as u64 + 8 * i as u64,
                    format!("dirty bitmap {id} L1 entry {i} is {e:#x}: its cluster lies outside the data area"),
                )
                .into());
            };
            claims.push(Claim {
                start,
                who: Who::Bitmap(self.bitmaps.len() as u32, i as u32),
            });
        }
        self.bitmaps.push(BitmapInfo {
            id,
            granularity: u64::from(b.granularity) * SECTOR,
            size: b.size,
        });
        Ok(())
    }
}
