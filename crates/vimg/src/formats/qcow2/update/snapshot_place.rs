//! `snapshot -c` with QEMU's layout (spec: "Snapshots", "Host cluster management"; QEMU
//! allocates the snapshot's L1 copy, then the new snapshot table, each in the first run of
//! free clusters, bumps the refcounts of the shared tables and data in place, clears their
//! copied flags, switches `nb_snapshots`/`snapshots_offset` and frees the old table).
//!
//! QEMU's result keeps the active L1 and L2 tables and the refcount structure where they
//! were, changed in place; written in place one by one, a crash would leave copied flags
//! that disagree with the refcounts (a corruption). vimg gets the same bytes in two atomic
//! steps: first the ordinary shadow switch (`snapshot.rs`, `shadow.rs`) moves every changed
//! structure into the tail, past the clusters QEMU will use, which frees the old places;
//! then everything QEMU's result holds (the L1 copy and the table in QEMU's clusters, the
//! active tables and the refcount structure back in their old places with QEMU's values) is
//! written into clusters free in that committed state, and one header write switches to it.
//! The tail is cut off after. Killed anywhere, the image is the old one, the intermediate
//! one or the final one, each exact (an unreferenced tail at worst).
//!
//! Where QEMU would have to grow the refcount structure (a cluster it takes has no refcount
//! block yet), or the image is not one this can reproduce (leaks or copied flags that QEMU
//! would rewrite in a shared table), the first step alone is done: the right snapshot, with
//! vimg's layout.

use super::*;
use crate::formats::qcow2::check::{reference_counts, RefCounts};
use std::io;

/// What the second step needs, gathered from the image before the first step.
pub(super) struct Placement {
    /// First cluster of the snapshot's L1 copy and of the new snapshot table.
    l1_copy: u64,
    table: u64,
    /// Bytes QEMU writes there (no padding to clusters).
    l1_bytes: u64,
    table_len: u64,
    /// The active L1 table as it was, with its flags (QEMU copies it as it is).
    l1: Vec<u64>,
    l1_offset: u64,
    /// The L2 tables the active L1 table names, with their contents; `true` for those
    /// rewritten in place (referenced once), `false` for shared ones, left as they are.
    l2s: Vec<(u64, Vec<u8>, bool)>,
    reftable: Vec<u64>,
    reftable_offset: u64,
    reftable_clusters: u32,
    /// Stored refcounts minus references, before the change (leaks stay leaks, as in QEMU).
    refcounts: Vec<u64>,
    refs: RefCounts,
    file_len: u64,
    /// The old snapshot table (offset, bytes), freed and discarded after the switch.
    old_table: (u64, u64),
    /// The header cluster as it was (QEMU changes only the snapshot fields in it).
    head: Vec<u8>,
}

/// The file with its first sector replaced (the reader sees the image the new header
/// makes, before that header is written).
#[derive(Debug)]
struct Overlay {
    inner: FileStorage,
    head: Vec<u8>,
}

impl Storage for Overlay {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let n = self.inner.read_at(buf, offset)?;
        let hl = self.head.len() as u64;
        if offset < hl {
            let end = hl.min(offset + n as u64);
            let (s, e) = (offset as usize, end as usize);
            buf[..e - s].copy_from_slice(&self.head[s..e]);
        }
        Ok(n)
    }
}

/// The unit a write is assumed to change whole (the header switch is one).
const SECTOR: usize = 512;

fn be_words(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|e| e.to_be_bytes()).collect()
}

impl Qcow2Update {
    /// References the image makes, as `head` (a first sector) would make it, or as it is.
    fn references(&self, head: Option<Vec<u8>>) -> Result<RefCounts> {
        let ro = self
            .file
            .try_clone()
            .map_err(|e| io_err(&self.path, "dup", e))?;
        let inner =
            FileStorage::from_file(ro, &self.path).map_err(|e| io_err(&self.path, "stat", e))?;
        let storage: Arc<dyn Storage> = match head {
            Some(head) => Arc::new(Overlay { inner, head }),
            None => Arc::new(inner),
        };
        let ctx = self.reader_ctx(ExternalPolicy::Deny);
        let r = Qcow2Reader::open(storage, &ctx)?;
        reference_counts(&r)
    }

    /// The first run of `n` clusters from cluster `from` whose stored refcount is 0, as
    /// QEMU's allocator scans (clusters past the refcount table count as free).
    fn first_free_run(&mut self, from: u64, n: u64) -> Result<u64> {
        let mut start = from;
        let mut c = from;
        // Bounded: past the last refcount block every cluster is free.
        let end = (self.reftable.len() as u64) << self.g.refblock_bits;
        while c < start + n {
            if c < end && self.refcount(c)? != 0 {
                start = c + 1;
            }
            c += 1;
        }
        Ok(start)
    }

    /// QEMU's places for a new snapshot (`table_len` bytes of snapshot table) and what the
    /// second step needs, or `None` where QEMU's layout cannot be reproduced.
    pub(super) fn plan_snapshot_placement(&mut self, table_len: u64) -> Result<Option<Placement>> {
        let cs = self.cs();
        let cb = self.cb();
        let l1_bytes = self.l1.len() as u64 * 8;
        if l1_bytes == 0 || table_len == 0 {
            return Ok(None);
        }
        let n_l1 = l1_bytes.div_ceil(cs);
        let n_table = table_len.div_ceil(cs);
        let l1_copy = self.first_free_run(0, n_l1)?;
        let table = self.first_free_run(l1_copy + n_l1, n_table)?;
        // QEMU would create a refcount block for a cluster without one: another layout.
        let bits = self.g.refblock_bits;
        let covered = |u: &Self, c: u64| u.block_offset(c >> bits).is_some();
        if (l1_copy..l1_copy + n_l1)
            .chain(table..table + n_table)
            .any(|c| !covered(self, c))
        {
            return Ok(None);
        }
        // Every active L2 table: referenced once (rewritten in place), or shared (QEMU
        // leaves it as it is when no entry carries the copied flag).
        let mut l2s: Vec<(u64, Vec<u8>, bool)> = Vec::new();
        let w = self.l2_width();
        for e in self.l1.clone() {
            let off = e & L1E_OFFSET_MASK;
            if off == 0 || l2s.iter().any(|(o, _, _)| *o == off) {
                continue;
            }
            let raw = self.read_cluster(off)?;
            let own = self.refcount(off >> cb)? == 1;
            if !own && raw.chunks_exact(w).any(|x| x[0] & 0x80 != 0) {
                return Ok(None);
            }
            l2s.push((off, raw, own));
        }
        let refs = self.references(None)?;
        // The stored refcounts of every cluster a refcount block covers.
        let n_blocks = self.reftable.len() as u64;
        let mut refcounts = Vec::new();
        for rti in 0..n_blocks {
            if self.block_offset(rti).is_none() {
                continue;
            }
            let first = rti << bits;
            let last = (first + (1u64 << bits)).min(refs.len().max(self.file_len.div_ceil(cs)));
            for c in first..last {
                let rc = self.refcount(c)?;
                if rc < refs.get(c) {
                    return Ok(None);
                }
                if refcounts.len() as u64 <= c {
                    refcounts.resize(c as usize + 1, 0);
                }
                refcounts[c as usize] = rc;
            }
        }
        if (0..refs.len()).any(|c| refs.get(c) > refcounts.get(c as usize).copied().unwrap_or(0)) {
            return Ok(None);
        }
        Ok(Some(Placement {
            l1_copy,
            table,
            l1_bytes,
            table_len,
            l1: self.l1.clone(),
            l1_offset: self.header.l1_table_offset,
            l2s,
            reftable: self.reftable.clone(),
            reftable_offset: self.header.refcount_table_offset,
            reftable_clusters: self.header.refcount_table_clusters,
            refcounts,
            refs,
            file_len: self.file_len,
            old_table: (self.header.snapshots_offset, self.snapshot_table_len()?),
            head: {
                let mut head = vec![0u8; self.file_len.min(cs) as usize];
                self.pread(&mut head, 0)?;
                head
            },
        }))
    }

    /// The first cluster past everything `p` places (where the first step's tail starts).
    pub(super) fn placement_end(&self, p: &Placement) -> u64 {
        let cs = self.cs();
        let a = (p.l1_copy << self.cb()) + p.l1_bytes;
        let b = (p.table << self.cb()) + p.table_len;
        a.max(b).div_ceil(cs)
    }

    /// The second step (see the module documentation): the image, just switched to the
    /// new snapshot by the first step, is given QEMU's layout of the same state.
    pub(super) fn place_snapshot_as_qemu(&mut self, p: Placement) -> Result<()> {
        let cs = self.cs();
        let cb = self.cb();
        // The table as the first step wrote it, the new entry's L1 offset set to QEMU's.
        let mut entries = self.snapshot_entries_raw()?;
        let Some(last) = entries.last_mut() else {
            return Ok(());
        };
        let l1_copy_off = p.l1_copy << cb;
        last[..8].copy_from_slice(&l1_copy_off.to_be_bytes());
        let mut table: Vec<u8> = entries.concat();
        if (table.len() as u64) < p.table_len {
            return Ok(());
        }
        table.truncate(p.table_len as usize);
        // Everything goes into clusters the committed state (the first step's) does not
        // use: QEMU's two, and the old places of the tables the first step moved.
        self.pwrite(&be_words(&p.l1), l1_copy_off)?;
        self.pwrite(&table, p.table << cb)?;
        let mut l1: Vec<u64> = p.l1.iter().map(|e| e & !OFLAG_COPIED).collect();
        self.pwrite(&be_words(&l1), p.l1_offset)?;
        for (off, raw, own) in &p.l2s {
            if *own {
                self.pwrite(raw, *off)?;
            }
        }
        let mut h = self.header.clone();
        h.l1_table_offset = p.l1_offset;
        h.refcount_table_offset = p.reftable_offset;
        h.refcount_table_clusters = p.reftable_clusters;
        h.snapshots_offset = p.table << cb;
        let head = self.first_sector_with(&mut h.clone(), None, None, None)?;
        let refs = self.references(Some(head))?;
        // QEMU's refcounts: the old ones plus the references gained, minus those lost.
        let n = refs.len().max(p.refs.len()).max(p.refcounts.len() as u64);
        let mut counts = vec![0u64; n as usize];
        for (c, slot) in counts.iter_mut().enumerate() {
            let c = c as u64;
            let old = p.refcounts.get(c as usize).copied().unwrap_or(0);
            let Some(v) = (old + refs.get(c)).checked_sub(p.refs.get(c)) else {
                return Ok(());
            };
            *slot = v;
        }
        let bits = self.g.refblock_bits;
        let max = self.g.refcount_max();
        for (c, &v) in counts.iter().enumerate() {
            let blocked = p
                .reftable
                .get(c >> bits)
                .is_some_and(|e| e & REFT_OFFSET_MASK != 0);
            if v > max || (v != 0 && !blocked) {
                // Not QEMU's layout after all; the first step's image stays (exact).
                return Ok(());
            }
        }
        let count = |c: u64| counts.get(c as usize).copied().unwrap_or(0);
        // Copied flags as QEMU sets them: where the cluster has exactly one reference.
        let w = self.l2_width();
        for (off, raw, own) in &p.l2s {
            if !*own {
                continue;
            }
            let mut raw = raw.clone();
            for ent in raw.chunks_exact_mut(w) {
                let v = u64::from_be_bytes(ent[..8].try_into().unwrap_or([0; 8]));
                let mut nv = v & !OFLAG_COPIED;
                let host = v & L2E_OFFSET_MASK;
                if v & OFLAG_COMPRESSED == 0 && host != 0 && count(host >> cb) == 1 {
                    nv |= OFLAG_COPIED;
                }
                ent[..8].copy_from_slice(&nv.to_be_bytes());
            }
            self.pwrite(&raw, *off)?;
        }
        for e in l1.iter_mut() {
            if *e != 0 && count(*e >> cb) == 1 {
                *e |= OFLAG_COPIED;
            }
        }
        self.pwrite(&be_words(&l1), p.l1_offset)?;
        let order = self.g.refcount_order;
        let per_block = 1u64 << bits;
        for (rti, e) in p.reftable.iter().enumerate() {
            let off = e & REFT_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            let first = rti as u64 * per_block;
            let mut b = vec![0u8; cs as usize];
            for k in 0..per_block {
                refcount_set(&mut b, order, k as usize, count(first + k));
            }
            self.pwrite(&b, off)?;
        }
        let mut rt = be_words(&p.reftable);
        rt.resize((u64::from(p.reftable_clusters) * cs) as usize, 0);
        self.pwrite(&rt, p.reftable_offset)?;
        self.sync()?;
        // The old header with QEMU's two changes, where the first step left the bytes past
        // the first sector as they were (then one sector switches); otherwise the header
        // as vimg writes it.
        let mut now = vec![0u8; p.head.len()];
        self.pread(&mut now, 0)?;
        let first = if p.head.len() >= SECTOR && now[SECTOR..] == p.head[SECTOR..] {
            let mut first = p.head[..SECTOR].to_vec();
            first[60..64].copy_from_slice(&h.nb_snapshots.to_be_bytes());
            first[64..72].copy_from_slice(&h.snapshots_offset.to_be_bytes());
            first
        } else {
            self.first_sector_with(&mut h, None, None, None)?
        };
        self.pwrite(&first, 0)?;
        self.sync()?;
        self.header = h;
        self.l1 = l1;
        self.reftable = p.reftable;
        self.block = None;
        self.free_hint = 0;
        // The first step's tail is referenced by nothing now.
        let end = p
            .file_len
            .max(l1_copy_off + p.l1_bytes)
            .max((p.table << cb) + p.table_len);
        self.set_len(end)?;
        // QEMU discards the clusters of the old table it frees (they read as zeros).
        let (off, len) = p.old_table;
        if len > 0 {
            let first = off >> cb;
            let last = (off + len).div_ceil(cs);
            self.punch_free(&[(first, last - first)])?;
        }
        Ok(())
    }
}
