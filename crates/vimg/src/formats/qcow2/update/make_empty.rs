//! Emptying the top image after `commit`, as QEMU's qcow2 driver empties it
//! (block/qcow2.c, `qcow2_make_empty`): a version 3 image without internal snapshots,
//! persistent bitmaps, encryption or an external data file, whose L1 table fits the first
//! refcount block's range after the header, reference and L1 clusters, becomes completely
//! empty: its L1 table all zeros at cluster 3, the refcount table at cluster 1 naming one
//! refcount block at cluster 2 that counts only clusters 0 to 3 + L1 clusters, and the
//! file cut there. The result is byte for byte the file QEMU leaves.
//!
//! QEMU gets there by marking the image dirty and rewriting its structures; vimg does it
//! only when they already lie where QEMU puts them (the layout `create` makes and keeps),
//! in an order where every step leaves an image `qemu-img check` finds clean or leaking:
//!
//! 1. the L1 table is zeroed (flushed): every L2 table and data cluster is now leaked,
//!    and the guest reads through to the backing file, which holds what was committed;
//! 2. the refcount table entries after the first are cleared (flushed): the clusters they
//!    described are unreferenced, so a refcount of 0 is right for them;
//! 3. the first block's refcounts past the kept clusters are zeroed (flushed);
//! 4. the file is cut after the kept clusters (all of the rest have refcount 0).
//!
//! As QEMU does, the image is marked dirty before step 1 and clean after step 4. vimg's
//! order does not need the mark (no step breaks the refcounts), but an image left half
//! emptied by an error (or a crash) then carries it as one QEMU left would: QEMU drops its
//! leaks the next time it opens it for writing, and vimg's updaters ask for `check -r`.
//!
//! blkdebug events (`blkdebug::writes`): `l1_update` before step 1; `empty_image_prepare`
//! after it; `reftable_update` before step 2; `refblock_alloc` (in the refcount code)
//! before step 3. QEMU fires the last two after it has overwritten the refcount
//! structures, so an error there leaves QEMU an image whose refcounts must be rebuilt;
//! vimg's image then only leaks (a deliberate difference: vimg never breaks them).
//!
//! Any other layout keeps QEMU's fallback behaviour (every cluster discarded, the L2
//! tables kept): [`super::DataWriter::unmap_mapped`].

use super::data::DataWriter;
use super::*;
use crate::blkdebug::Event;

impl DataWriter<'_> {
    /// Empties the image completely (see the module documentation); false when the image
    /// is not in the form that allows it (nothing written then).
    pub fn make_completely_empty(&mut self) -> Result<bool> {
        self.up.make_completely_empty()
    }
}

impl Qcow2Update {
    /// Sets or clears the dirty bit (incompatible feature bit 0, one 8-byte header field),
    /// flushed.
    fn set_dirty(&mut self, dirty: bool) -> Result<()> {
        let f = if dirty {
            self.header.incompatible_features | INCOMPAT_DIRTY
        } else {
            self.header.incompatible_features & !INCOMPAT_DIRTY
        };
        self.pwrite(&f.to_be_bytes(), 72)?;
        self.sync()?;
        self.header.incompatible_features = f;
        Ok(())
    }

    fn make_completely_empty(&mut self) -> Result<bool> {
        let cs = self.cs();
        let h = &self.header;
        if h.version < 3
            || self.nb_snapshots > 0
            || self.has_bitmaps
            || self.has_data_file
            || h.crypt_method != 0
            || self.l1.is_empty()
        {
            return Ok(false);
        }
        let l1_clusters = (self.l1.len() as u64 * 8).div_ceil(cs);
        let keep = 3 + l1_clusters;
        if keep > self.g.refblock_entries()
            || h.refcount_table_offset != cs
            || h.refcount_table_clusters != 1
            || h.l1_table_offset != 3 * cs
            || self.reftable.first().copied() != Some(2 * cs)
            || keep * cs > self.file_len
        {
            return Ok(false);
        }
        for c in 0..keep {
            if self.refcount(c)? != 1 {
                return Ok(false);
            }
        }
        self.set_dirty(true)?;
        // 1. The L1 table.
        self.debug_event(Event::L1Update);
        self.pwrite_zeroes(3 * cs, l1_clusters * cs)?;
        self.sync()?;
        self.l1.iter_mut().for_each(|e| *e = 0);
        self.debug_event(Event::EmptyImagePrepare);
        // 2. The refcount table after its first entry.
        self.debug_event(Event::ReftableUpdate);
        if self.reftable.iter().skip(1).any(|&e| e != 0) {
            self.pwrite_zeroes(cs + 8, cs - 8)?;
            self.sync()?;
            self.reftable.iter_mut().skip(1).for_each(|e| *e = 0);
            self.block = None;
        }
        // 3. The first block's counts past the kept clusters.
        let rest = self.g.refblock_entries() - keep;
        self.set_refcounts(keep, rest, |_| Ok(0))?;
        self.sync()?;
        // 4. The file.
        self.set_len(keep * cs)?;
        self.sync()?;
        self.set_dirty(false)?;
        self.free_hint = keep;
        self.compressed_tail = 0;
        Ok(true)
    }
}
