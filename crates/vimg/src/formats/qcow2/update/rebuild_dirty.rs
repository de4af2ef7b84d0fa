//! `check -r all` (and the repair every in-place open makes first) of a dirty image: an
//! image whose `dirty` bit (spec: "Header", incompatible feature bit 0, written with
//! `lazy_refcounts=on`) is set and whose used clusters have refcount 0. The refcount
//! structure is rebuilt where QEMU rebuilds it (block/qcow2-refcount.c,
//! `rebuild_refcount_structure`): the L1 and L2 tables and every data cluster stay where
//! they are; only new refcount blocks and a new refcount table are written.
//!
//! # Where the new structure goes
//!
//! QEMU counts every reference into an in-memory table (header, active and snapshot
//! tables, data, snapshot table, bitmaps, the LUKS header, and the old refcount table and
//! blocks too), then allocates from that table, first fit:
//!
//! - scanning the clusters in order, for each range of one refcount block that holds a
//!   used cluster, one cluster for its block, searched from the start of that range (never
//!   below it: the blocks of earlier ranges are already written); a block that lands past
//!   the scanned end extends the scan;
//! - then the refcount table (whole clusters holding one entry per block), searched from
//!   cluster 0; its clusters are scanned again, and when a block had to be added for them
//!   and the table grew, the table is placed anew (the old place is left over).
//!
//! The counts written are the references plus the new blocks and the final table: the
//! old refcount table and blocks and any table place left over count 0 (QEMU counts them
//! 1, then frees them in the same check as leaks: the same end state, and the same
//! `Repairing cluster C refcount=1 reference=0` lines). QEMU does not reuse the old
//! structure's clusters for the new one: they are in use while it allocates. Nor does
//! this; overwriting them would be safe only because the image is dirty, and is not needed
//! to land where QEMU lands.
//!
//! # Why a kill at any moment is safe
//!
//! 1. Nothing any structure names is written before the switch: the new blocks and table
//!    go only into clusters that no table, no data mapping, no snapshot, bitmap or LUKS
//!    header and not the old refcount structure uses (the count is the checker's, which
//!    refuses an image whose references it cannot follow). So up to the switch every
//!    reader sees the image it saw before, byte for byte, with junk in free clusters.
//! 2. The blocks and the table are complete and flushed before the switch, which is one
//!    12-byte write of `refcount_table_offset` and `refcount_table_clusters` inside the
//!    first sector (as QEMU's), flushed.
//! 3. The dirty bit stays set through the switch and the copied-flag fixes after it, and
//!    is cleared (one write, flushed) only when the refcounts and the flags are right. An
//!    image killed before that is still dirty, and every opener (QEMU's and vimg's)
//!    checks and repairs its refcounts and flags again rather than trust them.
//!
//! After the switch the clusters of the old structure are punched out (QEMU's leak fix
//! discards them): nothing names them any more.
//!
//! Killed before the switch, the image is the dirty image it was (a longer file perhaps,
//! whose tail nothing names); after it and before the dirty bit is cleared, a dirty image
//! with exact refcounts; after, a clean one. Data clusters are never written, and of the
//! L1 and L2 tables only copied flags (after the switch, entry by entry), so the guest
//! content is the same at every point. An old refcount block past the end of the file is
//! not kept clear of the new structure (QEMU first grows the file over it): in a dirty
//! image nothing trusts what it holds.
//!
//! An image that is not dirty keeps the copy-based rebuild (`update/rebuild.rs`): its
//! refcounts are trusted by readers between the steps, and point 3 has no counterpart.

use super::*;

/// Where QEMU's rebuild puts the new refcount structure, in cluster indices.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Placement {
    /// The refcount table's entries: the block of each range (0: none).
    pub(super) blocks: Vec<u64>,
    /// The refcount table's first cluster and its length in clusters.
    pub(super) table: (u64, u64),
    /// Table places given up because the table grew (QEMU leaks, then frees them).
    pub(super) left_over: Vec<(u64, u64)>,
}

/// QEMU's in-memory allocation, first fit. `skip[c]` is 0 for a free cluster; for a used
/// one, a distance forward over used clusters only (path-compressed, capped at
/// `u32::MAX`), so a search for one free cluster costs no full scan: QEMU's plain scan
/// from each block's range is quadratic in the file's clusters, which a large file of
/// small clusters would turn into a hang. Everything past `skip.len()` is free;
/// allocations mark what they take, growing `skip`. Four bytes a cluster, bounded by
/// `limits::MAX_METADATA_BYTES`.
struct Imrt {
    skip: Vec<u32>,
}

impl Imrt {
    fn new(nb: u64, used: impl Fn(u64) -> bool) -> Result<Imrt> {
        let mut skip = Vec::new();
        Self::reserve(&mut skip, nb)?;
        skip.extend((0..nb).map(|c| u32::from(used(c))));
        Ok(Imrt { skip })
    }

    fn reserve(skip: &mut Vec<u32>, to: u64) -> Result<()> {
        if to.saturating_mul(4) > limits::MAX_METADATA_BYTES {
            return Err(Error::unsupported(format!(
                "rebuilding the refcounts of {to} host clusters needs more memory than vimg's metadata limit"
            )));
        }
        skip.try_reserve_exact((to as usize).saturating_sub(skip.len()))
            .map_err(|_| Error::unsupported("out of memory for the refcount rebuild"))
    }

    fn is_used(&self, c: u64) -> bool {
        self.skip.get(c as usize).is_some_and(|&d| d != 0)
    }

    /// The first free cluster at or after `c`.
    fn next_free(&mut self, c: u64) -> u64 {
        let mut at = c;
        while self.is_used(at) {
            at += u64::from(self.skip[at as usize]);
        }
        // Path compression: every used cluster passed now jumps nearer to `at`.
        let mut k = c;
        while k < at {
            let d = self.skip[k as usize];
            self.skip[k as usize] = u32::try_from(at - k).unwrap_or(u32::MAX);
            k += u64::from(d);
        }
        at
    }

    fn mark(&mut self, start: u64, n: u64) -> Result<()> {
        let end = start + n;
        if end > self.skip.len() as u64 {
            Self::reserve(&mut self.skip, end)?;
            self.skip.resize(end as usize, 0);
        }
        for k in start..end {
            self.skip[k as usize] = 1;
        }
        Ok(())
    }

    /// `n` free clusters in a row at or after `*first_free`, which moves to the first gap
    /// seen (QEMU's `alloc_clusters_imrt`).
    fn alloc(&mut self, n: u64, first_free: &mut u64) -> Result<u64> {
        let mut start = self.next_free(*first_free);
        *first_free = start;
        // The run from `start`: free up to the first used cluster below start + n.
        while let Some(k) = (start..start + n).find(|&k| self.is_used(k)) {
            start = self.next_free(k);
        }
        self.mark(start, n)?;
        Ok(start)
    }
}

/// The blocks for clusters `[first, end)` (QEMU's `rebuild_refcounts_write_refblocks`
/// without the writes); true when the table had to grow.
fn place_blocks(
    m: &mut Imrt,
    mut end: u64,
    first: u64,
    block_bits: u32,
    per_table_cluster: u64,
    blocks: &mut Vec<u64>,
) -> Result<bool> {
    let mut grown = false;
    let mut first_free = 0u64;
    let mut c = first;
    while c < end {
        if !m.is_used(c) {
            c += 1;
            continue;
        }
        let idx = c >> block_bits;
        let start = idx << block_bits;
        if blocks.get(idx as usize).is_none_or(|&b| b == 0) {
            first_free = first_free.max(start);
            let b = m.alloc(1, &mut first_free)?;
            if b >= end {
                end = b + 1;
            }
            if blocks.len() as u64 <= idx {
                let n = (idx + 1).div_ceil(per_table_cluster) * per_table_cluster;
                blocks.resize(n as usize, 0);
                grown = true;
            }
            blocks[idx as usize] = b;
        }
        c = start + (1u64 << block_bits);
    }
    Ok(grown)
}

/// Places the new structure for `used` (every used cluster, the old refcount structure
/// included), as QEMU does (see the module documentation).
pub(super) fn place(
    nb: u64,
    used: impl Fn(u64) -> bool,
    block_bits: u32,
    cluster_bits: u32,
) -> Result<Placement> {
    let per_table_cluster = 1u64 << (cluster_bits - 3);
    let mut m = Imrt::new(nb, used)?;
    let mut blocks = Vec::new();
    place_blocks(&mut m, nb, 0, block_bits, per_table_cluster, &mut blocks)?;
    let mut left_over = Vec::new();
    loop {
        let n = (blocks.len() as u64).div_ceil(per_table_cluster).max(1);
        let mut first_free = 0;
        let at = m.alloc(n, &mut first_free)?;
        let grown = place_blocks(
            &mut m,
            at + n,
            at,
            block_bits,
            per_table_cluster,
            &mut blocks,
        )?;
        if !grown {
            return Ok(Placement {
                blocks,
                table: (at, n),
                left_over,
            });
        }
        left_over.push((at, n));
    }
}

impl Qcow2Update {
    /// The rebuild of a dirty image (see the module documentation). `old` lists the old
    /// refcount table's and blocks' clusters. Returns the clusters QEMU's leak fix frees
    /// after its rebuild, for the report.
    pub(super) fn rebuild_dirty_in_place(&mut self, old: &[u64]) -> Result<Vec<u64>> {
        let cb = self.cb();
        let cs = self.cs();
        let order = self.header.refcount_order;
        let counts = self.references(None)?;
        let nb = counts.len().max(self.file_len.div_ceil(cs));
        // An old block past the end of the file is not marked (QEMU's check grows the
        // file over it first); the image is dirty, so no reader trusts what it holds.
        let old_set: std::collections::HashSet<u64> = old.iter().copied().collect();
        let p = place(
            nb,
            |c| counts.get(c) != 0 || old_set.contains(&c),
            self.g.refblock_bits,
            cb,
        )?;
        let (t0, tn) = p.table;
        let is_block: std::collections::HashSet<u64> =
            p.blocks.iter().copied().filter(|&b| b != 0).collect();
        let max = self.g.refcount_max();
        let value = |c: u64| {
            counts.get(c) + u64::from(is_block.contains(&c)) + u64::from((t0..t0 + tn).contains(&c))
        };
        // Every count checked before anything is written.
        let per = self.g.refblock_entries();
        let mut images = Vec::new();
        for (idx, &b) in p.blocks.iter().enumerate() {
            if b == 0 {
                continue;
            }
            let first = idx as u64 * per;
            let mut blk = vec![0u8; cs as usize];
            for k in 0..per {
                let v = value(first + k);
                if v > max {
                    return Err(Qcow2Error::Unsupported(format!(
                        "refcount of host cluster {} would be {v}, more than {max} (refcount_bits too small)",
                        first + k
                    ))
                    .into());
                }
                refcount_set(&mut blk, order, k as usize, v);
            }
            images.push((b, blk));
        }
        for (b, blk) in &images {
            self.pwrite(blk, b << cb)?;
        }
        let mut reftable: Vec<u64> = p.blocks.iter().map(|&b| b << cb).collect();
        reftable.resize((tn * cs / 8) as usize, 0);
        let bytes: Vec<u8> = reftable.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.pwrite(&bytes, t0 << cb)?;
        self.sync()?;
        // The switch: both fields in one write inside the first sector; the dirty bit stays.
        let mut sw = Vec::with_capacity(12);
        sw.extend_from_slice(&(t0 << cb).to_be_bytes());
        sw.extend_from_slice(&(tn as u32).to_be_bytes());
        self.pwrite(&sw, 48)?;
        self.sync()?;
        self.header.refcount_table_offset = t0 << cb;
        self.header.refcount_table_clusters = tn as u32;
        self.reftable = reftable;
        self.block = None;
        self.free_hint = 0;
        let mut freed: Vec<u64> = old.to_vec();
        for &(at, n) in &p.left_over {
            freed.extend(at..at + n);
        }
        freed.retain(|&c| value(c) == 0);
        freed.sort_unstable();
        freed.dedup();
        // QEMU's leak fix discards what it frees: the old structure reads as zeros after
        // it. Nothing names those clusters once the switch is flushed.
        let runs: Vec<(u64, u64)> = freed.iter().map(|&c| (c, 1)).collect();
        self.punch_free(&runs)?;
        Ok(freed)
    }
}

impl Qcow2Update {
    /// After [`Self::rebuild_dirty_in_place`]: the copied flags of the active tables
    /// follow the new refcounts (QEMU's `check_oflag_copied` after its rebuild), then the
    /// dirty bit is cleared, each step flushed (point 3 of the module documentation).
    pub(super) fn finish_dirty_rebuild(&mut self, out: &mut RepairReport) -> Result<()> {
        let (rep, again) = self.reader_check()?;
        out.copied_messages = rep
            .messages
            .iter()
            .filter(|m| m.starts_with(COPIED_PREFIX))
            .map(|m| format!("Repairing{}", &m["ERROR".len()..]))
            .collect();
        for (at, v) in again.copied {
            self.pwrite(&v.to_be_bytes(), at)?;
            out.corruptions_fixed += 1;
        }
        self.sync()?;
        let f = self.header.incompatible_features & !INCOMPAT_DIRTY;
        self.pwrite(&f.to_be_bytes(), 72)?;
        self.sync()?;
        self.header.incompatible_features = f;
        Ok(())
    }
}

#[cfg(test)]
mod tests {

    fn used(n: usize, set: &[usize]) -> Vec<bool> {
        let mut v = vec![false; n];
        for &c in set {
            v[c] = true;
        }
        v
    }

    fn place(u: Vec<bool>, bb: u32, cb: u32) -> super::Placement {
        super::place(u.len() as u64, |c| u[c as usize], bb, cb).unwrap()
    }

    #[test]
    fn dirty_061_layout() {
        // 64 KiB clusters, 16-bit refcounts: header, old table, old block, L1, L2, two data
        // clusters. QEMU: the block at 0x70000, the table at 0x80000.
        let p = place(used(7, &[0, 1, 2, 3, 4, 5, 6]), 15, 16);
        assert_eq!(p.blocks[0], 7);
        assert_eq!(p.table, (8, 1));
        assert!(p.left_over.is_empty());
    }

    #[test]
    fn first_fit_uses_holes() {
        // Free clusters 2 and 5 inside the file: the block takes 2, the table 5.
        let p = place(used(7, &[0, 1, 3, 4, 6]), 15, 16);
        assert_eq!(p.blocks[0], 2);
        assert_eq!(p.table, (5, 1));
    }

    #[test]
    fn block_never_below_its_range() {
        // 512-byte clusters, 16-bit refcounts: 256 entries a block. Used clusters in the
        // second range only; cluster 1 is free, but the second range's block goes into it
        // (searched from the range's start, 256).
        let mut u = used(300, &[0]);
        u[256..300].fill(true);
        let p = place(u, 8, 9);
        assert_eq!(p.blocks[0], 1);
        assert_eq!(p.blocks[1], 300);
        assert_eq!(p.table, (2, 1));
    }

    #[test]
    fn table_growth_places_again() {
        // 512-byte clusters, 16-bit refcounts: 256 entries a block, 64 entries a table
        // cluster. 64 full ranges: the first table cluster is full; the block that covers the
        // blocks past the end needs entry 64, so the table grows and is placed again.
        let n = 64 * 256;
        let p = place(vec![true; n], 8, 9);
        let entries = p.blocks.iter().filter(|&&b| b != 0).count() as u64;
        assert!(p.table.1 * 64 >= entries);
        // The table and every block are themselves in a range that has a block.
        for c in
            (p.table.0..p.table.0 + p.table.1).chain(p.blocks.iter().copied().filter(|&b| b != 0))
        {
            assert_ne!(p.blocks[(c >> 8) as usize], 0, "cluster {c} uncovered");
        }
    }

    /// The skipping allocator picks what QEMU's plain first-fit scan picks.
    #[test]
    fn alloc_is_plain_first_fit() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200 {
            let n = (rnd() % 300) as usize;
            let mut plain: Vec<bool> = (0..n).map(|_| rnd() % 4 != 0).collect();
            let mut m = super::Imrt::new(n as u64, |c| plain[c as usize]).unwrap();
            let mut ff_m = 0u64;
            let mut ff_p = 0u64;
            for _ in 0..20 {
                let want = 1 + rnd() % 3;
                if rnd() % 3 == 0 {
                    let from = rnd() % (n as u64 + 5);
                    ff_m = from;
                    ff_p = from;
                }
                // Plain: the first run of `want` free clusters from ff_p (past the end free).
                let mut c = ff_p;
                let mut first_gap = None;
                let start = loop {
                    let free = |k: u64| !plain.get(k as usize).copied().unwrap_or(false);
                    if free(c) {
                        first_gap.get_or_insert(c);
                        if (c..c + want).all(free) {
                            break c;
                        }
                    }
                    c += 1;
                };
                ff_p = first_gap.unwrap_or(start);
                if plain.len() < (start + want) as usize {
                    plain.resize((start + want) as usize, false);
                }
                for k in start..start + want {
                    plain[k as usize] = true;
                }
                assert_eq!(m.alloc(want, &mut ff_m).unwrap(), start);
                assert_eq!(ff_m, ff_p);
            }
        }
    }
}
