//! The qcow2 reader (opened by `open.rs`): answers `map()` with the
//! longest run of one kind by walking L1 and L2 tables (spec: "Cluster mapping", "Extended
//! L2 Entries"). L2 tables come through a bounded cache; each table is checked entry by entry
//! the first time it is loaded (reserved bits, alignment, end of file, metadata overlap, host
//! clusters shared by two guest clusters), so the walk itself can trust it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};

use byteorder::{BigEndian as BE, ByteOrder};

use super::error::Qcow2Error;
use super::header::*;
use super::meta::{MetaMap, SparseBits, SparseCounts};
use crate::error::{Error, ErrorKind, Result};
use crate::formats::Format;
use crate::limits;
use crate::mapping::{
    BackingRef, Codec, Extent, ExternalRef, FileId, FormatSpecific, GuestOffset, HostOffset,
    ImageReader, MapKind, RefRole, SnapshotInfo,
};
use crate::storage::{read_exact, Storage};

/// A persistent bitmap, as `info` and `measure` see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitmap {
    /// Name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// `BME_FLAG_*`.
    pub flags: u32,
    /// Offset of its bitmap table.
    pub table_offset: u64,
    /// Entries in its bitmap table.
    pub table_size: u32,
}

/// A snapshot table entry, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// What `info` shows.
    pub info: SnapshotInfo,
    /// The snapshot's L1 table offset.
    pub l1_table_offset: u64,
    /// The snapshot's L1 entries.
    pub l1_size: u32,
    /// Bytes of extra data the entry has (version 3 requires 16).
    pub extra_data_size: u32,
}

/// Reads a qcow2 image.
pub struct Qcow2Reader {
    pub(super) storage: Arc<dyn Storage>,
    pub(super) data_file: Option<Arc<dyn Storage>>,
    pub(super) data_file_name: Option<String>,
    /// Why the data file could not be opened (reads fail with it).
    pub(super) data_file_err: Option<(ErrorKind, String)>,
    pub(super) header: Header,
    /// The virtual size as QEMU sees it: the header's size rounded down to a sector.
    pub(super) vsize: u64,
    pub(super) g: Geometry,
    /// The active L1 table (raw entries, checked).
    pub(super) l1: Box<[u64]>,
    /// Length of the image file.
    pub(super) file_len: u64,
    /// Length of the file that holds guest data (the data file, or the image).
    pub(super) data_len: u64,
    /// The refcount table (raw entries).
    pub(super) reftable: Box<[u64]>,
    pub(super) snapshots: Vec<Snapshot>,
    /// Length of the snapshot table in bytes.
    pub(super) snapshots_len: u64,
    pub(super) bitmaps: Vec<Bitmap>,
    pub(super) bitmap_directory: Option<(u64, u64)>,
    /// The LUKS header's `(offset, length)` from the full disk encryption extension.
    pub(super) crypto: Option<(u64, u64)>,
    pub(super) backing: Option<BackingRef>,
    pub(super) meta: MetaMap,
    pub(super) cache: Mutex<Cache>,
    pub(super) warnings: Vec<String>,
    /// Bytes of metadata held for the image's life (tables, the metadata map, a full L2
    /// cache): what the sharing check's sets may grow to is the limit minus this.
    pub(super) resident: u64,
}

/// L2 tables in memory, plus what the sharing check has seen so far.
pub(super) struct Cache {
    pub(super) tables: HashMap<u64, (Arc<[u64]>, u64)>,
    pub(super) tick: u64,
    pub(super) capacity: usize,
    /// L1 indexes whose tables went through the sharing check.
    pub(super) registered: Vec<u64>,
    /// Host clusters used by standard (uncompressed) guest clusters.
    pub(super) used: SparseBits,
    /// Host clusters holding compressed data.
    pub(super) compressed: SparseBits,
    /// Per host cluster, how many compressed guest clusters of the active table use it.
    pub(super) compressed_refs: SparseCounts,
    /// The last refcount block read for the compressed-sharing check, by table index.
    pub(super) refblock: Option<(u64, Vec<u8>)>,
}

/// Reads `len` bytes at `offset` into a new buffer, zero-padded where the file ends first.
pub(super) fn read_padded(
    storage: &dyn Storage,
    offset: u64,
    len: usize,
    what: &str,
) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let avail = storage.len().saturating_sub(offset).min(len as u64) as usize;
    read_exact(storage, &mut buf[..avail], offset, what)?;
    Ok(buf)
}

pub(super) fn clusters_of(offset: u64, len: u64, cluster_bits: u32) -> (u64, u64) {
    let first = offset >> cluster_bits;
    let end = (offset + len).div_ceil(1u64 << cluster_bits);
    (first, end)
}

impl Qcow2Reader {
    /// Fails when the image cannot be read (its data file was refused).
    fn usable(&self) -> Result<()> {
        match &self.data_file_err {
            Some((kind, msg)) => Err(Error::msg(*kind, msg.clone())),
            None => Ok(()),
        }
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The L2 table of L1 entry `l1i`, loaded, checked and cached; `None` when unallocated.
    fn table(&self, l1i: u64) -> Result<Option<Arc<[u64]>>> {
        let Some(&entry) = self.l1.get(l1i as usize) else {
            return Ok(None);
        };
        let off = entry & L1E_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        {
            let mut c = self.lock()?;
            c.tick += 1;
            let tick = c.tick;
            if let Some((t, used)) = c.tables.get_mut(&l1i) {
                *used = tick;
                return Ok(Some(t.clone()));
            }
        }
        let cs = self.g.cluster_size as usize;
        let mut raw = vec![0u8; cs];
        read_exact(
            &*self.storage,
            &mut raw,
            off,
            format_args!("L2 table {l1i}"),
        )?;
        let words: Arc<[u64]> = raw.chunks_exact(8).map(BE::read_u64).collect();
        let hosts = self.check_table(l1i, off, &words)?;
        let mut c = self.lock()?;
        let word = (l1i / 64) as usize;
        let bit = 1u64 << (l1i % 64);
        if c.registered[word] & bit == 0 {
            for h in &hosts {
                match *h {
                    Use::Cluster { host, index } => {
                        let hc = host >> self.g.cluster_bits;
                        if c.used.test_and_set(hc) || c.compressed.get(hc) {
                            return Err(l2_err(
                                off,
                                index,
                                words_entry(&words, &self.g, index),
                                format!(
                                "host cluster {host:#x} is already used by another guest cluster"
                            ),
                            ));
                        }
                    }
                    Use::Compressed { first, last, index } => {
                        for hc in first..=last {
                            c.compressed.test_and_set(hc);
                            // Several compressed clusters may share a host cluster, as many
                            // as its refcount says (qemu-img check's rule): more references
                            // than that means two L2 entries name the same compressed data.
                            let n = c.compressed_refs.inc(hc);
                            if n >= 2 {
                                let rc = self.stored_refcount(&mut c, hc)?;
                                if u64::from(n) > rc {
                                    return Err(l2_err(
                                        off,
                                        index,
                                        words_entry(&words, &self.g, index),
                                        format!(
                                            "compressed data in host cluster {:#x} is used by {n} compressed clusters, more than its refcount of {rc}: it is shared with another L2 entry",
                                            hc << self.g.cluster_bits
                                        ),
                                    ));
                                }
                            }
                            if c.used.get(hc) {
                                return Err(l2_err(
                                    off,
                                    index,
                                    words_entry(&words, &self.g, index),
                                    format!(
                                    "compressed data at host cluster {:#x} overlaps a data cluster",
                                    hc << self.g.cluster_bits
                                ),
                                ));
                            }
                        }
                    }
                }
            }
            c.registered[word] |= bit;
            if c.used.memory() + c.compressed.memory() + c.compressed_refs.memory() + self.resident
                > limits::MAX_METADATA_BYTES
            {
                return Err(Error::unsupported(
                    "qcow2 image maps more clusters than vimg's metadata memory limit allows",
                ));
            }
        }
        if c.tables.len() >= c.capacity {
            if let Some(&oldest) = c
                .tables
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k)
            {
                c.tables.remove(&oldest);
            }
        }
        c.tick += 1;
        let tick = c.tick;
        c.tables.insert(l1i, (words.clone(), tick));
        Ok(Some(words))
    }

    /// The refcount the image stores for host cluster `hc` (0 where no refcount block
    /// covers it), reading refcount blocks through a one-block cache in `c`.
    fn stored_refcount(&self, c: &mut Cache, hc: u64) -> Result<u64> {
        let bits = self.g.refblock_bits;
        let rti = hc >> bits;
        let Some(&e) = self.reftable.get(rti as usize) else {
            return Ok(0);
        };
        let off = e & REFT_OFFSET_MASK;
        if off == 0 || !off.is_multiple_of(self.g.cluster_size) {
            return Ok(0);
        }
        if c.refblock.as_ref().is_none_or(|(k, _)| *k != rti) {
            let b = read_padded(
                &*self.storage,
                off,
                self.g.cluster_size as usize,
                "refcount block",
            )?;
            c.refblock = Some((rti, b));
        }
        Ok(c.refblock.as_ref().map_or(0, |(_, b)| {
            refcount_get(
                b,
                self.header.refcount_order,
                (hc & ((1u64 << bits) - 1)) as usize,
            )
        }))
    }

    pub(super) fn lock(&self) -> Result<std::sync::MutexGuard<'_, Cache>> {
        self.cache
            .lock()
            .map_err(|_| Error::msg(ErrorKind::Io, "qcow2 L2 cache lock poisoned"))
    }

    /// Checks every entry of the L2 table of L1 entry `l1i` (at `off`) that maps a guest
    /// cluster inside the disk; returns the host clusters the entries use.
    fn check_table(&self, l1i: u64, off: u64, words: &[u64]) -> Result<Vec<Use>> {
        let g = &self.g;
        let n = g.l2_entries();
        let first_cluster = l1i << g.l2_bits;
        let disk_clusters = self.vsize.div_ceil(g.cluster_size);
        let live = disk_clusters.saturating_sub(first_cluster).min(n);
        let data_file = self.data_file.is_some();
        let mut uses = Vec::new();
        let mut coffsets: Vec<(u64, u64)> = Vec::new();
        for i in 0..live {
            let (entry, bitmap) = entry_at(words, g, i);
            if entry == 0 && bitmap == 0 {
                // Unallocated: nothing to check.
                continue;
            }
            let c = decode_l2(entry, bitmap, g, self.header.version, data_file)
                .map_err(|why| l2_err(off, i, entry, why))?;
            if let Some(host) = c.host() {
                if data_file {
                    let guest = (first_cluster + i) << g.cluster_bits;
                    if host != guest {
                        return Err(l2_err(off, i, entry, format!(
                            "host offset {host:#x} differs from the guest offset {guest:#x}, as an external data file requires"
                        )));
                    }
                    if host >= self.data_len {
                        return Err(l2_err(
                            off,
                            i,
                            entry,
                            format!(
                                "host offset {host:#x} is past the end of the data file ({} bytes)",
                                self.data_len
                            ),
                        ));
                    }
                } else {
                    if host >= self.file_len {
                        return Err(l2_err(
                            off,
                            i,
                            entry,
                            format!(
                                "host offset {host:#x} is past the end of the file ({} bytes)",
                                self.file_len
                            ),
                        ));
                    }
                    let hc = host >> g.cluster_bits;
                    if self.meta.hits(hc, hc) {
                        return Err(l2_err(
                            off,
                            i,
                            entry,
                            format!("host cluster {host:#x} overlaps the image's metadata"),
                        ));
                    }
                    uses.push(Use::Cluster { host, index: i });
                }
            }
            if let Cluster::Compressed { offset, len } = c {
                if offset >= self.file_len {
                    return Err(l2_err(
                        off,
                        i,
                        entry,
                        format!(
                            "compressed data at {offset:#x} is past the end of the file ({} bytes)",
                            self.file_len
                        ),
                    ));
                }
                let (f, e) = clusters_of(offset, len, g.cluster_bits);
                if self.meta.hits(f, e - 1) {
                    return Err(l2_err(
                        off,
                        i,
                        entry,
                        format!("compressed data at {offset:#x} overlaps the image's metadata"),
                    ));
                }
                coffsets.push((offset, i));
                uses.push(Use::Compressed {
                    first: f,
                    last: e - 1,
                    index: i,
                });
            }
        }
        coffsets.sort_unstable();
        for w in coffsets.windows(2) {
            if w[0].0 == w[1].0 {
                let (entry, _) = entry_at(words, g, w[1].1);
                return Err(l2_err(
                    off,
                    w[1].1,
                    entry,
                    format!(
                        "compressed data at {:#x} is shared with entry {}",
                        w[0].0, w[0].1
                    ),
                ));
            }
        }
        Ok(uses)
    }

    fn codec(&self) -> Codec {
        if self.header.compression_type == COMPRESSION_ZSTD {
            Codec::Zstd
        } else {
            Codec::Deflate
        }
    }

    /// The persistent bitmaps (for `measure`).
    pub fn bitmaps(&self) -> &[Bitmap] {
        &self.bitmaps
    }

    /// The parsed snapshot table.
    pub fn snapshot_table(&self) -> &[Snapshot] {
        &self.snapshots
    }
}

/// A host cluster (or range) one L2 entry uses, for the sharing check.
enum Use {
    Cluster { host: u64, index: u64 },
    Compressed { first: u64, last: u64, index: u64 },
}

fn l2_err(table: u64, index: u64, value: u64, why: impl std::fmt::Display) -> Error {
    Qcow2Error::L2Entry {
        table,
        index,
        value,
        why: why.to_string(),
    }
    .into()
}

/// Entry `i` of an L2 table and its subcluster bitmap (0 without extended L2).
fn entry_at(words: &[u64], g: &Geometry, i: u64) -> (u64, u64) {
    if g.extended_l2 {
        let at = (2 * i) as usize;
        (
            words.get(at).copied().unwrap_or(0),
            words.get(at + 1).copied().unwrap_or(0),
        )
    } else {
        (words.get(i as usize).copied().unwrap_or(0), 0)
    }
}

fn words_entry(words: &[u64], g: &Geometry, i: u64) -> u64 {
    entry_at(words, g, i).0
}

/// A run being assembled by `map`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Run {
    Unallocated,
    /// Reads as zeros; `host` is where the run's first byte still has a preallocated
    /// cluster (the zero flag on an allocated cluster), which `map` reports as qemu-img does.
    Zero {
        host: Option<u64>,
    },
    Data {
        file: FileId,
        host: u64,
    },
}

struct Acc {
    run: Option<(Run, u64)>,
}

impl Acc {
    /// Adds `len` bytes of `run`; false when it does not continue the current run.
    fn add(&mut self, run: Run, len: u64) -> bool {
        match &mut self.run {
            None => {
                self.run = Some((run, len));
                true
            }
            Some((cur, n)) => {
                let cont = match (*cur, run) {
                    (Run::Unallocated, Run::Unallocated) => true,
                    (Run::Zero { host: h1 }, Run::Zero { host: h2 }) => match (h1, h2) {
                        (None, None) => true,
                        (Some(a), Some(b)) => a + *n == b,
                        _ => false,
                    },
                    (Run::Data { file: f1, host: h1 }, Run::Data { file: f2, host: h2 }) => {
                        f1 == f2 && h1 + *n == h2
                    }
                    _ => false,
                };
                if cont {
                    *n += len;
                }
                cont
            }
        }
    }
}

impl Qcow2Reader {
    fn data_file_id(&self) -> FileId {
        if self.data_file.is_some() {
            FileId(1)
        } else {
            FileId(0)
        }
    }

    /// Adds data at `host`, splitting off what lies past the end of the data file (which
    /// reads as zeros, as QEMU reads it).
    fn add_data(&self, acc: &mut Acc, host: u64, len: u64) -> bool {
        let avail = self.data_len.saturating_sub(host);
        let file = self.data_file_id();
        if avail >= len {
            return acc.add(Run::Data { file, host }, len);
        }
        if avail > 0 && !acc.add(Run::Data { file, host }, avail) {
            return false;
        }
        acc.add(Run::Zero { host: None }, len - avail)
    }
}

impl Qcow2Reader {
    /// [`ImageReader::map`], also returning where a zero run still has host space.
    fn map_run(&self, offset: GuestOffset, max_len: u64) -> Result<(Extent, Option<u64>)> {
        self.usable()?;
        let start = offset.get();
        let end = start.saturating_add(max_len).min(self.vsize);
        if start >= end {
            return Err(Error::invalid_argument(format!(
                "qcow2 map at {start:#x} is outside the virtual disk"
            )));
        }
        let g = &self.g;
        let cb = g.cluster_bits;
        let cs = g.cluster_size;
        let span_bits = g.l2_bits + cb;
        let mut acc = Acc { run: None };
        let mut pos = start;
        'outer: while pos < end {
            let l1i = pos >> span_bits;
            let l1_end = ((l1i + 1) << span_bits).min(end);
            let Some(t) = self.table(l1i)? else {
                if !acc.add(Run::Unallocated, l1_end - pos) {
                    break;
                }
                pos = l1_end;
                continue;
            };
            while pos < l1_end {
                let cstart = pos & !(cs - 1);
                let cend = (cstart + cs).min(l1_end);
                let idx = (pos >> cb) & (g.l2_entries() - 1);
                let (entry, bitmap) = entry_at(&t, g, idx);
                if entry == 0 && bitmap == 0 {
                    // Unallocated: find the end of the run of all-zero entries in one pass
                    // over the words, so a sparse table costs a scan, not a decode per entry.
                    let step = if g.extended_l2 { 2 } else { 1 };
                    let last = ((l1_end - 1) >> cb) & (g.l2_entries() - 1);
                    let (from, to) = ((idx * step) as usize, ((last + 1) * step) as usize);
                    let words = t.get(from..to).unwrap_or(&[]);
                    let zero_words = words.iter().position(|&w| w != 0).unwrap_or(words.len());
                    let entries = (zero_words as u64 / step).max(1);
                    let run_end = cstart.saturating_add(entries << cb).min(l1_end);
                    if !acc.add(Run::Unallocated, run_end - pos) {
                        break 'outer;
                    }
                    pos = run_end;
                    continue;
                }
                let c = decode_l2(
                    entry,
                    bitmap,
                    g,
                    self.header.version,
                    self.data_file.is_some(),
                )
                .map_err(|why| l2_err(self.l1[l1i as usize] & L1E_OFFSET_MASK, idx, entry, why))?;
                let ok = match c {
                    Cluster::Unallocated => acc.add(Run::Unallocated, cend - pos),
                    Cluster::Zero { host } => acc.add(
                        Run::Zero {
                            host: host.map(|h| h + (pos - cstart)),
                        },
                        cend - pos,
                    ),
                    Cluster::Normal { host } => {
                        self.add_data(&mut acc, host + (pos - cstart), cend - pos)
                    }
                    Cluster::Compressed { offset, len } => {
                        if acc.run.is_none() {
                            return Ok((
                                Extent {
                                    start: GuestOffset(start),
                                    len: cend - pos,
                                    kind: MapKind::Compressed {
                                        file: FileId(0),
                                        offset: HostOffset(offset),
                                        len,
                                        codec: self.codec(),
                                        unit_start: GuestOffset(cstart),
                                        unit_len: cs,
                                    },
                                },
                                None,
                            ));
                        }
                        false
                    }
                    Cluster::Sub { host, alloc, zero } => {
                        let scs = g.subcluster_size;
                        let mut ok = true;
                        while pos < cend {
                            let sc = (pos - cstart) / scs;
                            let sc_end = (cstart + (sc + 1) * scs).min(cend);
                            let bit = 1u32 << sc;
                            let n = sc_end - pos;
                            ok = if alloc & bit != 0 {
                                let h = host.unwrap_or(0) + (pos - cstart);
                                self.add_data(&mut acc, h, n)
                            } else if zero & bit != 0 {
                                acc.add(
                                    Run::Zero {
                                        host: host.map(|h| h + (pos - cstart)),
                                    },
                                    n,
                                )
                            } else {
                                acc.add(Run::Unallocated, n)
                            };
                            if !ok {
                                break;
                            }
                            pos = sc_end;
                        }
                        if !ok {
                            break 'outer;
                        }
                        continue;
                    }
                };
                if !ok {
                    break 'outer;
                }
                pos = cend;
            }
        }
        let Some((run, len)) = acc.run else {
            return Err(Error::corrupt(format!(
                "qcow2 map at {start:#x} found nothing"
            )));
        };
        let zero_host = match run {
            Run::Zero { host } => host,
            _ => None,
        };
        let kind = match run {
            Run::Unallocated => MapKind::Unallocated,
            Run::Zero { .. } => MapKind::Zero,
            Run::Data { file, host } => MapKind::Data {
                file,
                offset: HostOffset(host),
            },
        };
        Ok((
            Extent {
                start: offset,
                len,
                kind,
            },
            zero_host,
        ))
    }
}

impl ImageReader for Qcow2Reader {
    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn virtual_size(&self) -> u64 {
        self.vsize
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.g.cluster_size)
    }

    fn map(&self, offset: GuestOffset, max_len: u64) -> Result<Extent> {
        self.map_run(offset, max_len).map(|(e, _)| e)
    }

    fn load_snapshot(&mut self, id: Option<&str>, name: Option<&str>) -> Result<()> {
        Qcow2Reader::load_snapshot(self, id, name)
    }

    fn zero_location(&self, e: &Extent) -> Option<(FileId, HostOffset)> {
        match self.map_run(e.start, e.len) {
            Ok((_, Some(h))) => Some((self.data_file_id(), HostOffset(h))),
            _ => None,
        }
    }

    fn file(&self, id: FileId) -> Option<&Arc<dyn Storage>> {
        match id.0 {
            0 => Some(&self.storage),
            1 => self.data_file.as_ref(),
            _ => None,
        }
    }

    fn files(&self) -> Vec<Arc<dyn Storage>> {
        let mut v = vec![self.storage.clone()];
        v.extend(self.data_file.clone());
        v
    }

    fn backing(&self) -> Option<&BackingRef> {
        self.backing.as_ref()
    }

    fn allocated_size(&self) -> Option<u64> {
        // As qemu-img: the image file, not its external data file.
        self.storage.disk_usage()
    }

    fn external_refs(&self) -> Vec<ExternalRef> {
        let mut v = Vec::new();
        if let Some(b) = &self.backing {
            v.push(b.external_ref());
        }
        if let Some(d) = &self.data_file_name {
            v.push(ExternalRef {
                field: "data_file".into(),
                name: d.clone(),
                role: RefRole::Data,
            });
        }
        v
    }

    fn dirty(&self) -> bool {
        self.header.incompatible_features & INCOMPAT_DIRTY != 0
    }

    fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.snapshots.iter().map(|s| s.info.clone()).collect()
    }

    fn format_specific(&self) -> Option<FormatSpecific> {
        let h = &self.header;
        let mut m = Map::new();
        let v3 = h.version >= 3;
        m.insert("compat".into(), json!(if v3 { "1.1" } else { "0.10" }));
        m.insert(
            "compression-type".into(),
            json!(if h.compression_type == COMPRESSION_ZSTD {
                "zstd"
            } else {
                "zlib"
            }),
        );
        if v3 {
            m.insert(
                "lazy-refcounts".into(),
                json!(h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0),
            );
        }
        if v3 && !self.bitmaps.is_empty() {
            let list: Vec<Value> = self
                .bitmaps
                .iter()
                .map(|b| {
                    let mut flags = Vec::new();
                    if b.flags & BME_FLAG_IN_USE != 0 {
                        flags.push("in-use");
                    }
                    if b.flags & BME_FLAG_AUTO != 0 {
                        flags.push("auto");
                    }
                    json!({"flags": flags, "name": b.name, "granularity": b.granularity})
                })
                .collect();
            m.insert("bitmaps".into(), Value::Array(list));
        }
        m.insert("refcount-bits".into(), json!(1u64 << h.refcount_order));
        // An image with a data file the user named (`data-file.filename`) may store no
        // name; qemu-img then shows `data-file-raw` alone.
        if h.incompatible_features & INCOMPAT_DATA_FILE != 0 {
            if let Some(d) = &self.data_file_name {
                m.insert("data-file".into(), json!(d));
            }
            m.insert(
                "data-file-raw".into(),
                json!(h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0),
            );
        }
        if v3 {
            m.insert(
                "corrupt".into(),
                json!(h.incompatible_features & INCOMPAT_CORRUPT != 0),
            );
            m.insert("extended-l2".into(), json!(h.extended_l2()));
        }
        Some(FormatSpecific {
            kind: "qcow2".into(),
            data: m,
        })
    }

    fn warnings(&self) -> Vec<String> {
        self.warnings.clone()
    }

    fn persistent_bitmaps(&self) -> Option<Vec<(String, u64)>> {
        (self.header.version >= 3).then(|| {
            self.bitmaps
                .iter()
                .map(|b| (b.name.clone(), b.granularity))
                .collect()
        })
    }

    fn check(&self) -> Result<crate::check::CheckReport> {
        self.usable()?;
        super::check::check(self)
    }
}
