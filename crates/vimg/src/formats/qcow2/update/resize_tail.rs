//! `resize` over a longer backing file from a size that ends inside a cluster (iotest
//! 292): QEMU zeroes the rest of the old last cluster with a write; when that cluster is
//! this image's own standard data cluster the write goes where the cluster is, so the
//! file keeps its layout. vimg does the same before the shadow switch that raises the
//! size (rebuild.rs): the bytes zeroed lie past the old virtual size, which no reader
//! sees until the header names the new size, so a crash before the switch leaves the old
//! image as it read, after it the new one.

use super::*;

impl Qcow2Update {
    /// Zeroes, in place, the bytes of the data cluster that standard L2 entry `idx` of
    /// `l2` (a table's raw bytes) names, from `old_size`'s offset in its cluster to the
    /// cluster's end, when that cluster is a standard data cluster (not compressed, not
    /// zero-flagged) that only this image's active state references (no internal snapshots), inside
    /// the file.
    /// Returns false (nothing written) otherwise; the caller then moves the cluster.
    pub(super) fn zero_tail_in_place(
        &mut self,
        l2: &[u8],
        idx: usize,
        old_size: u64,
    ) -> Result<bool> {
        let cs = self.cs();
        let Some(raw) = l2.get(idx * 8..idx * 8 + 8) else {
            return Ok(false);
        };
        let e = u64::from_be_bytes(raw.try_into().unwrap_or([0; 8]));
        let host = e & L2E_OFFSET_MASK;
        if e & (OFLAG_COMPRESSED | OFLAG_ZERO) != 0 || host == 0 || !host.is_multiple_of(cs) {
            return Ok(false);
        }
        if host.checked_add(cs).is_none_or(|end| end > self.file_len) {
            return Ok(false);
        }
        if self.refcount(host >> self.cb())? != 1 {
            return Ok(false);
        }
        let from = old_size % cs;
        // A snapshot may share the table (so the cluster, counted once) and see more.
        if from == 0 || self.nb_snapshots > 0 {
            return Ok(false);
        }
        let zeros = vec![0u8; (cs - from) as usize];
        self.pwrite(&zeros, host + from)?;
        self.sync()?;
        Ok(true)
    }
}
