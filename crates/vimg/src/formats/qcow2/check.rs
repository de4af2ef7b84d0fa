//! `vimg check` for qcow2: the refcount verification `qemu-img check` does, with the same
//! counts. Every host cluster the metadata references (header, L1 and L2 tables, data and
//! compressed clusters, snapshots, refcount structures, bitmaps) is counted, and the counts
//! are compared with the refcounts the image stores: a stored refcount below the references
//! is a corruption, above them a leak. Then the copied flags (bit 63) of the active tables
//! are compared with the stored refcounts.
//!
//! Tables are read here directly (not through the reader's checked cache), because the point
//! is to report broken entries, not to refuse them. Reads past the end of the file give
//! zeros, as they do for QEMU.

use std::collections::{BTreeMap, HashMap};

use byteorder::{BigEndian as BE, ByteOrder};

use super::header::*;
use super::read::Qcow2Reader;
use crate::check::CheckReport;
use crate::error::{Error, Result};
use crate::limits;
use crate::storage::Storage;

/// Bitmap table entries: bits 9-55 hold the data cluster offset.
const BME_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bitmap table entries: reserved bits.
const BME_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;

/// Computed reference counts, one per host cluster.
struct Refs {
    counts: Vec<u16>,
    /// Counts that do not fit in 16 bits.
    big: HashMap<u64, u64>,
    max: u64,
}

impl Refs {
    fn get(&self, i: u64) -> u64 {
        match self.counts.get(i as usize) {
            Some(&u16::MAX) => self.big.get(&i).copied().unwrap_or(u64::from(u16::MAX)),
            Some(&c) => u64::from(c),
            None => 0,
        }
    }

    fn set(&mut self, i: u64, v: u64) -> Result<()> {
        let i_us = i as usize;
        if i_us >= self.counts.len() {
            grow(&mut self.counts, i_us + 1)?;
        }
        if v >= u64::from(u16::MAX) {
            self.counts[i_us] = u16::MAX;
            self.big.insert(i, v);
        } else {
            self.counts[i_us] = v as u16;
        }
        Ok(())
    }

    fn len(&self) -> u64 {
        self.counts.len() as u64
    }
}

fn grow(v: &mut Vec<u16>, n: usize) -> Result<()> {
    if (n as u64) * 2 > limits::MAX_METADATA_BYTES {
        return Err(Error::unsupported(format!(
            "checking {n} host clusters needs more memory than vimg's metadata limit"
        )));
    }
    v.resize(n, 0);
    Ok(())
}

struct Checker<'a> {
    r: &'a Qcow2Reader,
    g: Geometry,
    file_len: u64,
    refs: Refs,
    rep: CheckReport,
    allocated: u64,
    fragmented: u64,
    compressed: u64,
    /// The last refcount block read, by refcount table index.
    block: Option<(u64, Vec<u8>)>,
    /// What a repair needs: see [`Findings`].
    found: Findings,
}

/// The mismatches a check found, in the form a repair (`update.rs`) acts on.
#[derive(Default)]
pub(super) struct Findings {
    /// `(host cluster, stored refcount, counted references)` where the two differ and the
    /// stored refcount could be read.
    pub refcounts: Vec<(u64, u64, u64)>,
    /// `(file offset of an active L1 or L2 entry, the entry with its copied flag fixed)`.
    pub copied: Vec<(u64, u64)>,
}

/// Reads `len` bytes at `off`, zero-padded past the end of the file.
fn pread(s: &dyn Storage, off: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    if off < s.len() {
        let n = (s.len() - off).min(len as u64) as usize;
        s.read_exact_at(&mut buf[..n], off)
            .map_err(|e| Error::io(format_args!("read metadata at {off:#x}"), e))?;
    }
    Ok(buf)
}

fn words(b: &[u8]) -> impl Iterator<Item = u64> + '_ {
    b.chunks_exact(8).map(BE::read_u64)
}

/// The cluster types of QEMU's `qcow2_get_cluster_type`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Compressed,
    ZeroPlain,
    ZeroAlloc,
    Normal,
    Unallocated,
}

impl Checker<'_> {
    fn kind(&self, e: u64) -> Kind {
        if e & OFLAG_COMPRESSED != 0 {
            Kind::Compressed
        } else if e & OFLAG_ZERO != 0 && !self.g.extended_l2 {
            if e & L2E_OFFSET_MASK != 0 {
                Kind::ZeroAlloc
            } else {
                Kind::ZeroPlain
            }
        } else if e & L2E_OFFSET_MASK == 0 {
            if self.r.data_file.is_some() && e & OFLAG_COPIED != 0 {
                Kind::Normal
            } else {
                Kind::Unallocated
            }
        } else {
            Kind::Normal
        }
    }

    /// Counts one reference to every cluster of `[offset, offset + size)`.
    fn inc(&mut self, offset: u64, size: u64) -> Result<()> {
        self.inc_n(offset, size, 1)
    }

    /// Counts `n` references to every cluster of `[offset, offset + size)`, as `n` calls of
    /// QEMU's `inc_refcounts` would, in one step per cluster.
    fn inc_n(&mut self, offset: u64, size: u64, n: u64) -> Result<()> {
        if size == 0 || n == 0 {
            return Ok(());
        }
        let cs = self.g.cluster_size;
        // The last cluster may be partly past the end of the file, not more.
        if i128::from(offset) + i128::from(size) - i128::from(self.file_len) >= i128::from(cs) {
            self.rep.corruptions_n(n, || format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {offset:#x} size {size:#x}"
            ));
            return Ok(());
        }
        let first = offset >> self.g.cluster_bits;
        let last = (offset + size - 1) >> self.g.cluster_bits;
        for k in first..=last {
            let c = self.refs.get(k);
            let max = self.refs.max;
            // QEMU reports each increment that finds the count at its maximum.
            let room = max.saturating_sub(c);
            let overflows = n.saturating_sub(room);
            let cb = self.g.cluster_bits;
            self.rep.corruptions_n(overflows, || {
                format!("ERROR: overflow cluster offset={:#x}", k << cb)
            });
            self.refs.set(k, c + n.min(room))?;
        }
        Ok(())
    }

    /// Counts the references of one L1 table's entries (`raw`), each `n` times (the number
    /// of tables that hold these bytes); adds each aligned L2 table inside the file to `l2s`
    /// with its multiplicity, so every L2 table is walked once however many entries name it.
    fn l1_entries(&mut self, raw: &[u8], n: u64, l2s: &mut BTreeMap<u64, u64>) -> Result<()> {
        for e in words(raw) {
            if e == 0 {
                continue;
            }
            if e & L1E_RESERVED_MASK != 0 {
                self.rep.corruptions_n(n, || {
                    format!("ERROR found L1 entry with reserved bits set: {e:x}")
                });
            }
            let l2 = e & L1E_OFFSET_MASK;
            self.inc_n(l2, self.g.cluster_size, n)?;
            if !l2.is_multiple_of(self.g.cluster_size) {
                self.rep.corruptions_n(n, || {
                    format!(
                        "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
                    )
                });
                // Not walked: an unaligned table would overlap others (QEMU walks it).
                continue;
            }
            if l2 != 0 && l2 < self.file_len {
                // Past the end a table reads as zeros: nothing to count.
                let m = l2s.entry(l2).or_insert(0);
                *m = m.saturating_add(n);
            }
        }
        Ok(())
    }

    fn check_l1(&mut self, offset: u64, l1_size: u32, frag: bool) -> Result<()> {
        if l1_size == 0 {
            return Ok(());
        }
        let bytes = u64::from(l1_size) * 8;
        self.inc(offset, bytes)?;
        let raw = pread(
            &*self.r.storage,
            offset,
            limits::check_table_bytes("L1 table", bytes)?,
        )?;
        let mut l2s = BTreeMap::new();
        self.l1_entries(&raw, 1, &mut l2s)?;
        for (l2, n) in l2s {
            self.check_l2(l2, frag, n)?;
        }
        Ok(())
    }

    /// The snapshots' L1 tables, with work bounded by the file's size however the tables
    /// overlap or repeat: the byte ranges of all tables are swept once, each stretch read
    /// once with the number of tables that cover it as its multiplicity; each L2 table they
    /// name is then walked once with the sum of its multiplicities. (65,536 snapshots
    /// sharing one L1 table cost one L1 read and one walk of each of its L2 tables.)
    fn check_snapshot_l1s(&mut self) -> Result<()> {
        let cs = self.g.cluster_size;
        let cb = self.g.cluster_bits;
        // Byte-range events of every snapshot's L1 table, and of its clusters.
        let mut bytes: BTreeMap<u64, i64> = BTreeMap::new();
        let mut clusters: BTreeMap<u64, i64> = BTreeMap::new();
        for s in &self.r.snapshots {
            if s.l1_size == 0 {
                continue;
            }
            let len = u64::from(s.l1_size) * 8;
            let start = s.l1_table_offset;
            let end = start.saturating_add(len);
            *bytes.entry(start).or_insert(0) += 1;
            *bytes.entry(end).or_insert(0) -= 1;
            *clusters.entry(start >> cb).or_insert(0) += 1;
            *clusters.entry(((end - 1) >> cb) + 1).or_insert(0) -= 1;
        }
        // The tables' own clusters.
        let mut m = 0i64;
        let mut prev = 0u64;
        for (&at, &d) in &clusters {
            if m > 0 {
                for k in prev..at {
                    self.inc_n(k << cb, cs, m as u64)?;
                }
            }
            m += d;
            prev = at;
        }
        // The entries, a stretch at a time.
        let mut l2s = BTreeMap::new();
        let mut m = 0i64;
        let mut prev = 0u64;
        for (&at, &d) in &bytes {
            if m > 0 {
                let mut pos = prev;
                while pos < at {
                    let len = (at - pos).min(1 << 20);
                    let raw = pread(&*self.r.storage, pos, len as usize)?;
                    self.l1_entries(&raw, m as u64, &mut l2s)?;
                    pos += len;
                }
            }
            m += d;
            prev = at;
        }
        for (l2, n) in l2s {
            self.check_l2(l2, false, n)?;
        }
        Ok(())
    }

    /// Walks the L2 table at `l2`, counting each reference `n` times (the table is named by
    /// `n` L1 entries); `frag` adds the active image's statistics.
    fn check_l2(&mut self, l2: u64, frag: bool, n: u64) -> Result<()> {
        let g = self.g;
        let cs = g.cluster_size;
        let raw = pread(&*self.r.storage, l2, cs as usize)?;
        let w: Vec<u64> = words(&raw).collect();
        let data_file = self.r.data_file.is_some();
        let mut next_contiguous = 0u64;
        for i in 0..g.l2_entries() as usize {
            let (e, bitmap) = if g.extended_l2 {
                (w[2 * i], w[2 * i + 1])
            } else {
                (w[i], 0)
            };
            let kind = self.kind(e);
            if kind != Kind::Compressed && e & L2E_STD_RESERVED_MASK != 0 {
                self.rep.corruptions_n(n, || {
                    format!("ERROR found l2 entry with reserved bits set: {e:x}")
                });
            }
            match kind {
                Kind::Compressed => {
                    let coffset = e & g.coffset_mask;
                    if e & OFLAG_COPIED != 0 {
                        self.rep.corruptions_n(n, || format!(
                            "ERROR: coffset={coffset:#x}: copied flag must never be set for compressed clusters"
                        ));
                    }
                    if data_file {
                        self.rep.corruptions_n(n, || {
                            format!(
                                "ERROR compressed cluster {i} with data file, entry={:#x}",
                                e & !OFLAG_COPIED
                            )
                        });
                        continue;
                    }
                    if bitmap != 0 {
                        self.rep.corruptions_n(n, || format!(
                            "ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, entry={:#x}",
                            e & !OFLAG_COPIED
                        ));
                        continue;
                    }
                    let sectors = ((e >> g.csize_shift) & g.csize_mask) + 1;
                    let csize = sectors * 512 - (coffset & 511);
                    self.inc_n(coffset, csize, n)?;
                    if frag {
                        self.allocated += 1;
                        self.compressed += 1;
                        self.fragmented += 1;
                    }
                }
                Kind::ZeroAlloc | Kind::Normal => {
                    let offset = e & L2E_OFFSET_MASK;
                    if (bitmap >> 32) & bitmap != 0 {
                        self.rep.corruptions_n(n, || format!(
                            "ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                        ));
                    }
                    if !offset.is_multiple_of(cs) {
                        let contains_data = if g.extended_l2 {
                            bitmap & 0xffff_ffff != 0
                        } else {
                            e & OFLAG_ZERO == 0
                        };
                        if contains_data {
                            self.rep.corruptions_n(n, || format!(
                                "ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted."
                            ));
                        } else {
                            self.rep.corruptions_n(n, || format!(
                                "ERROR offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."
                            ));
                        }
                    }
                    if frag {
                        self.allocated += 1;
                        if next_contiguous != 0 && offset != next_contiguous {
                            self.fragmented += 1;
                        }
                        next_contiguous = offset + cs;
                    }
                    if !data_file {
                        self.inc_n(offset, cs, n)?;
                    }
                }
                Kind::ZeroPlain => {}
                Kind::Unallocated => {
                    if bitmap & 0xffff_ffff != 0 {
                        self.rep.corruptions_n(n, || {
                            "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                                .to_string()
                        });
                    }
                }
            }
        }
        Ok(())
    }

    fn check_bitmaps(&mut self) -> Result<()> {
        let Some((dir_off, dir_len)) = self.r.bitmap_directory else {
            return Ok(());
        };
        self.inc(dir_off, dir_len)?;
        let cs = self.g.cluster_size;
        for b in self.r.bitmaps.clone() {
            let bytes = u64::from(b.table_size) * 8;
            self.inc(b.table_offset, bytes)?;
            // The table can be large: read it a cluster at a time.
            let mut pos = 0u64;
            while pos < bytes {
                let n = (bytes - pos).min(cs);
                let raw = pread(&*self.r.storage, b.table_offset + pos, n as usize)?;
                for e in words(&raw) {
                    let off = e & BME_OFFSET_MASK;
                    let bad = e & BME_RESERVED_MASK != 0
                        || (off != 0 && (e & 1 != 0 || !off.is_multiple_of(cs)));
                    if bad {
                        self.rep.corruptions += 1;
                        continue;
                    }
                    if off != 0 {
                        self.inc(off, cs)?;
                    }
                }
                pos += n;
            }
        }
        Ok(())
    }

    fn check_refblocks(&mut self) -> Result<()> {
        let cs = self.g.cluster_size;
        for (i, &e) in self.r.reftable.iter().enumerate() {
            let off = e & REFT_OFFSET_MASK;
            let cluster = off >> self.g.cluster_bits;
            if e & REFT_RESERVED_MASK != 0 {
                self.rep.corruption(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                continue;
            }
            if !off.is_multiple_of(cs) {
                self.rep.corruption(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                continue;
            }
            if cluster >= self.refs.len() {
                self.rep
                    .corruption(format!("ERROR refcount block {i} is outside image"));
                continue;
            }
            if off != 0 {
                self.inc(off, cs)?;
                let c = self.refs.get(cluster);
                if c != 1 {
                    self.rep
                        .corruption(format!("ERROR refcount block {i} refcount={c}"));
                }
            }
        }
        Ok(())
    }

    /// The refcount the image stores for host cluster `i`; `None` when it cannot be read.
    fn stored(&mut self, i: u64) -> Result<Option<u64>> {
        let bits = self.g.refblock_bits;
        let rti = i >> bits;
        let Some(&e) = self.r.reftable.get(rti as usize) else {
            return Ok(Some(0));
        };
        let off = e & REFT_OFFSET_MASK;
        if off == 0 {
            return Ok(Some(0));
        }
        if !off.is_multiple_of(self.g.cluster_size) {
            return Ok(None);
        }
        if self.block.as_ref().is_none_or(|(k, _)| *k != rti) {
            let b = pread(&*self.r.storage, off, self.g.cluster_size as usize)?;
            self.block = Some((rti, b));
        }
        let Some((_, b)) = &self.block else {
            return Ok(None);
        };
        let idx = (i & ((1u64 << bits) - 1)) as usize;
        Ok(Some(refcount_get(b, self.g.refcount_order, idx)))
    }

    fn compare(&mut self) -> Result<u64> {
        let mut highest = 0u64;
        let n = self.refs.len();
        for i in 0..n {
            let Some(stored) = self.stored(i)? else {
                self.rep.check_errors += 1;
                self.rep.message(format!(
                    "Can't get refcount for cluster {i}: Input/output error"
                ));
                continue;
            };
            let counted = self.refs.get(i);
            if stored > 0 || counted > 0 {
                highest = i;
            }
            if stored != counted {
                self.found.refcounts.push((i, stored, counted));
                if stored < counted {
                    self.rep.corruption(format!(
                        "ERROR cluster {i} refcount={stored} reference={counted}"
                    ));
                } else {
                    self.rep.leak(format!(
                        "Leaked cluster {i} refcount={stored} reference={counted}"
                    ));
                }
            }
        }
        Ok(highest)
    }

    fn check_copied(&mut self) -> Result<()> {
        let g = self.g;
        let l1 = self.r.l1.clone();
        for (i, &l1e) in l1.iter().enumerate() {
            let l2 = l1e & L1E_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            if let Some(rc) = self.stored(l2 >> g.cluster_bits)? {
                if (rc == 1) != (l1e & OFLAG_COPIED != 0) {
                    let at = self.r.header.l1_table_offset + 8 * i as u64;
                    self.found.copied.push((at, l1e ^ OFLAG_COPIED));
                    self.rep.corruption(format!(
                        "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={rc}"
                    ));
                }
            }
            let raw = pread(&*self.r.storage, l2, g.cluster_size as usize)?;
            let w: Vec<u64> = words(&raw).collect();
            for j in 0..g.l2_entries() as usize {
                let e = if g.extended_l2 { w[2 * j] } else { w[j] };
                let kind = self.kind(e);
                if kind != Kind::Normal && kind != Kind::ZeroAlloc {
                    continue;
                }
                let rc = if self.r.data_file.is_some() {
                    1
                } else {
                    match self.stored((e & L2E_OFFSET_MASK) >> g.cluster_bits)? {
                        Some(rc) => rc,
                        None => continue,
                    }
                };
                if (rc == 1) != (e & OFLAG_COPIED != 0) {
                    let per = if g.extended_l2 { 16 } else { 8 };
                    self.found
                        .copied
                        .push((l2 + per * j as u64, e ^ OFLAG_COPIED));
                    self.rep.corruption(format!(
                        "ERROR OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Checks `r` as `qemu-img check` does (no repair).
pub fn check(r: &Qcow2Reader) -> Result<CheckReport> {
    Ok(check_findings(r)?.0)
}

/// Checks `r` and also returns what a repair would change.
pub(super) fn check_findings(r: &Qcow2Reader) -> Result<(CheckReport, Findings)> {
    let h = r.header();
    let g = Geometry::new(h.cluster_bits, h.extended_l2(), h.refcount_order);
    let cs = g.cluster_size;
    let file_len = r.file_len;
    let nb_clusters = file_len.div_ceil(cs);
    let mut counts = Vec::new();
    grow(&mut counts, nb_clusters as usize)?;
    let mut c = Checker {
        r,
        g,
        file_len,
        refs: Refs {
            counts,
            big: HashMap::new(),
            max: g.refcount_max(),
        },
        rep: CheckReport::default(),
        allocated: 0,
        fragmented: 0,
        compressed: 0,
        block: None,
        found: Findings::default(),
    };
    // Version 3 wants the disk size in every snapshot entry (QEMU reports these first,
    // as it reads the snapshot table; `check -r all` completes them).
    if h.version >= 3 {
        for (i, s) in r.snapshots.iter().enumerate() {
            if s.extra_data_size < 16 {
                c.rep.corruption(snapshot_incomplete_message(i));
            }
        }
    }
    c.inc(0, cs)?;
    c.check_l1(h.l1_table_offset, h.l1_size, true)?;
    if r.data_file.is_some() && !r.snapshots.is_empty() {
        c.rep.corruption(format!(
            "ERROR {} snapshots in image with data file",
            r.snapshots.len()
        ));
    }
    c.check_snapshot_l1s()?;
    c.inc(h.snapshots_offset, r.snapshots_len)?;
    // The LUKS header of an encrypted image (qemu counts it too).
    if let Some((off, len)) = r.crypto {
        c.inc(off, len)?;
    }
    c.inc(
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs,
    )?;
    c.check_bitmaps()?;
    c.check_refblocks()?;
    let highest = c.compare()?;
    c.check_copied()?;
    let total = (h.size / 512 * 512).div_ceil(cs);
    let nz = |x: u64| (x != 0).then_some(x);
    let mut rep = c.rep;
    rep.image_end_offset = nz((highest + 1) * cs);
    rep.total_clusters = nz(total);
    rep.allocated_clusters = nz(c.allocated);
    rep.fragmented_clusters = nz(c.fragmented);
    rep.compressed_clusters = nz(c.compressed);
    Ok((rep, c.found))
}

/// Exact reference counts per host cluster (no cap), for rebuilding refcount structures.
pub(super) struct RefCounts(Refs);

impl RefCounts {
    /// The references to host cluster `i`.
    pub(super) fn get(&self, i: u64) -> u64 {
        self.0.get(i)
    }

    /// One past the highest cluster index counted (every later cluster has none).
    pub(super) fn len(&self) -> u64 {
        self.0.len()
    }
}

/// The references `r`'s metadata makes (header, active and snapshot tables and data,
/// snapshot table, bitmaps), counted as the check counts them but uncapped and without the
/// refcount structures: what a new set of refcount blocks must store, before counting the
/// new blocks themselves. Work and memory are bounded by the file's size. Errors when the
/// metadata has any corruption (a reference outside the file, a bad entry).
pub(super) fn reference_counts(r: &Qcow2Reader) -> Result<RefCounts> {
    let h = r.header();
    let g = Geometry::new(h.cluster_bits, h.extended_l2(), h.refcount_order);
    let cs = g.cluster_size;
    let mut counts = Vec::new();
    grow(&mut counts, r.file_len.div_ceil(cs) as usize)?;
    let mut c = Checker {
        r,
        g,
        file_len: r.file_len,
        refs: Refs {
            counts,
            big: HashMap::new(),
            max: u64::MAX,
        },
        rep: CheckReport::default(),
        allocated: 0,
        fragmented: 0,
        compressed: 0,
        block: None,
        found: Findings::default(),
    };
    c.inc(0, cs)?;
    c.check_l1(h.l1_table_offset, h.l1_size, true)?;
    c.check_snapshot_l1s()?;
    c.inc(h.snapshots_offset, r.snapshots_len)?;
    // The LUKS header of an encrypted image (qemu counts it too).
    if let Some((off, len)) = r.crypto {
        c.inc(off, len)?;
    }
    c.check_bitmaps()?;
    if c.rep.corruptions > 0 || c.rep.check_errors > 0 {
        let first = c.rep.messages.first().cloned().unwrap_or_default();
        return Err(Error::corrupt(format!(
            "counting references: {} corruptions ({first})",
            c.rep.corruptions + c.rep.check_errors
        )));
    }
    Ok(RefCounts(c.refs))
}

/// The message QEMU's check prints for snapshot table entry `i` that lacks what version 3
/// requires (`update/snapshot_table.rs` repairs it).
pub(super) fn snapshot_incomplete_message(i: usize) -> String {
    format!("ERROR snapshot table entry {i} is incomplete")
}
