//! `amend -o compat=0.10` of an image with zero clusters and no internal snapshots,
//! expanded where the tables are, as QEMU's downgrade does it (block/qcow2-cluster.c,
//! `qcow2_expand_zero_clusters`; iotest 061 reads the header's table offsets after it):
//! a zero-flagged entry becomes a data cluster of zeros (a fresh one when it had none and a
//! backing file could show through), or unallocated when nothing can show through. The
//! image is still version 3 while the entries change, and every change is from an entry
//! that reads as zeros to one that reads as zeros:
//!
//! 1. per L2 table, each fresh cluster is allocated (refcount raised and flushed), every
//!    cluster the table will name is written with zeros (an allocated zero cluster's old
//!    bytes, which its zero flag hid, included) and flushed;
//! 2. then the table's entries, one write (each 8-byte entry old or new on its own);
//! 3. the caller then rewrites the header as version 2.
//!
//! Killed at any point: the image reads the same and leaks at worst (a cluster allocated
//! whose entry was not yet written). An L2 table or a zero-flagged cluster whose refcount is
//! not 1 (shared) is left to the shadow switch (`rebuild.rs`), which writes copies.

use super::*;

impl Qcow2Update {
    /// Expands the active zero clusters in place (see the module documentation). Returns
    /// false, having written nothing, when the image does not qualify (internal snapshots,
    /// a table or a zero cluster not this image's alone).
    pub(super) fn expand_zeros_in_place(&mut self, backing: bool) -> Result<bool> {
        if self.nb_snapshots > 0 {
            return Ok(false);
        }
        let cb = self.cb();
        let cs = self.cs();
        // Pass 1, nothing written: the tables with zero entries, each this image's own.
        let mut work = Vec::new();
        for (i, e) in self.l1.clone().into_iter().enumerate() {
            let l2 = e & L1E_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let raw = self.read_cluster(l2)?;
            let mut zeros = Vec::new();
            for (j, w) in raw.chunks_exact(8).enumerate() {
                let v = u64::from_be_bytes(w.try_into().unwrap_or([0; 8]));
                if v & OFLAG_COMPRESSED != 0 || v & OFLAG_ZERO == 0 {
                    continue;
                }
                let host = v & L2E_OFFSET_MASK;
                if host != 0 && (self.refcount(host >> cb)? != 1 || !host.is_multiple_of(cs)) {
                    return Ok(false);
                }
                zeros.push((j, host));
            }
            if zeros.is_empty() {
                continue;
            }
            if e & OFLAG_COPIED == 0 || self.refcount(l2 >> cb)? != 1 {
                return Ok(false);
            }
            work.push((i, l2, raw, zeros));
        }
        let zero_cluster = vec![0u8; cs as usize];
        // One progress step per L1 entry, as QEMU counts them (amend -p).
        let steps = self.l1.len() as u64;
        let mut next = 0;
        for (i, l2, mut raw, zeros) in work {
            for j in next..i {
                self.progress(AmendOp::Downgrade, j as u64 + 1, steps);
            }
            next = i + 1;
            let mut news = Vec::with_capacity(zeros.len());
            for (j, host) in zeros {
                let nv = if host != 0 {
                    host | OFLAG_COPIED
                } else if backing {
                    (self.alloc(1)? << cb) | OFLAG_COPIED
                } else {
                    0
                };
                if nv != 0 {
                    self.pwrite(&zero_cluster, nv & L2E_OFFSET_MASK)?;
                }
                news.push((j, nv));
            }
            self.sync()?;
            let lo = news.first().map_or(0, |n| n.0);
            let hi = news.last().map_or(0, |n| n.0);
            for (j, nv) in news {
                raw[j * 8..j * 8 + 8].copy_from_slice(&nv.to_be_bytes());
            }
            self.pwrite(&raw[lo * 8..hi * 8 + 8], l2 + lo as u64 * 8)?;
            self.sync()?;
            self.progress(AmendOp::Downgrade, i as u64 + 1, steps);
        }
        for j in next..self.l1.len() {
            self.progress(AmendOp::Downgrade, j as u64 + 1, steps);
        }
        Ok(true)
    }
}
