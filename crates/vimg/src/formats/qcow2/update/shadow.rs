//! Shadow switching: a change of the active tables, the snapshot table and the refcounts
//! made atomic (spec: "Header", "Host cluster management", "Cluster mapping" on
//! `QCOW_OFLAG_COPIED`, "Snapshots").
//!
//! Every structure that changes is written into fresh clusters past the end of the file
//! (clusters no table references and the current refcounts do not count): copies of the
//! active L2 tables, the active L1 table, whatever the caller adds (a snapshot's L1 table),
//! the snapshot table, and a complete new refcount table with its blocks, computed from
//! the final state by counting every reference (the checker's count, bounded by the file's
//! size). The copied flags of the new active tables follow those counts. After a flush, one
//! write of the first sector switches `l1_size`, `l1_table_offset`, the refcount table,
//! `nb_snapshots` and `snapshots_offset` at once (all in the first 72 bytes), then a flush.
//!
//! Killed before the header write, the image is the old one with an unreferenced tail
//! (no finding at all: nothing counts or references it); after it, the new one, whose
//! refcounts are exact (the old structures' clusters count 0: not even leaks).

use std::collections::BTreeMap;
use std::io;

use super::*;
use crate::formats::qcow2::check::{reference_counts, RefCounts};

/// Where the next fresh cluster goes, and the file length to go back to on failure.
pub(super) struct Shadow {
    pub(super) next: u64,
    old_len: u64,
    /// Set just before the header write: from then on the tail may be referenced.
    switched: bool,
    /// The header to switch to (its fields other than the tables' places and sizes), when
    /// it differs from the current one: a new `refcount_order` (the new refcount structure
    /// is built with that width), version, feature bits (see `update/rebuild.rs`).
    pub(super) base: Option<Header>,
}

impl Shadow {
    /// Takes `n` fresh clusters without writing them (they read as zeros: a hole of the
    /// file, which the caller extends over them); returns the first one's index.
    pub(super) fn reserve(&mut self, n: u64) -> u64 {
        let c = self.next;
        self.next += n;
        c
    }
}

/// The file with its first sector replaced: the reader sees the image as the new header
/// makes it, before that header is written.
#[derive(Debug)]
struct HeadOverlay {
    inner: FileStorage,
    head: Vec<u8>,
}

impl Storage for HeadOverlay {
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

pub(super) fn be_words(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|e| e.to_be_bytes()).collect()
}

/// How many refcount blocks and refcount table clusters cover `end` clusters plus
/// themselves (placed right after them), with `per_block` entries a block.
fn refcount_layout(end: u64, per_block: u64, cs: u64) -> (u64, u64) {
    let (mut nblocks, mut nt) = (0u64, 0u64);
    loop {
        let covered = end + nblocks + nt;
        let nb2 = covered.div_ceil(per_block);
        let nt2 = (nb2 * 8).div_ceil(cs).max(1);
        if (nb2, nt2) == (nblocks, nt) {
            return (nblocks, nt);
        }
        (nblocks, nt) = (nb2, nt2);
    }
}

impl Qcow2Update {
    /// The references the image makes (counted from its tables, external names denied),
    /// as `head` (a first sector) would make it, or as it is. Read through a duplicate of
    /// the user's own image file.
    pub(super) fn references(&self, head: Option<Vec<u8>>) -> Result<RefCounts> {
        let ro = self
            .file
            .try_clone()
            .map_err(|e| io_err(&self.path, "dup", e))?;
        let inner =
            FileStorage::from_file(ro, &self.path).map_err(|e| io_err(&self.path, "stat", e))?;
        let storage: Arc<dyn Storage> = match head {
            Some(head) => Arc::new(HeadOverlay { inner, head }),
            None => Arc::new(inner),
        };
        let r = Qcow2Reader::open(storage, &self.reader_ctx(ExternalPolicy::Deny))?;
        reference_counts(&r)
    }

    /// Runs `f` on a fresh shadow; on failure the file is cut back to its old length
    /// (nothing in the tail was referenced), so a refusal leaves the image as it was.
    pub(super) fn shadow<F>(&mut self, f: F) -> Result<()>
    where
        F: FnOnce(&mut Self, &mut Shadow) -> Result<()>,
    {
        let cs = self.cs();
        let mut sh = Shadow {
            next: self.file_len.div_ceil(cs),
            old_len: self.file_len,
            switched: false,
            base: None,
        };
        let r = f(self, &mut sh);
        if r.is_err() && !sh.switched {
            let _ = self.set_len(sh.old_len);
        }
        r
    }

    /// Writes `data` (padded to whole clusters) into fresh clusters; returns the offset.
    pub(super) fn shadow_write(&mut self, sh: &mut Shadow, data: &[u8]) -> Result<u64> {
        if data.is_empty() {
            return Ok(0);
        }
        let cs = self.cs();
        let n = (data.len() as u64).div_ceil(cs);
        let at = sh.next << self.cb();
        let mut buf = data.to_vec();
        buf.resize((n * cs) as usize, 0);
        self.pwrite(&buf, at)?;
        sh.next += n;
        Ok(at)
    }

    /// Copies every L2 table `l1` names into fresh clusters (a table named twice is copied
    /// once); returns the L1 entries pointing at the copies (flags clear) and the copies.
    pub(super) fn shadow_copy_l2s(
        &mut self,
        sh: &mut Shadow,
        l1: &[u64],
    ) -> Result<(Vec<u64>, Vec<u64>)> {
        let cs = self.cs() as usize;
        let mut moved: BTreeMap<u64, u64> = BTreeMap::new();
        let mut new_l1 = Vec::with_capacity(l1.len());
        for &e in l1 {
            let l2 = e & L1E_OFFSET_MASK;
            if l2 == 0 {
                new_l1.push(0);
                continue;
            }
            let to = match moved.get(&l2) {
                Some(&to) => to,
                None => {
                    let mut raw = vec![0u8; cs];
                    self.pread(&mut raw, l2)?;
                    let to = self.shadow_write(sh, &raw)?;
                    moved.insert(l2, to);
                    to
                }
            };
            new_l1.push(to);
        }
        Ok((new_l1, moved.into_values().collect()))
    }

    /// Writes `l1` as the active L1 table, `table` (`nb` entries) as the snapshot table and
    /// `size` as the virtual size, a new
    /// refcount structure for the result, sets the copied flags of `l1` and of its L2
    /// tables `l2s` (which must be fresh copies) from the counts, and switches the header
    /// in one write (see the module documentation).
    pub(super) fn shadow_commit(
        &mut self,
        sh: &mut Shadow,
        mut l1: Vec<u64>,
        l2s: &[u64],
        table: &[u8],
        nb: u32,
        size: u64,
    ) -> Result<()> {
        let cs = self.cs();
        let cb = self.cb();
        if table.len() as u64 > MAX_SNAPSHOTS_BYTES {
            return Err(Qcow2Error::Unsupported(
                "the snapshot table would be larger than 64 MiB".into(),
            )
            .into());
        }
        for e in l1.iter_mut() {
            *e &= !OFLAG_COPIED;
        }
        let l1_off = self.shadow_write(sh, &be_words(&l1))?;
        let snap_off = self.shadow_write(sh, table)?;
        let mut h = sh.base.clone().unwrap_or_else(|| self.header.clone());
        // The refcounts are counted under the old width (the overlay's refcount structure
        // is still the old one); the new structure is built with the new width.
        let order = h.refcount_order;
        h.refcount_order = self.header.refcount_order;
        h.l1_table_offset = l1_off;
        h.l1_size = l1.len() as u32;
        h.nb_snapshots = nb;
        h.size = size;
        h.snapshots_offset = snap_off;
        // The image as the new header will make it, still with the old refcounts (the
        // count leaves them out), read and counted.
        let head = self.first_sector_with(&mut h.clone(), None, None, None)?;
        let counts = self.references(Some(head))?;
        // Copied flags from the counts: set where the cluster has exactly one reference.
        let w = self.l2_width();
        for &l2 in l2s {
            let mut raw = self.read_cluster(l2)?;
            let mut changed = false;
            for ent in raw.chunks_exact_mut(w) {
                let v = u64::from_be_bytes(ent[..8].try_into().unwrap_or([0; 8]));
                let host = v & L2E_OFFSET_MASK;
                if v & OFLAG_COMPRESSED != 0 || host == 0 {
                    continue;
                }
                let nv = if counts.get(host >> cb) == 1 {
                    v | OFLAG_COPIED
                } else {
                    v & !OFLAG_COPIED
                };
                if nv != v {
                    ent[..8].copy_from_slice(&nv.to_be_bytes());
                    changed = true;
                }
            }
            if changed {
                self.pwrite(&raw, l2)?;
            }
        }
        let mut l1_changed = false;
        for e in l1.iter_mut() {
            if *e != 0 && counts.get(*e >> cb) == 1 {
                *e |= OFLAG_COPIED;
                l1_changed = true;
            }
        }
        if l1_changed {
            self.pwrite(&be_words(&l1), l1_off)?;
        }
        // The refcount blocks and table after everything else: enough blocks to cover
        // every cluster including themselves.
        let ng = Geometry::new(cb, self.g.extended_l2, order);
        let per_block = ng.refblock_entries();
        let end = sh.next.max(counts.len());
        let (nblocks, nt) = refcount_layout(end, per_block, cs);
        let blocks_at = end;
        let table_at = end + nblocks;
        let structures = blocks_at..table_at + nt;
        let max = ng.refcount_max();
        let value = |c: u64| counts.get(c) + u64::from(structures.contains(&c));
        for c in 0..counts.len() {
            let v = value(c);
            if v > max {
                if order < self.header.refcount_order {
                    // qemu-img amend's words for a narrower width.
                    return Err(Qcow2Error::Unsupported(format!(
                        "Cannot decrease refcount entry width to {} bits: Cluster at offset {:#x} has a refcount of {v}",
                        1u32 << order,
                        c << cb
                    ))
                    .into());
                }
                return Err(Qcow2Error::Unsupported(format!(
                    "refcount of host cluster {c} would be {v}, more than {max} (refcount_bits too small)"
                ))
                .into());
            }
        }
        let mut reftable = vec![0u64; (nt * cs / 8) as usize];
        for (i, slot) in reftable.iter_mut().enumerate().take(nblocks as usize) {
            let first = i as u64 * per_block;
            let mut b = vec![0u8; cs as usize];
            for k in 0..per_block {
                refcount_set(&mut b, order, k as usize, value(first + k));
            }
            let at = (blocks_at + i as u64) << cb;
            self.pwrite(&b, at)?;
            *slot = at;
        }
        self.pwrite(&be_words(&reftable), table_at << cb)?;
        self.sync()?;
        h.refcount_table_offset = table_at << cb;
        h.refcount_table_clusters = nt as u32;
        h.refcount_order = order;
        let first = self.first_sector_with(&mut h, None, None, None)?;
        sh.switched = true;
        self.pwrite(&first, 0)?;
        self.sync()?;
        self.header = h;
        self.g = ng;
        self.l1 = l1;
        self.reftable = reftable;
        self.nb_snapshots = nb;
        self.block = None;
        self.free_hint = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::refcount_layout;

    #[test]
    fn refcount_layout_covers_itself_minimally() {
        for (end, per_block, cs) in [
            (1u64, 2048u64, 512u64),
            (2045, 2048, 512),
            (2046, 2048, 512),
            (2047, 2048, 512),
            (64 * 2048, 2048, 512),
            (10, 65536 * 8, 65536),
            (1 << 20, 32768, 65536),
        ] {
            let (nb, nt) = refcount_layout(end, per_block, cs);
            let covered = end + nb + nt;
            assert!(nb * per_block >= covered, "{end}: blocks cover all");
            assert!(nt * cs >= nb * 8, "{end}: table holds every block");
            assert!((nb - 1) * per_block < covered, "{end}: no spare block");
            assert!(
                nt == 1 || (nt - 1) * cs < nb * 8,
                "{end}: no spare table cluster"
            );
        }
        // A block that would only cover itself needs a second one.
        assert_eq!(refcount_layout(2047, 2048, 512), (2, 1));
    }
}
