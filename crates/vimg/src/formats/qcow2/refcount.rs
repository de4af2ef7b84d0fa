//! The refcount allocator of a qcow2 file being written: hands out host clusters (and bytes,
//! for compressed clusters) from a frontier that only moves forward, and keeps the refcount
//! table and blocks that count them (spec: "Host cluster management"). A refcount block is
//! written once the frontier has passed its range.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileExt;

use super::header::*;
use crate::error::{Error, ErrorKind, Result};
use crate::output::OutFile;

/// The refcount blocks and refcount table clusters that count `clusters` clusters and
/// themselves: the fixed point of QEMU's `qcow2_refcount_metadata_size` (without its
/// generous increase).
pub(crate) fn refcount_structure(
    clusters: u64,
    cluster_size: u64,
    refcount_order: u32,
) -> (u64, u64) {
    let blocks_per_table_cluster = cluster_size / 8;
    let refcounts_per_block = cluster_size * 8 / (1u64 << refcount_order);
    let mut table = 0u64;
    let mut blocks = 0u64;
    let mut n = 0u64;
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(refcounts_per_block);
        table = blocks.div_ceil(blocks_per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            break;
        }
    }
    (blocks, table)
}

/// Host cluster allocation and the refcounts that go with it. Allocation only moves
/// forward, so a refcount block is final once the allocation has passed its range; it is
/// written then and dropped from memory.
pub(super) struct Alloc {
    pub(super) cb: u32,
    pub(super) cs: u64,
    pub(super) order: u32,
    pub(super) region_bits: u32,
    pub(super) max_refcount: u64,
    /// Next free cluster; every cluster below is used (or deliberately freed).
    pub(super) next: u64,
    /// Where the next compressed bytes may go (0: start a new cluster).
    pub(super) free_byte: u64,
    /// Refcount block offset per region (0: none yet).
    pub(super) reftable: Vec<u64>,
    /// Refcount blocks still in memory, by region.
    pub(super) blocks: BTreeMap<u64, Vec<u8>>,
    /// The end of the last refcount block written (a block may be the file's last
    /// cluster: it goes after the run that needed it).
    pub(super) written_end: u64,
    /// Regions whose refcount block has its place (made by [`Alloc::refcount_area`]) but
    /// holds only zeros so far: brought into memory when a refcount in it is set, written
    /// as zeros at `finish` otherwise (QEMU writes them).
    pub(super) unborn: BTreeSet<u64>,
    /// The refcount table: its first cluster and its length in clusters (cluster 1, one
    /// cluster, unless [`Alloc::refcount_area`] moved it).
    pub(super) table_at: u64,
    pub(super) table_clusters: u64,
}

impl Alloc {
    pub(super) fn region(&self, c: u64) -> u64 {
        c >> self.region_bits
    }

    pub(super) fn has_block(&self, r: u64) -> bool {
        self.reftable.get(r as usize).is_some_and(|&o| o != 0)
    }

    /// Gives region `r` a refcount block, allocated at the frontier. As in QEMU's
    /// `alloc_refcount_block`, a block that lands in another region without a block of its
    /// own is counted by a further block placed right after it (which describes itself).
    pub(super) fn ensure_region(&mut self, r: u64) -> Result<()> {
        self.ensure_region_depth(r, 0)
    }

    fn ensure_region_depth(&mut self, r: u64, depth: u32) -> Result<()> {
        if self.has_block(r) {
            return Ok(());
        }
        if depth > 4 {
            return Err(Error::msg(
                ErrorKind::Io,
                "qcow2 refcount block allocation did not settle",
            ));
        }
        if r >= MAX_REFTABLE_BYTES / 8 {
            return Err(Error::unsupported(
                "qcow2 image too large for its cluster size and refcount width (refcount table over 8 MiB)",
            ));
        }
        let c = self.next;
        self.check_end(c + 1)?;
        if self.reftable.len() <= r as usize {
            self.reftable.resize(r as usize + 1, 0);
        }
        self.reftable[r as usize] = c << self.cb;
        self.blocks.insert(r, vec![0u8; self.cs as usize]);
        self.next += 1;
        let rc = self.region(c);
        if rc != r {
            self.ensure_region_depth(rc, depth + 1)?;
        }
        self.bump(c)
    }

    /// Refuses a file that would grow past 2^56 bytes (clusters below `end`).
    fn check_end(&self, end: u64) -> Result<()> {
        if end.checked_shl(self.cb).is_none_or(|e| e > 1u64 << 56) {
            return Err(Error::unsupported("qcow2 image would grow past 2^56 bytes"));
        }
        Ok(())
    }

    /// Allocates `n` contiguous clusters at the frontier; with `refcount`, each gets
    /// refcount 1. A region the run enters without a refcount block gets one right after
    /// the run, where QEMU's allocator puts it (the run stays contiguous).
    pub(super) fn alloc(&mut self, file: &OutFile, n: u64, refcount: bool) -> Result<u64> {
        let first = self.next;
        self.check_end(first + n)?;
        self.next += n;
        for r in self.region(first)..=self.region(first + n.max(1) - 1) {
            self.ensure_region(r)?;
        }
        if refcount {
            for c in first..first + n {
                self.bump(c)?;
            }
        }
        self.flush_done(file)?;
        Ok(first)
    }

    pub(super) fn get(&self, c: u64) -> u64 {
        let r = self.region(c);
        let idx = (c & ((1u64 << self.region_bits) - 1)) as usize;
        self.blocks
            .get(&r)
            .map_or(0, |b| refcount_get(b, self.order, idx))
    }

    pub(super) fn set(&mut self, c: u64, v: u64) -> Result<()> {
        let r = self.region(c);
        self.born(r);
        let idx = (c & ((1u64 << self.region_bits) - 1)) as usize;
        let order = self.order;
        let b = self.blocks.get_mut(&r).ok_or_else(|| {
            Error::msg(
                ErrorKind::Io,
                format!("qcow2 refcount block {r} is no longer in memory"),
            )
        })?;
        refcount_set(b, order, idx, v);
        Ok(())
    }

    /// Brings an unborn block of `r` ([`Alloc::unborn`]) into memory, as zeros.
    fn born(&mut self, r: u64) {
        if self.unborn.remove(&r) {
            self.blocks.insert(r, vec![0u8; self.cs as usize]);
        }
    }

    /// QEMU's `qcow2_refcount_area` (exact size) on the image being written, as its
    /// `falloc`/`full` preallocation calls it: at cluster `start` (the frontier) new
    /// refcount blocks for every region up to `start + additional` clusters and the
    /// refcount structures themselves that has none, then a new refcount table after them,
    /// every cluster of both counted; the old table's clusters freed. Returns the first
    /// cluster after the new table, the new frontier.
    pub(super) fn refcount_area(
        &mut self,
        file: &OutFile,
        start: u64,
        additional: u64,
    ) -> Result<u64> {
        if start != self.next {
            return Err(Error::msg(
                ErrorKind::Io,
                "qcow2 refcount area placed off the frontier",
            ));
        }
        let clusters = start
            .checked_add(additional)
            .ok_or_else(|| Error::unsupported("qcow2 image too large"))?;
        let (blocks, _) = refcount_structure(clusters, self.cs, self.order);
        let per_cluster = self.cs / 8;
        let t = blocks.div_ceil(per_cluster).max(1);
        if t * self.cs > MAX_REFTABLE_BYTES {
            return Err(Error::unsupported(
                "qcow2 image too large for its cluster size and refcount width (refcount table over 8 MiB)",
            ));
        }
        let area = self.region(start);
        let missing: Vec<u64> = (area..blocks).filter(|&r| !self.has_block(r)).collect();
        let table_at = start + missing.len() as u64;
        let end = table_at + t;
        self.check_end(end)?;
        if self.reftable.len() < blocks as usize {
            self.reftable.resize(blocks as usize, 0);
        }
        for (j, &r) in missing.iter().enumerate() {
            self.reftable[r as usize] = (start + j as u64) << self.cb;
            self.unborn.insert(r);
        }
        for c in start..end {
            self.born(self.region(c));
            self.bump(c)?;
        }
        let (old_at, old_n) = (self.table_at, self.table_clusters);
        self.next = end;
        self.table_at = table_at;
        self.table_clusters = t;
        for c in old_at..old_at + old_n {
            self.release(file, c)?;
        }
        self.flush_done(file)?;
        Ok(end)
    }

    pub(super) fn bump(&mut self, c: u64) -> Result<()> {
        let v = self.get(c);
        if v >= self.max_refcount {
            return Err(Error::msg(
                ErrorKind::Io,
                format!("qcow2 refcount of cluster {c} would overflow"),
            ));
        }
        self.set(c, v + 1)
    }

    /// Drops one reference to cluster `c` (a preallocated cluster that a zero write
    /// freed), reading its refcount block back when it was written already.
    pub(super) fn release(&mut self, file: &OutFile, c: u64) -> Result<()> {
        let r = self.region(c);
        self.born(r);
        if !self.blocks.contains_key(&r) {
            let at = self
                .reftable
                .get(r as usize)
                .copied()
                .filter(|&o| o != 0)
                .ok_or_else(|| {
                    Error::msg(
                        ErrorKind::Io,
                        format!("qcow2 cluster {c} has no refcount block to free it in"),
                    )
                })?;
            let f = file
                .file()
                .ok_or_else(|| Error::unsupported("qcow2 output must be a regular file"))?;
            let mut b = vec![0u8; self.cs as usize];
            f.read_exact_at(&mut b, at)
                .map_err(|e| Error::io(format_args!("read back refcount block at {at:#x}"), e))?;
            self.blocks.insert(r, b);
        }
        match self.get(c) {
            0 => Err(Error::msg(
                ErrorKind::Io,
                format!("qcow2 cluster {c} would be freed twice"),
            )),
            v => self.set(c, v - 1),
        }
    }

    /// Writes and drops the refcount blocks the allocation has passed (block 0 stays until
    /// `finish`, which may free the reserved refcount table cluster).
    pub(super) fn flush_done(&mut self, file: &OutFile) -> Result<()> {
        let cur = self.region(self.next);
        if cur <= 1 {
            return Ok(());
        }
        let fb = (self.free_byte != 0).then(|| self.region(self.free_byte >> self.cb));
        let done: Vec<u64> = self
            .blocks
            .range(1..cur)
            .map(|(&r, _)| r)
            .filter(|&r| Some(r) != fb)
            .collect();
        for r in done {
            if let Some(b) = self.blocks.remove(&r) {
                let at = self.reftable[r as usize];
                file.write_all_at(&b, at)?;
                self.written_end = self.written_end.max(at + self.cs);
            }
        }
        Ok(())
    }

    /// Allocates `size` bytes for compressed data, packed after the previous ones as
    /// QEMU's `qcow2_alloc_bytes` does.
    pub(super) fn alloc_bytes(&mut self, file: &OutFile, size: u64) -> Result<u64> {
        let cs = self.cs;
        let mut offset = self.free_byte;
        if offset != 0 && self.get(offset >> self.cb) >= self.max_refcount {
            offset = 0;
        }
        let free_in_cluster = cs - (offset & (cs - 1));
        if offset == 0 || free_in_cluster < size {
            let nc = self.alloc(file, 1, false)? << self.cb;
            if offset == 0 || offset.div_ceil(cs) * cs != nc {
                offset = nc;
            }
        }
        for c in (offset >> self.cb)..=((offset + size - 1) >> self.cb) {
            self.bump(c)?;
        }
        self.free_byte = offset + size;
        if self.free_byte.is_multiple_of(cs) {
            self.free_byte = 0;
        }
        self.flush_done(file)?;
        Ok(offset)
    }
}
