//! `resize --preallocation=metadata|falloc|full` of qcow2 in place, laid out as QEMU's
//! `qcow2_co_truncate` lays it out (block/qcow2.c), so `qemu-img map` and `check` agree:
//!
//! - the L1 table grows first, switched in on its own (a larger L1 table than the size
//!   needs is valid), the old one freed;
//! - `metadata`: per L2 table, the table (when missing) and then a contiguous run of data
//!   clusters for every cluster of the new range that has none, first fit from the lowest
//!   free cluster; the file is extended over them (sparse);
//! - `falloc` / `full`: new refcount blocks and a new refcount table at the end of the used
//!   area (QEMU's `qcow2_refcount_area`: always a new table), then one contiguous data area
//!   after them for every cluster from the one the old size ends in, reserved with
//!   fallocate(2) or written with zeros; the L2 tables go where the first free cluster is
//!   (often the old refcount table's place). The cluster the old size ends in is copied
//!   into its new place and the old one freed.
//!
//! Extended L2 entries keep their subcluster bitmap (QEMU's `prealloc` allocation does not
//! touch it): the new clusters' subclusters read as unallocated, i.e. zeros or the backing
//! file (which the caller has checked is not longer than the old size).
//!
//! Crash safety: everything but the final size switch lies past the old virtual size or
//! in clusters nothing live points at (leaks at worst); the one in-size change, the L2
//! entry of the cluster the old size ends in, is one 8-byte entry written after its new
//! cluster holds the old content, flushed.

use super::*;
use std::os::unix::io::AsRawFd;

/// What preallocation does with the cluster an L2 entry describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Keep {
    /// A standard cluster only this image references: kept (`metadata`).
    Kept,
    /// Needs a new cluster; the old one (if any) is freed afterwards.
    New,
}

impl Qcow2Update {
    /// Grows the image to `size` with `prealloc` (not [`Prealloc::Off`]). `head` is the
    /// guest content of the cluster the current size ends in, up to the current size
    /// (needed when that size is not a multiple of the cluster size).
    pub fn resize_preallocated(
        &mut self,
        size: u64,
        prealloc: Prealloc,
        head: Option<&[u8]>,
    ) -> Result<()> {
        self.resize_preallocated_mode(size, prealloc, head, None)
    }

    /// [`Self::resize_preallocated`]; `over_backing` when a backing file longer than the
    /// current size would show through the new area: what it holds from the new size to
    /// the end of the cluster that size ends in (update/prealloc_zero.rs).
    pub(super) fn resize_preallocated_mode(
        &mut self,
        size: u64,
        prealloc: Prealloc,
        head: Option<&[u8]>,
        over_backing: Option<&[u8]>,
    ) -> Result<()> {
        let name = self.path.display().to_string();
        if prealloc == Prealloc::Off {
            return self.resize(size, prealloc);
        }
        if !size.is_multiple_of(512) {
            return Err(Error::invalid_argument(
                "The new size must be a multiple of 512",
            ));
        }
        let old = self.header.size;
        if size < old {
            return Err(Error::invalid_argument(
                "Preallocation can't be used for shrinking an image",
            ));
        }
        if self.has_data_file {
            return Err(Error::unsupported(format!(
                "vimg cannot preallocate '{name}': it has an external data file"
            )));
        }
        if self.has_bitmaps {
            return Err(Error::unsupported(
                "Can't resize an image with persistent bitmaps (vimg does not resize bitmaps)",
            ));
        }
        if self.header.crypt_method != 0 {
            // QEMU leaves plain zeros in the new clusters, which decrypt to noise.
            return Err(Error::unsupported(format!(
                "vimg cannot preallocate the new area of encrypted '{name}' (the preallocated clusters would read as noise)"
            )));
        }
        if self.nb_snapshots > 0 {
            return Err(Error::unsupported(format!(
                "vimg cannot preallocate the new area of '{name}', which has internal snapshots"
            )));
        }
        if size > limits::MAX_VIRTUAL_SIZE {
            return Err(Error::unsupported(format!(
                "Image is too big (virtual size {size} exceeds vimg's limit of {} bytes)",
                limits::MAX_VIRTUAL_SIZE
            )));
        }
        self.require_consistent()?;
        if size == old {
            return Ok(());
        }
        let cs = self.cs();
        let head_len = old % cs;
        if head_len != 0 && head.is_none_or(|h| h.len() as u64 != head_len) {
            return Err(Error::invalid_argument(
                "internal: the old last cluster's content was not given",
            ));
        }
        // What would be refused is found before anything is written.
        let (first, end) = (old / cs, size.div_ceil(cs));
        let per = self.g.l2_entries();
        for t in first / per..end.div_ceil(per).min(self.l1.len() as u64) {
            if self.l1[t as usize] & L1E_OFFSET_MASK == 0 {
                continue;
            }
            let (raw, _) = self.l2_table(t)?;
            for c in (t * per).max(first)..((t + 1) * per).min(end) {
                let e = self.entry_at(&raw, c - t * per);
                if prealloc == Prealloc::Metadata || (self.g.extended_l2 && c == first) {
                    self.classify(e)?;
                }
            }
        }
        let mut touched = Vec::new();
        let need = self.g.l1_entries_for(size);
        if need > self.l1.len() as u64 {
            self.switch_l1(need, &mut touched)?;
        }
        match prealloc {
            Prealloc::Metadata => {
                let from_backing = match over_backing {
                    Some(_) => self.tail_reads_backing(size)?,
                    None => false,
                };
                self.prealloc_metadata(first, end, (old, size), head, &mut touched)?;
                if let Some(tail) = over_backing {
                    self.zero_preallocated_area(old, size, head)?;
                    if from_backing {
                        self.write_cow_tail(size, tail)?;
                    }
                }
            }
            _ => {
                let all = over_backing.is_some() && self.g.extended_l2;
                self.prealloc_data(first, end, old, head, (prealloc, all), &mut touched)?
            }
        }
        self.rewrite_blocks(&touched)?;
        self.pwrite(&size.to_be_bytes(), 24)?;
        self.sync()?;
        self.header.size = size;
        Ok(())
    }

    /// Replaces the L1 table with one of `need` entries (the size stays as it is).
    fn switch_l1(&mut self, need: u64, touched: &mut Vec<u64>) -> Result<()> {
        let cs = self.cs();
        let cb = self.cb();
        let bytes = need * 8;
        if bytes > MAX_L1_BYTES {
            return Err(Error::unsupported(format!(
                "Image is too big: its L1 table would need {bytes} bytes (limit {MAX_L1_BYTES})"
            )));
        }
        let n = bytes.div_ceil(cs);
        let at = self.alloc(n)?;
        touched.extend([at, self.header.l1_table_offset >> self.cb()]);
        let mut raw = vec![0u8; (n * cs) as usize];
        for (i, &e) in self.l1.iter().enumerate() {
            raw[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
        }
        self.pwrite(&raw[..bytes.div_ceil(512) as usize * 512], at << cb)?;
        self.sync()?;
        // l1_size (36..40), l1_table_offset (40..48).
        let mut h = [0u8; 12];
        h[..4].copy_from_slice(&(need as u32).to_be_bytes());
        h[4..].copy_from_slice(&(at << cb).to_be_bytes());
        self.pwrite(&h, 36)?;
        self.sync()?;
        let (old_off, old_len) = (self.header.l1_table_offset, self.l1.len() as u64);
        self.header.l1_size = need as u32;
        self.header.l1_table_offset = at << cb;
        self.l1.resize(need as usize, 0);
        if old_len > 0 {
            self.free(old_off >> cb, (old_len * 8).div_ceil(cs))?;
            self.sync()?;
        }
        Ok(())
    }

    /// The L2 table of L1 index `t` (raw bytes; zeros when there is none) and its offset.
    pub(super) fn l2_table(&self, t: u64) -> Result<(Vec<u8>, u64)> {
        let cs = self.cs();
        let off = self.l1[t as usize] & L1E_OFFSET_MASK;
        let mut raw = vec![0u8; cs as usize];
        if off != 0 {
            if off.checked_add(cs).is_none_or(|e| e > self.file_len) {
                return Err(Error::corrupt(format!(
                    "'{}': L1 entry {t} points at {off:#x}, past the end of the file",
                    self.path.display()
                )));
            }
            self.pread(&mut raw, off)?;
        }
        Ok((raw, off))
    }

    pub(super) fn entry_at(&self, raw: &[u8], i: u64) -> u64 {
        let at = (i * (self.l2_width() as u64)) as usize;
        raw.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_be_bytes)
    }

    /// What `metadata` preallocation does with entry `e`; what QEMU would get wrong is
    /// refused.
    fn classify(&self, e: u64) -> Result<Keep> {
        let name = self.path.display();
        let off = e & L2E_OFFSET_MASK;
        if e & OFLAG_COMPRESSED != 0 {
            if self.g.extended_l2 {
                // QEMU keeps the (empty) bitmap over the new cluster: the data would vanish.
                return Err(Error::unsupported(format!(
                    "vimg cannot preallocate '{name}': the cluster its size ends in is compressed and the image has extended L2 entries"
                )));
            }
            return Ok(Keep::New);
        }
        if off == 0 {
            return Ok(Keep::New);
        }
        if !self.g.extended_l2 && e & OFLAG_ZERO != 0 {
            // QEMU keeps the cluster and drops the flag, exposing what it held.
            return Err(Error::unsupported(format!(
                "vimg cannot preallocate '{name}': a cluster of the new area is an allocated zero cluster"
            )));
        }
        if e & OFLAG_COPIED == 0 {
            return Err(Error::unsupported(format!(
                "vimg cannot preallocate '{name}': a cluster of the new area is shared"
            )));
        }
        Ok(Keep::Kept)
    }

    /// Writes `entries` (index in table, new first word) into table `t` (a new table when
    /// the L1 entry is 0, allocated by the caller as `new_table`), then the L1 entry.
    fn link_l2(
        &mut self,
        t: u64,
        mut raw: Vec<u8>,
        new_table: Option<u64>,
        entries: &[(u64, u64)],
    ) -> Result<()> {
        let w = self.l2_width() as u64;
        for &(i, v) in entries {
            let at = (i * w) as usize;
            raw[at..at + 8].copy_from_slice(&v.to_be_bytes());
        }
        match new_table {
            Some(off) => {
                self.pwrite(&raw, off)?;
                self.sync()?;
                self.l1[t as usize] = off | OFLAG_COPIED;
                let e = self.l1[t as usize];
                self.pwrite(&e.to_be_bytes(), self.header.l1_table_offset + 8 * t)?;
                self.sync()?;
            }
            None => {
                let off = self.l1[t as usize] & L1E_OFFSET_MASK;
                let (Some(lo), Some(hi)) = (
                    entries.iter().map(|e| e.0).min(),
                    entries.iter().map(|e| e.0).max(),
                ) else {
                    return Ok(());
                };
                if lo > hi {
                    return Ok(());
                }
                // The whole table, as QEMU's table cache writes it (the file's allocation,
                // which QEMU's block status reads, then matches); unchanged entries are
                // rewritten with what they hold.
                self.pwrite(&raw, off)?;
                self.sync()?;
            }
        }
        Ok(())
    }

    /// `metadata`: clusters `[first, end)`; `old` the old size.
    fn prealloc_metadata(
        &mut self,
        first: u64,
        end: u64,
        (old, size): (u64, u64),
        head: Option<&[u8]>,
        touched: &mut Vec<u64>,
    ) -> Result<()> {
        let cb = self.cb();
        let per = self.g.l2_entries();
        let mut new_last = false;
        let mut c = first;
        while c < end {
            let t = c / per;
            let stop = ((t + 1) * per).min(end);
            let (raw, l2off) = self.l2_table(t)?;
            let new_table = if l2off == 0 {
                let c = self.alloc(1)?;
                touched.push(c);
                Some(c << cb)
            } else {
                None
            };
            let mut entries: Vec<(u64, u64)> = Vec::new();
            let mut freed: Vec<(u64, u64)> = Vec::new();
            let mut i = c;
            while i < stop {
                let e = self.entry_at(&raw, i - t * per);
                let is_head = i == first && !old.is_multiple_of(self.cs());
                if self.classify(e)? == Keep::Kept {
                    i += 1;
                    continue;
                }
                // A run of clusters that need one, allocated together.
                let mut j = i + 1;
                while j < stop {
                    let e2 = self.entry_at(&raw, j - t * per);
                    if self.classify(e2)? == Keep::Kept {
                        break;
                    }
                    j += 1;
                }
                let before = self.file_len;
                let host = self.alloc(j - i)?;
                // Clusters reused inside the file may hold what a freed structure left
                // there: zeroed, so the new area reads as zeros. (QEMU leaves them as
                // they are, and its result can read old tables as guest data.)
                let stale = before.saturating_sub(host << cb).min((j - i) << cb);
                self.zero_stale(host << cb, stale)?;
                touched.extend([host, host + (j - i) - 1]);
                new_last |= j == end;
                for k in i..j {
                    let old_e = self.entry_at(&raw, k - t * per);
                    freed.extend(self.entry_clusters(old_e));
                    entries.push((k - t * per, ((host + k - i) << cb) | OFLAG_COPIED));
                }
                if is_head && !self.g.extended_l2 {
                    self.copy_head(host << cb, head)?;
                }
                i = j;
            }
            self.link_l2(t, raw, new_table, &entries)?;
            for &(f, n) in &freed {
                self.free(f, n)?;
                touched.push(f);
            }
            if !freed.is_empty() {
                self.sync()?;
            }
            c = stop;
        }
        // The file ends at the host offset of the guest end. When the last cluster is new,
        // QEMU's allocation also copies the rest of the subcluster the end falls in (its
        // copy-on-write tail: zeros here, past the size, never read).
        let last = end - 1;
        let (raw, _) = self.l2_table(last / per)?;
        let host = self.entry_at(&raw, last % per) & L2E_OFFSET_MASK;
        if host != 0 {
            let tail = (size - last * self.cs()).min(self.cs());
            let sc = self.g.subcluster_size;
            let up = if new_last {
                tail.div_ceil(sc) * sc
            } else {
                tail
            };
            if up > tail {
                let zeros = vec![0u8; (up - tail) as usize];
                self.pwrite(&zeros, host + tail)?;
                self.sync()?;
            }
            if new_last && host + self.cs() == self.file_len && up < self.cs() {
                // QEMU's file ends there, inside the last cluster (less than a cluster
                // short of it, which its check accepts).
                self.set_len(host + up)?;
            } else {
                self.extend_to(host + up)?;
            }
        }
        Ok(())
    }

    /// Rewrites whole the refcount blocks that count the clusters of `touched` (their
    /// content unchanged), as QEMU's refcount cache writes whole blocks: QEMU's block
    /// status reads the file's allocation (its check for metadata preallocation), so
    /// `qemu-img map` then reports the same for both.
    fn rewrite_blocks(&mut self, touched: &[u64]) -> Result<()> {
        let bits = self.g.refblock_bits;
        let mut rtis: Vec<u64> = touched.iter().map(|&c| c >> bits).collect();
        rtis.sort_unstable();
        rtis.dedup();
        let mut any = false;
        for rti in rtis {
            let Some(off) = self.block_offset(rti) else {
                continue;
            };
            if off.checked_add(self.cs()).is_none_or(|e| e > self.file_len) {
                continue;
            }
            let mut b = vec![0u8; self.cs() as usize];
            self.pread(&mut b, off)?;
            self.pwrite(&b, off)?;
            any = true;
        }
        if any {
            self.sync()?;
        }
        Ok(())
    }

    /// Writes zeros over the part of `[at, at + len)` that lies inside the file, flushed.
    fn zero_stale(&mut self, at: u64, len: u64) -> Result<()> {
        let stop = (at + len).min(self.file_len);
        if stop <= at {
            return Ok(());
        }
        let zeros = vec![0u8; (stop - at).min(1 << 20) as usize];
        let mut pos = at;
        while pos < stop {
            let k = ((stop - pos) as usize).min(zeros.len());
            self.pwrite(&zeros[..k], pos)?;
            pos += k as u64;
        }
        self.sync()
    }

    /// Writes the old last cluster's content (before the old size) at host `at`, flushed.
    fn copy_head(&mut self, at: u64, head: Option<&[u8]>) -> Result<()> {
        if let Some(h) = head {
            if !h.is_empty() {
                let h = h.to_vec();
                self.pwrite(&h, at)?;
                self.sync()?;
            }
        }
        Ok(())
    }

    /// `falloc` / `full`: clusters `[first, end)` all get new clusters in one data area.
    fn prealloc_data(
        &mut self,
        first: u64,
        end: u64,
        old: u64,
        head: Option<&[u8]>,
        (mode, alloc_all): (Prealloc, bool),
        touched: &mut Vec<u64>,
    ) -> Result<()> {
        let cs = self.cs();
        let cb = self.cb();
        let per = self.g.l2_entries();
        let n = end - first;
        // The end of the used area (QEMU's qcow2_get_last_cluster over the file).
        let mut used_end = 0u64;
        for c in (0..self.file_len.div_ceil(cs)).rev() {
            if self.refcount(c)? != 0 {
                used_end = c + 1;
                break;
            }
        }
        if used_end == 0 {
            used_end = self.file_len.div_ceil(cs);
        }
        let l2_tables = n.div_ceil(per) + 1;
        let old_table = self.header.refcount_table_offset >> cb;
        let data = self.refcount_area(used_end, n + l2_tables)?;
        touched.extend([old_table, used_end, data, data + n - 1]);
        // Reserve the area, then count it. What lies inside the file already (past the
        // last cluster in use) is zeroed first.
        self.zero_stale(data << cb, n << cb)?;
        let from = self.file_len;
        let to = (data + n) << cb;
        if to > from {
            self.hook.point();
            match mode {
                Prealloc::Full => {
                    let zeros = vec![0u8; (cs as usize).max(1 << 16)];
                    let mut pos = from;
                    while pos < to {
                        let k = ((to - pos) as usize).min(zeros.len());
                        self.file
                            .write_all_at(&zeros[..k], pos)
                            .map_err(|e| io_err(&self.path, "write zeros", e))?;
                        pos += k as u64;
                    }
                }
                _ => {
                    // SAFETY: a plain syscall on a descriptor this updater owns.
                    let r = unsafe {
                        libc::fallocate(self.file.as_raw_fd(), 0, from as i64, (to - from) as i64)
                    };
                    if r != 0 {
                        let e = std::io::Error::last_os_error();
                        return Err(io_err(&self.path, "fallocate", e));
                    }
                }
            }
            self.file_len = to;
            self.sync()?;
        }
        self.set_refcounts(data, n, |o| {
            if o == 0 {
                Ok(1)
            } else {
                Err(Error::corrupt("cluster became used during allocation"))
            }
        })?;
        self.sync()?;
        if !old.is_multiple_of(cs) {
            self.copy_head(data << cb, head)?;
        }
        let mut c = first;
        while c < end {
            let t = c / per;
            let stop = ((t + 1) * per).min(end);
            let (mut raw, l2off) = self.l2_table(t)?;
            let new_table = if l2off == 0 {
                let c = self.alloc(1)?;
                touched.push(c);
                Some(c << cb)
            } else {
                None
            };
            let mut entries = Vec::new();
            let mut freed = Vec::new();
            for k in c..stop {
                let old_e = self.entry_at(&raw, k - t * per);
                freed.extend(self.entry_clusters(old_e));
                entries.push((k - t * per, ((data + k - first) << cb) | OFLAG_COPIED));
                if alloc_all {
                    // Over a longer backing file QEMU's new clusters have every
                    // subcluster allocated (the file reads zeros there), so the backing
                    // file does not show through; the first one holds the old head.
                    let at = ((k - t * per) * 16 + 8) as usize;
                    raw[at..at + 8]
                        .copy_from_slice(&super::prealloc_zero::ALL_ALLOC_BITMAP.to_be_bytes());
                }
            }
            self.link_l2(t, raw, new_table, &entries)?;
            for &(f, k) in &freed {
                self.free(f, k)?;
                touched.push(f);
            }
            if !freed.is_empty() {
                self.sync()?;
            }
            c = stop;
        }
        Ok(())
    }

    /// New refcount blocks at cluster `start` (free, as is everything after it) for the
    /// clusters up to `start + additional` and themselves, then a new refcount table after
    /// them, switched in; the old table freed. Returns the first cluster after the table.
    fn refcount_area(&mut self, start: u64, additional: u64) -> Result<u64> {
        let cs = self.cs();
        let cb = self.cb();
        let bits = self.g.refblock_bits;
        let order = self.g.refcount_order;
        let per_cluster = cs / 8;
        let clusters = start
            .checked_add(additional)
            .ok_or_else(|| Error::unsupported("image too large"))?;
        // The refcount blocks needed for `clusters` and the refcount structures themselves.
        let (blocks, _) = crate::formats::qcow2::refcount::refcount_structure(clusters, cs, order);
        let entries = blocks
            .div_ceil(per_cluster)
            .max(1)
            .max((self.reftable.len() as u64).div_ceil(per_cluster))
            * per_cluster;
        let t = entries / per_cluster;
        if t * cs > MAX_REFTABLE_BYTES {
            return Err(
                Qcow2Error::Unsupported("the refcount table would grow past 8 MiB".into()).into(),
            );
        }
        let mut new_table = self.reftable.clone();
        new_table.resize(entries as usize, 0);
        let area = start >> bits;
        let missing: Vec<u64> = (area..blocks)
            .filter(|&k| new_table[k as usize] & REFT_OFFSET_MASK == 0)
            .collect();
        let table_at = start + missing.len() as u64;
        let end = table_at + t;
        for (j, &k) in missing.iter().enumerate() {
            new_table[k as usize] = (start + j as u64) << cb;
        }
        // New blocks: refcount 1 for every cluster of [start, end) they cover.
        for (j, &k) in missing.iter().enumerate() {
            let mut blk = vec![0u8; cs as usize];
            for c in start.max(k << bits)..end.min((k + 1) << bits) {
                refcount_set(&mut blk, order, (c & ((1 << bits) - 1)) as usize, 1);
            }
            self.pwrite(&blk, (start + j as u64) << cb)?;
        }
        let mut raw = Vec::with_capacity((t * cs) as usize);
        for &v in &new_table {
            raw.extend_from_slice(&v.to_be_bytes());
        }
        self.pwrite(&raw, table_at << cb)?;
        // Existing blocks that cover part of [start, end).
        let old_blocks: Vec<u64> = (start..end)
            .filter(|&c| !missing.contains(&(c >> bits)))
            .collect();
        for c in old_blocks {
            self.set_refcounts(c, 1, |o| {
                if o == 0 {
                    Ok(1)
                } else {
                    Err(Error::corrupt("cluster past the used area is in use"))
                }
            })?;
        }
        self.sync()?;
        // Header: refcount_table_offset (48..56) and refcount_table_clusters (56..60).
        let mut h = [0u8; 12];
        h[..8].copy_from_slice(&(table_at << cb).to_be_bytes());
        h[8..].copy_from_slice(&(t as u32).to_be_bytes());
        self.pwrite(&h, 48)?;
        self.sync()?;
        let old_off = self.header.refcount_table_offset;
        let old_clusters = u64::from(self.header.refcount_table_clusters);
        self.reftable = new_table;
        self.block = None;
        self.header.refcount_table_offset = table_at << cb;
        self.header.refcount_table_clusters = t as u32;
        self.free(old_off >> cb, old_clusters)?;
        self.sync()?;
        Ok(end)
    }
}
