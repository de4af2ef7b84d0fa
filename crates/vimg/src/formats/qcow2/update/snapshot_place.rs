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

use super::shadow::be_words;
use super::*;
use crate::formats::qcow2::check::RefCounts;

/// What the second step needs, gathered from the image before the first step.
pub(super) struct Placement {
    /// `snapshot -c`: the first cluster of the snapshot's L1 copy and its bytes (the
    /// active L1 table as it was, flags and all: QEMU copies it as it is).
    l1_copy: Option<(u64, Vec<u8>)>,
    /// The first cluster of the new snapshot table (none when it is empty) and the bytes
    /// QEMU writes there (no padding to clusters).
    table: Option<u64>,
    table_len: u64,
    /// The active L1 table as it was.
    l1: Vec<u64>,
    l1_offset: u64,
    /// The L2 tables QEMU walks (the active ones, and the deleted snapshot's), as they were.
    l2s: Vec<(u64, Vec<u8>)>,
    reftable: Vec<u64>,
    reftable_offset: u64,
    reftable_clusters: u32,
    /// The stored refcounts and the references, before the change (QEMU's refcounts after
    /// it are these plus the references gained, minus those lost: leaks stay leaks).
    refcounts: Vec<u64>,
    refs: RefCounts,
    file_len: u64,
    /// The header cluster as it was (QEMU changes only the snapshot fields in it).
    head: Vec<u8>,
}

/// The unit a write is assumed to change whole (the header switch is one).
const SECTOR: usize = 512;

impl Qcow2Update {
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

    /// QEMU's places for a change of the snapshot table to `table_len` bytes (after an L1
    /// copy for `snapshot -c`, `copy_l1`), and what the second step needs, or `None` where
    /// QEMU's layout cannot be reproduced. `more_l1s`: the L1 tables QEMU walks besides
    /// the active one (the deleted snapshot's).
    pub(super) fn plan_snapshot_placement(
        &mut self,
        copy_l1: bool,
        table_len: u64,
        more_l1s: &[Vec<u64>],
    ) -> Result<Option<Placement>> {
        let cs = self.cs();
        let l1_bytes = self.l1.len() as u64 * 8;
        if copy_l1 && l1_bytes == 0 {
            return Ok(None);
        }
        let mut taken = Vec::new();
        let mut from = 0;
        let l1_copy = if copy_l1 {
            let n = l1_bytes.div_ceil(cs);
            let c = self.first_free_run(0, n)?;
            taken.push((c, n));
            from = c + n;
            Some((c, be_words(&self.l1)))
        } else {
            None
        };
        let table = if table_len > 0 {
            let n = table_len.div_ceil(cs);
            let c = self.first_free_run(from, n)?;
            taken.push((c, n));
            Some(c)
        } else {
            None
        };
        // QEMU would create a refcount block for a cluster without one: another layout.
        let bits = self.g.refblock_bits;
        if taken
            .iter()
            .flat_map(|&(c, n)| c..c + n)
            .any(|c| self.block_offset(c >> bits).is_none())
        {
            return Ok(None);
        }
        let mut l2s: Vec<(u64, Vec<u8>)> = Vec::new();
        for e in self.l1.clone().iter().chain(more_l1s.iter().flatten()) {
            let off = e & L1E_OFFSET_MASK;
            if off == 0 || l2s.iter().any(|(o, _)| *o == off) {
                continue;
            }
            l2s.push((off, self.read_cluster(off)?));
        }
        let refs = self.references(None)?;
        // The stored refcounts of every cluster a refcount block covers.
        let mut refcounts = Vec::new();
        let upto = refs.len().max(self.file_len.div_ceil(cs));
        for rti in 0..self.reftable.len() as u64 {
            if self.block_offset(rti).is_none() {
                continue;
            }
            let first = rti << bits;
            for c in first..(first + (1u64 << bits)).min(upto) {
                if refcounts.len() as u64 <= c {
                    refcounts.resize(c as usize + 1, 0);
                }
                refcounts[c as usize] = self.refcount(c)?;
            }
        }
        if (0..refs.len()).any(|c| refs.get(c) > refcounts.get(c as usize).copied().unwrap_or(0)) {
            return Ok(None);
        }
        let mut head = vec![0u8; self.file_len.min(cs) as usize];
        self.pread(&mut head, 0)?;
        Ok(Some(Placement {
            l1_copy,
            table,
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
            head,
        }))
    }

    /// The first cluster past everything `p` places (where the first step's tail starts).
    pub(super) fn placement_end(&self, p: &Placement) -> u64 {
        self.placement_end_bytes(p).div_ceil(self.cs())
    }

    /// The end of the last byte QEMU writes in the clusters it takes.
    fn placement_end_bytes(&self, p: &Placement) -> u64 {
        let cb = self.cb();
        let a = p
            .l1_copy
            .as_ref()
            .map_or(0, |(c, b)| (c << cb) + b.len() as u64);
        let b = p.table.map_or(0, |c| (c << cb) + p.table_len);
        a.max(b)
    }

    /// Writes `data` at `off` for the second step, where the committed state (the first
    /// step's) leaves it free or it holds these bytes already; `false` otherwise.
    fn place_write(&mut self, data: &[u8], off: u64) -> Result<bool> {
        let mut now = vec![0u8; data.len()];
        self.pread(&mut now, off)?;
        if now == data {
            return Ok(true);
        }
        let cb = self.cb();
        let last = (off + data.len() as u64).div_ceil(self.cs());
        for c in off >> cb..last {
            if self.refcount(c)? != 0 {
                return Ok(false);
            }
        }
        self.pwrite(data, off)?;
        Ok(true)
    }

    /// The second step (see the module documentation): the image, just switched by the
    /// first step, is given QEMU's layout of the same state. Where some cluster QEMU
    /// changes is still in use after the first step, the first step's image stays.
    pub(super) fn place_snapshot_as_qemu(&mut self, p: Placement) -> Result<()> {
        let cs = self.cs();
        let cb = self.cb();
        // The table as the first step wrote it, a new entry's L1 offset set to QEMU's.
        let mut entries = self.snapshot_entries_raw()?;
        if let (Some((c, _)), Some(last)) = (&p.l1_copy, entries.last_mut()) {
            last[..8].copy_from_slice(&(c << cb).to_be_bytes());
        }
        let mut table: Vec<u8> = entries.concat();
        if (table.len() as u64) < p.table_len {
            return Ok(());
        }
        table.truncate(p.table_len as usize);
        // QEMU's two new places are free after the first step (its tail starts past them).
        if let Some((c, bytes)) = &p.l1_copy {
            if !self.place_write(bytes, c << cb)? {
                return Ok(());
            }
        }
        let table_off = p.table.map_or(0, |c| c << cb);
        if p.table.is_some() && !self.place_write(&table, table_off)? {
            return Ok(());
        }
        let mut h = self.header.clone();
        h.l1_table_offset = p.l1_offset;
        h.refcount_table_offset = p.reftable_offset;
        h.refcount_table_clusters = p.reftable_clusters;
        h.snapshots_offset = table_off;
        // The final image references what the old one did, through the old active tables
        // (their places still hold them: the first step wrote copies) and the new table.
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
                return Ok(());
            }
        }
        let count = |c: u64| counts.get(c as usize).copied().unwrap_or(0);
        // Copied flags as QEMU sets them in the tables it walks: where the cluster has
        // exactly one reference (never for compressed or unallocated entries).
        let w = self.l2_width();
        for (off, raw) in &p.l2s {
            if count(off >> cb) == 0 {
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
            if !self.place_write(&raw, *off)? {
                return Ok(());
            }
        }
        let l1: Vec<u64> =
            p.l1.iter()
                .map(|&e| {
                    let e = e & !OFLAG_COPIED;
                    if e != 0 && count((e & L1E_OFFSET_MASK) >> cb) == 1 {
                        e | OFLAG_COPIED
                    } else {
                        e
                    }
                })
                .collect();
        if !self.place_write(&be_words(&l1), p.l1_offset)? {
            return Ok(());
        }
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
            if !self.place_write(&b, off)? {
                return Ok(());
            }
        }
        let mut rt = be_words(&p.reftable);
        rt.resize((u64::from(p.reftable_clusters) * cs) as usize, 0);
        if !self.place_write(&rt, p.reftable_offset)? {
            return Ok(());
        }
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
        self.reftable = p.reftable.clone();
        self.block = None;
        self.free_hint = 0;
        // The first step's tail is referenced by nothing now.
        let end = p.file_len.max(self.placement_end_bytes(&p));
        self.set_len(end)?;
        // QEMU discards the clusters it frees (they read as zeros).
        let freed: Vec<(u64, u64)> = (0..n)
            .filter(|&c| count(c) == 0 && p.refcounts.get(c as usize).is_some_and(|&v| v > 0))
            .map(|c| (c, 1))
            .collect();
        self.punch_free(&freed)
    }
}
