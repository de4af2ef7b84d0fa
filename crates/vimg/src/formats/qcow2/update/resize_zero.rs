//! `resize` over a longer backing file without a shadow switch (iotest 271 reads the L2
//! table at its old offset afterwards): QEMU zero-flags the new area's entries in the L2
//! tables where they are and adds the tables the new area needs. vimg does the same when
//! it is crash-safe, which it is when no internal snapshot shares a table (every table
//! written is this image's own) and the old size is a multiple of the cluster size (no
//! entry changes whose cluster a reader sees):
//!
//! 0. when the L1 table must grow, it grows first with the size unchanged
//!    ([`Qcow2Update::grow_l1_keeping_size`]), as QEMU's does;
//! 1. each existing L2 table that covers the new area gets its entries there zero-flagged,
//!    one write per table: they lie past the virtual size the header names, so no reader
//!    sees them (spec: "Cluster mapping"; an entry keeps its host cluster, so no refcount
//!    changes);
//! 2. each table the new area needs that does not exist is allocated (refcount raised and
//!    flushed first), written whole and flushed; then its L1 entry (past the virtual
//!    size too);
//! 3. the switch: the header's size, one write.
//!
//! Killed before step 3, the image reads as the old one (and may leak the new tables);
//! after it, as the new one.

use super::*;

impl Qcow2Update {
    /// Zero-flags the new area `[old, size)` in place (see the module documentation).
    /// Returns false, having written nothing, when the image does not qualify (internal
    /// snapshots, an old size inside a cluster, a table not this image's alone, a
    /// compressed entry in the new area); the caller then takes the shadow switch.
    pub(super) fn resize_zeroing_in_place(&mut self, size: u64) -> Result<bool> {
        let cs = self.cs();
        let cb = self.cb();
        let old = self.header.size;
        if self.nb_snapshots > 0 || !old.is_multiple_of(cs) || size <= old {
            return Ok(false);
        }
        let per = self.g.l2_entries();
        let width = self.l2_width() as u64;
        let first = old / cs;
        let last = size.div_ceil(cs);
        let need = self.g.l1_entries_for(size);
        let have = self.l1.len() as u64;
        // Pass 1, nothing written: every existing table must be this image's own, with no
        // compressed entry in the new area.
        let mut plan = Vec::new();
        for i in first / per..last.div_ceil(per) {
            let e = self.l1.get(i as usize).copied().unwrap_or(0);
            let l2 = e & L1E_OFFSET_MASK;
            let (lo, hi) = (
                first.max(i * per) - i * per,
                last.min((i + 1) * per) - i * per,
            );
            if l2 == 0 {
                plan.push((i, None, lo, hi));
                continue;
            }
            if e & OFLAG_COPIED == 0 || self.refcount(l2 >> cb)? != 1 {
                return Ok(false);
            }
            let raw = self.read_cluster(l2)?;
            let compressed = (lo..hi).any(|j| {
                let at = (j * width) as usize;
                raw.get(at..at + 8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes)
                    .is_some_and(|v| v & OFLAG_COMPRESSED != 0)
            });
            if compressed {
                return Ok(false);
            }
            plan.push((i, Some((l2, raw)), lo, hi));
        }
        if need > have {
            self.grow_l1_keeping_size(need)?;
        }
        let extended = self.g.extended_l2;
        for (i, table, lo, hi) in plan {
            match table {
                Some((l2, mut raw)) => {
                    zero_flag_entries(&mut raw, lo, hi, width, extended)?;
                    let (a, b) = ((lo * width) as usize, (hi * width) as usize);
                    self.pwrite(&raw[a..b], l2 + lo * width)?;
                    self.sync()?;
                }
                None => {
                    let mut raw = vec![0u8; cs as usize];
                    zero_flag_entries(&mut raw, lo, hi, width, extended)?;
                    let t = self.alloc(1)?;
                    self.pwrite(&raw, t << cb)?;
                    self.sync()?;
                    let e = (t << cb) | OFLAG_COPIED;
                    self.pwrite(&e.to_be_bytes(), self.header.l1_table_offset + 8 * i)?;
                    self.sync()?;
                    self.l1[i as usize] = e;
                }
            }
        }
        self.pwrite(&size.to_be_bytes(), 24)?;
        self.sync()?;
        self.header.size = size;
        Ok(true)
    }

    /// A longer L1 table of `need` entries (the old entries, then zeros) for the same
    /// virtual size, as QEMU grows it before it zeroes a grown area: the new table is
    /// written and flushed, then `l1_size` and `l1_table_offset` switch in one write, then
    /// the old table is freed (so the new area's first L2 table may take its place, as in
    /// QEMU). Entries past the virtual size are allowed (spec: "L1 table"), so the image
    /// reads the same at every step.
    fn grow_l1_keeping_size(&mut self, need: u64) -> Result<()> {
        let cs = self.cs();
        let cb = self.cb();
        let have = self.l1.len() as u64;
        let n = (need * 8).div_ceil(cs);
        let at = self.alloc(n)?;
        let mut l1 = self.l1.clone();
        l1.resize(need as usize, 0);
        let raw: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.pwrite(&raw, at << cb)?;
        self.sync()?;
        // l1_size (36..40), l1_table_offset (40..48).
        let mut h = [0u8; 12];
        h[..4].copy_from_slice(&(need as u32).to_be_bytes());
        h[4..].copy_from_slice(&(at << cb).to_be_bytes());
        self.pwrite(&h, 36)?;
        self.sync()?;
        let old_off = self.header.l1_table_offset;
        self.header.l1_size = need as u32;
        self.header.l1_table_offset = at << cb;
        self.l1 = l1;
        if have > 0 {
            self.free(old_off >> cb, (have * 8).div_ceil(cs))?;
            self.sync()?;
        }
        Ok(())
    }
}

/// Makes entries `[lo, hi)` of the L2 table `raw` (entries `width` bytes wide) read as
/// zeros, as QEMU's zeroing of a grown area leaves them: a standard entry keeps its host
/// cluster (and copied flag) and gets the zero flag; an extended entry keeps its host cluster with every
/// subcluster zero and none allocated (spec "Extended L2 Entries"). A compressed entry is
/// refused: vimg does not zero one.
pub(super) fn zero_flag_entries(
    raw: &mut [u8],
    lo: u64,
    hi: u64,
    width: u64,
    extended: bool,
) -> Result<()> {
    for j in lo..hi {
        let at = (j * width) as usize;
        let Some(ent) = raw.get_mut(at..at + width as usize) else {
            return Err(Error::corrupt(format!(
                "L2 entry {j} lies past the end of its table"
            )));
        };
        let mut b = [0u8; 8];
        b.copy_from_slice(&ent[..8]);
        let v = u64::from_be_bytes(b);
        if v & OFLAG_COMPRESSED != 0 {
            return Err(Error::unsupported(
                "a compressed cluster lies past the old end of the image; vimg does not zero it",
            ));
        }
        // The host cluster stays, and with it the copied flag (its refcount is unchanged).
        let mut keep = v & L2E_OFFSET_MASK;
        if keep != 0 {
            keep |= v & OFLAG_COPIED;
        }
        if extended {
            ent[..8].copy_from_slice(&keep.to_be_bytes());
            ent[8..16].copy_from_slice(&0xFFFF_FFFF_0000_0000u64.to_be_bytes());
        } else {
            ent[..8].copy_from_slice(&(keep | OFLAG_ZERO).to_be_bytes());
        }
    }
    Ok(())
}
