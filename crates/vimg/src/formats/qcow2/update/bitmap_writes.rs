//! Guest writes into an image with persistent dirty bitmaps (spec: "Bitmaps", the
//! `in_use` flag; QEMU's rule for a bitmap it tracks writes in): every enabled bitmap
//! (the `auto` flag) gets the bits of every written range set, as QEMU sets them when it
//! writes (one bit a granule touched, writes of zeros and discards included).
//!
//! Crash rules, QEMU's: before the first write, the enabled bitmaps are marked in use (a
//! new directory, switched in by the header sector as `bitmap` does it). After the last
//! write, each gets a new bitmap table with the bits added, written into fresh clusters,
//! and one more directory switch clears the flags and names the new tables; the old
//! tables are freed after it. Killed in between, the bitmaps are in use, which QEMU reads
//! as inconsistent (to be removed or cleared, never trusted), and the new tables' clusters
//! at worst leak.

use super::*;

impl Qcow2Update {
    /// Marks the enabled bitmaps in use before guest writes; from then on the writes'
    /// ranges are recorded. Bitmaps already in use (inconsistent) are refused.
    pub(in crate::formats::qcow2::update) fn bitmaps_begin_writes(&mut self) -> Result<()> {
        if !self.has_bitmaps {
            return Ok(());
        }
        let (ext, mut dir) = self.read_bitmap_dir()?;
        if let Some(d) = dir.iter().find(|d| d.e.flags & BME_FLAG_IN_USE != 0) {
            return Err(Error::unsupported(format!(
                "bitmap '{}' is inconsistent (in use); vimg does not write guest data into the image",
                crate::escape::escape_control(&d.name)
            )));
        }
        let mut any = false;
        for d in dir.iter_mut() {
            if d.e.flags & BME_FLAG_AUTO != 0 {
                d.e.flags |= BME_FLAG_IN_USE;
                any = true;
            }
        }
        if any {
            self.replace_bitmap_dir(ext, &dir, Vec::new())?;
        }
        self.written = Some(Vec::new());
        Ok(())
    }

    /// Records the guest bytes `[off, off + len)` as written.
    pub(in crate::formats::qcow2::update) fn note_written(&mut self, off: u64, len: u64) {
        if let Some(w) = self.written.as_mut() {
            match w.last_mut() {
                Some((o, l)) if *o + *l == off => *l += len,
                _ => w.push((off, len)),
            }
        }
    }

    /// Writes the enabled bitmaps with the recorded ranges set, clearing their in-use
    /// flags (see the module documentation).
    pub(in crate::formats::qcow2::update) fn bitmaps_end_writes(&mut self) -> Result<()> {
        let Some(written) = self.written.take() else {
            return Ok(());
        };
        let (ext, mut dir) = self.read_bitmap_dir()?;
        let mut garbage = Vec::new();
        let mut changed = false;
        for slot in dir.iter_mut() {
            let d = slot.clone();
            if d.e.flags & BME_FLAG_IN_USE == 0 || d.e.flags & BME_FLAG_AUTO == 0 {
                continue;
            }
            let mut bits = self.read_bitmap_bits(&d)?;
            let g = d.e.granularity_bits;
            for &(off, len) in &written {
                if len == 0 {
                    continue;
                }
                let first = off >> g;
                let last = (off + len - 1) >> g;
                for k in first..=last {
                    if let Some(b) = bits.get_mut((k / 8) as usize) {
                        *b |= 1 << (k % 8);
                    }
                }
            }
            let entries = self.bitmap_table_entries(g);
            let table = self.write_bitmap_table(entries, Some(&bits))?;
            garbage.extend(self.bitmap_clusters(&d)?);
            slot.e.table_offset = table;
            slot.e.table_size = entries as u32;
            slot.e.flags &= !BME_FLAG_IN_USE;
            changed = true;
        }
        if changed {
            self.replace_bitmap_dir(ext, &dir, garbage)?;
        }
        Ok(())
    }
}
