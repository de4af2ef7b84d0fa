//! `check -r all` of L2 entries whose host offset is not cluster aligned (iotest 271), as
//! QEMU's check repairs them: an entry that holds no data (a preallocated cluster: the
//! zero flag, or with extended L2 entries no allocated subcluster) is replaced by a zero
//! entry ("Repairing offset=...: Preallocated cluster is not properly aligned"), which
//! reads the same; its cluster then has no reference and the refcount repair frees it as
//! a leak. An entry that holds data is left as it is (QEMU reports it and leaves it too).
//!
//! Each fix is one write of the entry (8 or 16 bytes, inside one sector), flushed: a
//! crash leaves the entry old (reported again) or fixed (a leak at worst).

use super::*;

impl Qcow2Update {
    /// Fixes the preallocated misaligned entries of the active and the snapshots' L2
    /// tables (each table once). Returns QEMU's lines and the number fixed.
    pub(super) fn repair_misaligned_prealloc(&mut self) -> Result<(Vec<String>, u64)> {
        let cs = self.cs();
        let width = self.l2_width();
        let mut tables: Vec<u64> = Vec::new();
        let mut l1s = vec![self.l1.clone()];
        if self.nb_snapshots > 0 {
            l1s.extend(self.snapshot_l1_tables()?);
        }
        for l1 in &l1s {
            for &e in l1 {
                let l2 = e & L1E_OFFSET_MASK;
                // Tables the check reports otherwise (unaligned, past the end) are not
                // touched here.
                if l2 != 0
                    && l2.is_multiple_of(cs)
                    && l2.checked_add(cs).is_some_and(|end| end <= self.file_len)
                    && !tables.contains(&l2)
                {
                    tables.push(l2);
                }
            }
        }
        let mut lines = Vec::new();
        for l2 in tables {
            let raw = self.read_cluster(l2)?;
            for (i, chunk) in raw.chunks_exact(width).enumerate() {
                let word =
                    |k: usize| u64::from_be_bytes(chunk[k..k + 8].try_into().unwrap_or([0; 8]));
                let e = word(0);
                let offset = e & L2E_OFFSET_MASK;
                if e & OFLAG_COMPRESSED != 0 || offset == 0 || offset.is_multiple_of(cs) {
                    continue;
                }
                let mut fixed = [0u8; 16];
                let contains_data = if width == 16 {
                    let bitmap = word(8);
                    let zeros = (bitmap | (bitmap << 32)) & 0xffff_ffff_0000_0000;
                    fixed[8..].copy_from_slice(&zeros.to_be_bytes());
                    bitmap & 0xffff_ffff != 0
                } else {
                    fixed[..8].copy_from_slice(&OFLAG_ZERO.to_be_bytes());
                    e & OFLAG_ZERO == 0
                };
                if contains_data {
                    continue;
                }
                self.pwrite(&fixed[..width], l2 + (i * width) as u64)?;
                self.sync()?;
                lines.push(format!(
                    "Repairing offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."
                ));
            }
        }
        let n = lines.len() as u64;
        Ok((lines, n))
    }
}
