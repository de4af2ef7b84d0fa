//! `resize --preallocation=...` over a backing file longer than the old size (iotest
//! 271): the new area must read as zeros, not as the backing file. QEMU's truncate then
//! carries its zero-write flag (block/io.c `bdrv_co_truncate`, block/qcow2.c
//! `qcow2_co_truncate`), which vimg follows:
//!
//! - `falloc` / `full`: the file's new area reads as zeros, so the new clusters are data
//!   clusters as without a backing file; with extended L2 entries every subcluster of them
//!   is marked allocated (bitmap `0x00000000_ffffffff`), else they would read the backing
//!   file (update/prealloc.rs, `alloc_all`);
//! - `metadata`: the clusters are preallocated as without a backing file, then the new
//!   area from the first subcluster boundary at or after the old size is zeroed in the L2
//!   tables (standard entries get the zero flag and keep their cluster; extended entries
//!   keep their cluster with every subcluster zero, or, in the cluster the old size ends
//!   in, the subclusters past it zero), and the part of the subcluster the old size ends
//!   in that lies past it is written as explicit zeros (the guest content before the old
//!   size copied with it, as QEMU's copy-on-write does).
//!
//! Spec: "Cluster mapping", "Extended L2 Entries".
//!
//! Crash safety: everything written here lies past the old virtual size, which the header
//! still names until the final size switch (update/prealloc.rs), except the allocation bit
//! of the subcluster the old size ends in: that bit is set (one entry write, flushed) only
//! after the subcluster's host bytes hold the guest content it had, so the image reads the
//! same before and after it.

use super::*;

/// Extended L2 bitmap: every subcluster allocated, none zero.
pub(super) const ALL_ALLOC_BITMAP: u64 = 0x0000_0000_FFFF_FFFF;
/// Extended L2 bitmap: every subcluster zero, none allocated.
const ALL_ZERO_BITMAP: u64 = 0xFFFF_FFFF_0000_0000;

impl Qcow2Update {
    /// Grows the image to `size` with `prealloc` (not `off`) when a backing file longer
    /// than the current size would show through the new area: preallocated as
    /// [`Self::resize_preallocated`] does, with the new area reading as zeros (see the
    /// module documentation). `head` is the guest content of the cluster the current size
    /// ends in, up to that size (through the backing file where this image has none).
    ///
    /// `tail` is what the backing file holds from `size` to the end of the cluster `size`
    /// ends in (zeros past its end; may be shorter): with `metadata`, QEMU's
    /// copy-on-write of a new last cluster leaves it past the new size, and so does vimg,
    /// so the files match byte for byte (never read: it lies past the virtual size).
    pub fn resize_preallocated_over_backing(
        &mut self,
        size: u64,
        prealloc: Prealloc,
        head: Option<&[u8]>,
        tail: &[u8],
    ) -> Result<()> {
        self.resize_preallocated_mode(size, prealloc, head, Some(tail))
    }

    /// True when the image reads the bytes after `size` in its subcluster from the backing
    /// file now (no host cluster, not compressed, not zero) and `size` ends inside a
    /// subcluster: then preallocation's new last cluster gets them (QEMU's copy-on-write).
    pub(super) fn tail_reads_backing(&self, size: u64) -> Result<bool> {
        let cs = self.cs();
        let sc = self.g.subcluster_size;
        if size.is_multiple_of(sc) {
            return Ok(false);
        }
        let c = size / cs;
        let per = self.g.l2_entries();
        let t = c / per;
        if t >= self.l1.len() as u64 || self.l1[t as usize] & L1E_OFFSET_MASK == 0 {
            return Ok(true);
        }
        let (raw, _) = self.l2_table(t)?;
        let i = c % per;
        let e = self.entry_at(&raw, i);
        if e & (L2E_OFFSET_MASK | OFLAG_COMPRESSED) != 0 {
            return Ok(false);
        }
        if !self.g.extended_l2 {
            return Ok(e & OFLAG_ZERO == 0);
        }
        let bm = word(&raw, (i * 16 + 8) as usize);
        let s = (size - c * cs) / sc;
        Ok(bm & (1u64 << (32 + s)) == 0 && bm & (1u64 << s) == 0)
    }

    /// Writes `tail` (the backing file's bytes from `size` on) over the rest of the
    /// subcluster `size` ends in, in its new host cluster: past the virtual size.
    pub(super) fn write_cow_tail(&mut self, size: u64, tail: &[u8]) -> Result<()> {
        let cs = self.cs();
        let sc = self.g.subcluster_size;
        let c = size / cs;
        let per = self.g.l2_entries();
        let (raw, _) = self.l2_table(c / per)?;
        let host = self.entry_at(&raw, c % per) & L2E_OFFSET_MASK;
        let n = ((size.next_multiple_of(sc) - size) as usize).min(tail.len());
        if host == 0 || n == 0 || tail[..n].iter().all(|&b| b == 0) {
            return Ok(());
        }
        self.pwrite(&tail[..n], host + (size - c * cs))?;
        self.sync()
    }

    /// After `metadata` preallocation of `[old, size)`: makes that area read as zeros
    /// whatever the backing file holds (see the module documentation).
    pub(super) fn zero_preallocated_area(
        &mut self,
        old: u64,
        size: u64,
        head: Option<&[u8]>,
    ) -> Result<()> {
        if size <= old {
            return Ok(());
        }
        let sc = self.g.subcluster_size;
        let zero_start = old.next_multiple_of(sc);
        if size > zero_start {
            self.zero_entries_from(zero_start, size)?;
        }
        if zero_start > old {
            self.zero_partial_subcluster(old, zero_start.min(size), head)?;
        }
        Ok(())
    }

    /// The entries of `[from, size)` (`from` on a subcluster boundary) read as zeros, one
    /// table write per L2 table, as QEMU's `qcow2_subcluster_zeroize` leaves them.
    fn zero_entries_from(&mut self, from: u64, size: u64) -> Result<()> {
        let cs = self.cs();
        let sc = self.g.subcluster_size;
        let per = self.g.l2_entries();
        let width = self.l2_width() as u64;
        let ext = self.g.extended_l2;
        let (c0, end) = (from / cs, size.div_ceil(cs));
        let mut c = c0;
        while c < end {
            let t = c / per;
            let stop = ((t + 1) * per).min(end);
            let (mut raw, l2off) = self.l2_table(t)?;
            if l2off == 0 {
                return Err(self.prealloc_gap(c));
            }
            for k in c..stop {
                let at = ((k - t * per) * width) as usize;
                let e = self.entry_at(&raw, k - t * per);
                if e & OFLAG_COMPRESSED != 0 || e & L2E_OFFSET_MASK == 0 {
                    return Err(self.prealloc_gap(k));
                }
                if !ext {
                    raw[at..at + 8].copy_from_slice(&(e | OFLAG_ZERO).to_be_bytes());
                    continue;
                }
                let lo = if k == c0 { (from - k * cs) / sc } else { 0 };
                let bitmap = if lo == 0 {
                    ALL_ZERO_BITMAP
                } else {
                    // Up to the subcluster the new size ends in (QEMU's head of the
                    // zeroed range), not to the cluster's end.
                    let hi = (size - k * cs).div_ceil(sc).min(32);
                    let old_b = word(&raw, at + 8);
                    let upto = |n: u64| {
                        if n >= 32 {
                            0xFFFF_FFFF
                        } else {
                            (1u64 << n) - 1
                        }
                    };
                    let range = upto(hi) & !upto(lo);
                    (old_b | (range << 32)) & !range
                };
                raw[at + 8..at + 16].copy_from_slice(&bitmap.to_be_bytes());
            }
            self.pwrite(&raw, l2off)?;
            self.sync()?;
            c = stop;
        }
        Ok(())
    }

    /// `[old, stop)`, inside the subcluster the old size ends in, written as zeros; with
    /// extended L2 entries the subcluster becomes allocated, its bytes before `old` the
    /// guest content they had (`head` holds the old last cluster's content).
    fn zero_partial_subcluster(&mut self, old: u64, stop: u64, head: Option<&[u8]>) -> Result<()> {
        let cs = self.cs();
        let sc = self.g.subcluster_size;
        let per = self.g.l2_entries();
        let c = old / cs;
        let t = c / per;
        let (mut raw, l2off) = self.l2_table(t)?;
        let i = c % per;
        let e = self.entry_at(&raw, i);
        let host = e & L2E_OFFSET_MASK;
        if l2off == 0 || host == 0 || e & OFLAG_COMPRESSED != 0 {
            return Err(self.prealloc_gap(c));
        }
        let in_c = old - c * cs;
        let zeros = vec![0u8; (stop - old) as usize];
        if !self.g.extended_l2 {
            self.pwrite(&zeros, host + in_c)?;
            return self.sync();
        }
        let s = in_c / sc;
        let at = (i * 16 + 8) as usize;
        let bitmap = word(&raw, at);
        let (alloc, zero) = (1u64 << s, 1u64 << (32 + s));
        if bitmap & alloc != 0 && bitmap & zero == 0 {
            // Allocated: only the bytes past the old size change.
            self.pwrite(&zeros, host + in_c)?;
            return self.sync();
        }
        // The guest content of the subcluster before `old`, then zeros, then the bit.
        let sc_start = s * sc;
        let before = if bitmap & zero != 0 {
            vec![0u8; (in_c - sc_start) as usize]
        } else {
            head.and_then(|h| h.get(sc_start as usize..in_c as usize))
                .map(<[u8]>::to_vec)
                .ok_or_else(|| {
                    Error::invalid_argument(
                        "internal: the old last cluster's content was not given",
                    )
                })?
        };
        let mut buf = before;
        buf.extend_from_slice(&zeros);
        self.pwrite(&buf, host + sc_start)?;
        self.sync()?;
        let nb = (bitmap | alloc) & !zero;
        raw[at..at + 8].copy_from_slice(&nb.to_be_bytes());
        self.pwrite(&raw[at - 8..at + 8], l2off + i * 16)?;
        self.sync()
    }

    fn prealloc_gap(&self, c: u64) -> Error {
        Error::corrupt(format!(
            "'{}': guest cluster {c} has no data cluster after preallocation",
            self.path.display()
        ))
    }
}

/// The big-endian 64-bit word at `at` of `raw` (0 past its end).
fn word(raw: &[u8], at: usize) -> u64 {
    raw.get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}
