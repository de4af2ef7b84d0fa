//! Whole-structure changes made through one shadow switch (`shadow.rs`; spec: "Header",
//! "Reference counts", "Cluster mapping" on zero clusters, "Host cluster management"):
//!
//! - `amend -o refcount_bits=N`: a complete new refcount structure of the new width is
//!   what every shadow switch writes; here it is written with the new `refcount_order`,
//!   which the same first-sector write switches with the refcount table;
//! - `amend -o compat=0.10` of an image with zero clusters: version 2 has no zero flag, so
//!   (as QEMU's downgrade expands them) an allocated zero cluster becomes a data cluster of
//!   zeros, an unallocated one an allocated cluster of zeros when a backing file could
//!   show through, otherwise unallocated. The copies of the L2 tables carry the expanded
//!   entries; each cluster of zeros is a fresh cluster past the old end of the file, never
//!   written (the file's hole reads as zeros), so the old image's clusters are untouched;
//!   the internal snapshots' zero clusters are expanded the same way, in copies of their
//!   L2 and L1 tables that the new snapshot table names;
//! - `check -r all` when used clusters have refcount 0 (QEMU rebuilds the refcount
//!   structures then) of an image that is not dirty: the shadow switch's count from the
//!   references (a dirty image's refcounts are rebuilt in place, where QEMU puts them:
//!   `update/rebuild_dirty.rs`);
//! - `resize` over a longer backing file: the new area reads as zeros (zero-flagged entries
//!   in copies of the last L2 table and in new L2 tables) in the same switch that raises
//!   the virtual size, so no moment shows the backing file's data.
//!
//! Killed before the header write, the image is the old one; after it, the new one with
//! exact refcounts.

use super::*;

/// How the L2 copies change on the way (besides their copied flags, which follow the
/// counts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum L2Change {
    /// Not copied: the active L1 table keeps naming them (the references, so the counts
    /// and the copied flags, do not change; only the refcounts' width does).
    Keep,
    /// Copied as they are (their copied flags then follow the new counts).
    Copy,
    /// Zero clusters expanded for version 2.
    ExpandZeros,
}

impl Qcow2Update {
    /// Switches to header `h` (its version, features and `refcount_order`; the tables'
    /// places are the switch's) with copies of every active L2 table changed by `change`,
    /// the active L1 table, the snapshot table as it is, and a new refcount structure.
    pub(super) fn rebuild_switch(&mut self, h: Header, change: L2Change) -> Result<()> {
        let mut table = self.raw_snapshot_table()?;
        let nb = self.nb_snapshots;
        let size = h.size;
        let l1 = self.l1.clone();
        let backing = self.header.backing_file_offset != 0;
        self.shadow(|s, sh| {
            sh.base = Some(h);
            let (new_l1, l2s) = if change == L2Change::Keep {
                (l1.clone(), Vec::new())
            } else {
                s.shadow_copy_l2s(sh, &l1)?
            };
            if change == L2Change::ExpandZeros {
                // In the active L1 table's order, one progress step per entry (amend -p).
                let steps = s.downgrade_steps()?;
                let mut done = std::collections::HashSet::new();
                for (i, &l2) in new_l1.iter().enumerate() {
                    if l2 != 0 && done.insert(l2) {
                        s.expand_zeros_in(sh, l2, backing)?;
                    }
                    s.progress(AmendOp::Downgrade, i as u64 + 1, steps);
                }
                debug_assert_eq!(done.len(), l2s.len());
                if nb > 0 {
                    table = s.expand_snapshot_zeros(sh, &l1, &new_l1, backing)?;
                }
            }
            // Clusters of zeros are holes below the shadow's next cluster: the file covers
            // them before anything is counted.
            let end = sh.next << s.cb();
            if end > s.file_len {
                s.set_len(end)?;
            }
            s.shadow_commit(sh, new_l1, &l2s, &table, nb, size)
        })
    }

    /// Rewrites the zero-flagged entries of the fresh L2 copy at `l2` as version 2 can
    /// hold them (see the module documentation).
    fn expand_zeros_in(&mut self, sh: &mut shadow::Shadow, l2: u64, backing: bool) -> Result<()> {
        let cb = self.cb();
        let mut raw = self.read_cluster(l2)?;
        let mut changed = false;
        for ent in raw.chunks_exact_mut(8) {
            let v = u64::from_be_bytes(ent.try_into().unwrap_or([0; 8]));
            if v & OFLAG_COMPRESSED != 0 || v & OFLAG_ZERO == 0 {
                continue;
            }
            let host = v & L2E_OFFSET_MASK;
            let nv = if host != 0 || backing {
                // A fresh cluster of zeros (never written: a hole of the file).
                let c = sh.reserve(1);
                c << cb
            } else {
                0
            };
            ent.copy_from_slice(&nv.to_be_bytes());
            changed = true;
        }
        if changed {
            self.pwrite(&raw, l2)?;
        }
        Ok(())
    }

    /// The zero clusters of the internal snapshots, expanded as the active ones are (QEMU's
    /// downgrade expands those of every L1 table, block/qcow2-cluster.c,
    /// `qcow2_expand_zero_clusters`): an L2 table a snapshot names that has a zero-flagged
    /// entry becomes a fresh expanded copy (the active table's copy when the active L1
    /// names the same table), and a snapshot whose L1 table changes gets a fresh copy of
    /// it. Returns the snapshot table with the new L1 offsets; nothing of the old image
    /// is written. `l1`/`new_l1` are the active L1 before and after its tables were copied.
    fn expand_snapshot_zeros(
        &mut self,
        sh: &mut shadow::Shadow,
        l1: &[u64],
        new_l1: &[u64],
        backing: bool,
    ) -> Result<Vec<u8>> {
        let mut moved: std::collections::HashMap<u64, u64> = l1
            .iter()
            .zip(new_l1)
            .map(|(o, n)| (o & L1E_OFFSET_MASK, *n))
            .filter(|(o, _)| *o != 0)
            .collect();
        let mut offsets = Vec::new();
        let snaps = self.snapshot_l1_tables()?;
        let old_offsets = self.snapshot_l1_offsets()?;
        let steps = self.downgrade_steps()?;
        let mut step = l1.len() as u64;
        for (sl1, old_off) in snaps.into_iter().zip(old_offsets) {
            let mut out = sl1.clone();
            let mut changed = false;
            for e in out.iter_mut() {
                step += 1;
                self.progress(AmendOp::Downgrade, step, steps);
                let l2 = *e & L1E_OFFSET_MASK;
                if l2 == 0 {
                    continue;
                }
                let to = match moved.get(&l2) {
                    Some(&to) => Some(to),
                    None if self.table_has_zero(l2)? => {
                        let raw = self.read_cluster(l2)?;
                        let to = self.shadow_write(sh, &raw)?;
                        self.expand_zeros_in(sh, to, backing)?;
                        moved.insert(l2, to);
                        Some(to)
                    }
                    None => None,
                };
                if let Some(to) = to {
                    // A snapshot's tables are never written in place: no copied flag.
                    *e = to;
                    changed = true;
                }
            }
            offsets.push(if changed {
                let bytes: Vec<u8> = out.iter().flat_map(|v| v.to_be_bytes()).collect();
                self.shadow_write(sh, &bytes)?
            } else {
                old_off
            });
        }
        self.raw_snapshot_table_moved(&offsets)
    }

    /// True when the L2 table at `l2` has a zero-flagged (not compressed) entry.
    fn table_has_zero(&self, l2: u64) -> Result<bool> {
        Ok(self.read_cluster(l2)?.chunks_exact(8).any(|w| {
            let v = u64::from_be_bytes(w.try_into().unwrap_or([0; 8]));
            v & OFLAG_COMPRESSED == 0 && v & OFLAG_ZERO != 0
        }))
    }

    /// `check -r all` for an image whose used clusters have refcount 0: a new refcount
    /// structure from the references, the copied flags from it, the dirty bit cleared.
    /// Reported as QEMU reports its rebuild: `Rebuilding refcount structure`, then the old
    /// structure's clusters, which no longer have a reference (`Repairing cluster C
    /// refcount=1 reference=0`: QEMU's new structure counts them once, then frees them; the
    /// shadow switch's counts them 0 at once), every first-check finding fixed.
    pub(super) fn repair_by_rebuild(
        &mut self,
        found: &crate::formats::qcow2::check::Findings,
        out: &mut RepairReport,
    ) -> Result<()> {
        let cb = self.cb();
        let mut old: Vec<u64> = self
            .reftable
            .iter()
            .map(|e| e & REFT_OFFSET_MASK)
            .filter(|&o| o != 0)
            .map(|o| o >> cb)
            .collect();
        let t = self.header.refcount_table_offset >> cb;
        old.extend(t..t + u64::from(self.header.refcount_table_clusters));
        old.sort_unstable();
        old.dedup();
        let dirty = self.header.incompatible_features & INCOMPAT_DIRTY != 0;
        let freed = if dirty {
            // In place, where QEMU puts it (update/rebuild_dirty.rs).
            self.rebuild_dirty_in_place(&old)?
        } else {
            let mut h = self.header.clone();
            h.incompatible_features &= !INCOMPAT_DIRTY;
            self.rebuild_switch(h, L2Change::Copy)?;
            old
        };
        out.messages.push("Rebuilding refcount structure".into());
        for c in freed {
            out.messages
                .push(format!("Repairing cluster {c} refcount=1 reference=0"));
        }
        for &(_, stored, counted) in &found.refcounts {
            if stored > counted {
                out.leaks_fixed += 1;
            } else {
                out.corruptions_fixed += 1;
            }
        }
        if dirty {
            self.finish_dirty_rebuild(out)?;
        }
        Ok(())
    }
}

impl Qcow2Update {
    /// `resize` to a larger `size` of an image whose backing file is longer than its
    /// virtual size: the new area reads as zeros, not as the backing file's data, as
    /// qemu-img makes it (zero clusters over the whole new area). One shadow switch: copies
    /// of the L2 tables, the entries of the new area zero-flagged in the copy of the last
    /// one and in new tables, a longer L1 table; the header's size, L1 table and refcount
    /// table change in the one write, so no moment shows the backing data; internal
    /// snapshots keep their tables (those they share with the active state are copied,
    /// never written). Version 2 has
    /// no zero clusters: refused with qemu-img's words. With extended L2 entries the new
    /// area's subclusters are zero-flagged in the bitmaps. An old size that ends inside a
    /// cluster needs [`Self::resize_zeroing_with`].
    pub fn resize_zeroing(&mut self, size: u64) -> Result<()> {
        self.resize_zeroing_with(size, None)
    }

    /// [`Self::resize_zeroing`]; when the old size ends inside a cluster, `head` is the
    /// guest content of that cluster up to the old size as it reads now (through the
    /// backing chain; the caller reads it). QEMU zeroes the rest of that cluster with a
    /// write, which allocates it (the backing file's part copied); here a fresh cluster
    /// holding `head` and zeros takes its place in the same switch.
    pub fn resize_zeroing_with(&mut self, size: u64, head: Option<&[u8]>) -> Result<()> {
        let old = self.header.size;
        if size <= old {
            return self.resize(size, Prealloc::Off);
        }
        if self.header.version < 3 {
            return Err(Error::unsupported(
                "Failed to zero out new clusters: Operation not supported",
            ));
        }
        if !size.is_multiple_of(512) {
            return Err(Error::invalid_argument(
                "The new size must be a multiple of 512",
            ));
        }
        if size > limits::MAX_VIRTUAL_SIZE {
            return Err(Error::unsupported(format!(
                "Image is too big (virtual size {size} exceeds vimg's limit of {} bytes)",
                limits::MAX_VIRTUAL_SIZE
            )));
        }
        let cs = self.cs();
        if !old.is_multiple_of(cs) {
            super::crypt_rules::refuse_partial_zeroing(self.cipher.is_some())?;
        }
        let partial = match head {
            _ if old.is_multiple_of(cs) => None,
            Some(h) if h.len() as u64 == old % cs => Some((old / cs, h.to_vec())),
            _ => {
                return Err(Error::unsupported(format!(
                    "vimg zeroes the new area over a longer backing file of an image whose old size is not a multiple of the cluster size ({cs}) only with the old last cluster's content"
                )))
            }
        };
        let extended = self.g.extended_l2;
        let width = self.l2_width() as u64;
        if self.has_data_file || self.has_bitmaps {
            return Err(Error::unsupported(
                "vimg does not resize qcow2 images with an external data file or persistent bitmaps",
            ));
        }
        // Internal snapshots keep their own tables and sizes: the switch copies the active
        // tables only, keeps the snapshot table, and counts the references of both.
        self.require_consistent()?;
        let need = self.g.l1_entries_for(size);
        if need * 8 > MAX_L1_BYTES {
            return Err(Error::unsupported(format!(
                "Image is too big: its L1 table would need {} bytes (limit {MAX_L1_BYTES})",
                need * 8
            )));
        }
        // Without snapshots and from a cluster boundary, in place as QEMU does it
        // (update/resize_zero.rs).
        if partial.is_none() && self.resize_zeroing_in_place(size)? {
            return Ok(());
        }
        let per = self.g.l2_entries();
        // Zero clusters from the first whole cluster past the old end.
        let first = old.div_ceil(cs);
        let last = size.div_ceil(cs);
        let start = partial.as_ref().map_or(first, |p| p.0);
        let l1 = self.l1.clone();
        let mut h = self.header.clone();
        h.size = size;
        let table = self.raw_snapshot_table()?;
        let nb = self.nb_snapshots;
        self.shadow(|s, sh| {
            sh.base = Some(h);
            let (mut new_l1, mut l2s) = s.shadow_copy_l2s(sh, &l1)?;
            new_l1.resize(need as usize, 0);
            for i in start / per..last.div_ceil(per) {
                let lo = first.max(i * per) - i * per;
                let hi = last.min((i + 1) * per) - i * per;
                let at = new_l1[i as usize];
                let mut raw = if at != 0 {
                    s.read_cluster(at)?
                } else {
                    vec![0u8; cs as usize]
                };
                let sub = cs / 32;
                // A compressed last cluster (no subclusters) is replaced whole.
                let compressed = partial.as_ref().filter(|p| p.0 / per == i).is_some_and(|p| {
                    let at = ((p.0 % per) * width) as usize;
                    let mut e = [0u8; 8];
                    e.copy_from_slice(&raw[at..at + 8]);
                    u64::from_be_bytes(e) & OFLAG_COMPRESSED != 0
                });
                let sub_aligned = extended && old.is_multiple_of(sub) && !compressed;
                let in_place = match partial.as_ref().filter(|p| p.0 / per == i && !extended) {
                    Some(p) => s.zero_tail_in_place(&raw, (p.0 % per) as usize, old)?,
                    None => false,
                };
                if let Some((c, _)) = partial.as_ref().filter(|p| p.0 / per == i && sub_aligned) {
                    // Extended L2, the old end on a subcluster boundary: the subclusters from
                    // it on read as zeros, the others stay as they are (QEMU's zero write
                    // there changes only those subclusters).
                    let at = ((c % per) * width) as usize;
                    let mut bm = [0u8; 8];
                    bm.copy_from_slice(&raw[at + 8..at + 16]);
                    let bm = u64::from_be_bytes(bm);
                    let from = (old % cs) / sub;
                    let mask = (0xFFFF_FFFFu64 >> from) << from;
                    let nb = (bm & !mask) | (mask << 32);
                    raw[at + 8..at + 16].copy_from_slice(&nb.to_be_bytes());
                } else if in_place {
                    // The old last cluster is this image's own data cluster: its tail past
                    // the old end was zeroed where it is (update/resize_tail.rs), as QEMU's
                    // zero write does; the entry stays.
                } else if let Some((c, head)) = partial.as_ref().filter(|p| p.0 / per == i) {
                    // The old last cluster: its content up to the old end, then zeros, in
                    // a fresh cluster (the old one, if any, loses this reference).
                    let mut data = head.clone();
                    data.resize(cs as usize, 0);
                    let host = s.shadow_write(sh, &data)?;
                    let at = ((c % per) * width) as usize;
                    raw[at..at + 8].copy_from_slice(&host.to_be_bytes());
                    if extended {
                        // Every subcluster allocated.
                        raw[at + 8..at + 16].copy_from_slice(&0xFFFF_FFFFu64.to_be_bytes());
                    }
                }
                for j in lo..hi {
                    let at = (j * width) as usize;
                    let ent = &mut raw[at..at + 8];
                    let v = u64::from_be_bytes((&*ent).try_into().unwrap_or([0; 8]));
                    if v & OFLAG_COMPRESSED != 0 {
                        return Err(Error::unsupported(
                            "a compressed cluster lies past the old end of the image; vimg does not zero it",
                        ));
                    }
                    if extended {
                        // Spec "Extended L2 Entries": every subcluster reads as zeros (the
                        // upper 32 bits of the bitmap), none allocated; the standard part
                        // keeps its host cluster, as QEMU's zeroing keeps it.
                        ent.copy_from_slice(&(v & L2E_OFFSET_MASK).to_be_bytes());
                        let bitmap = &mut raw[at + 8..at + 16];
                        bitmap.copy_from_slice(&0xFFFF_FFFF_0000_0000u64.to_be_bytes());
                    } else {
                        ent.copy_from_slice(&((v & L2E_OFFSET_MASK) | OFLAG_ZERO).to_be_bytes());
                    }
                }
                if at != 0 {
                    s.pwrite(&raw, at)?;
                } else {
                    let to = s.shadow_write(sh, &raw)?;
                    new_l1[i as usize] = to;
                    l2s.push(to);
                }
            }
            s.shadow_commit(sh, new_l1, &l2s, &table, nb, size)
        })
    }
}

impl Qcow2Update {
    /// Shrinks a version 3 image that has internal snapshots (qemu-img allows it: each
    /// snapshot keeps its own size). The L2 tables may be shared with snapshots, so they are
    /// never written in place: one shadow switch with copies of the active L2 tables whose
    /// entries past the new end are cleared, the L1 entries of tables wholly past it
    /// dropped, the new size, and refcounts counted from that (the clusters only the
    /// active state used are free, the snapshots' stay).
    pub(super) fn shrink_shadowed(&mut self, size: u64) -> Result<()> {
        let cs = self.cs();
        let per = self.g.l2_entries();
        let width = self.l2_width() as u64;
        let keep = size.div_ceil(cs);
        let mut l1 = self.l1.clone();
        for (i, e) in l1.iter_mut().enumerate() {
            if i as u64 * per >= keep {
                *e = 0;
            }
        }
        let mut h = self.header.clone();
        h.size = size;
        let table = self.raw_snapshot_table()?;
        let nb = self.nb_snapshots;
        self.shadow(|s, sh| {
            sh.base = Some(h);
            let (new_l1, l2s) = s.shadow_copy_l2s(sh, &l1)?;
            let i = keep / per;
            if let Some(&at) = new_l1.get(i as usize) {
                let from = keep - i * per;
                if at != 0 && from > 0 {
                    let mut raw = s.read_cluster(at)?;
                    raw[(from * width) as usize..].fill(0);
                    s.pwrite(&raw, at)?;
                }
            }
            s.shadow_commit(sh, new_l1, &l2s, &table, nb, size)
        })
    }
}
