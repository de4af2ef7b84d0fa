//! Guest-data writes into a qcow2 image open for writing ([`Qcow2Update`]): what `rebase`
//! (safe mode) and `commit` need. A child of `update.rs`, sharing its allocator and its
//! crash hook.
//!
//! Spec: "Cluster mapping" (L1/L2 entries, the COPIED flag, zero and compressed clusters),
//! "Host cluster management". The order of writes is QEMU's (block/qcow2-cluster.c): for the
//! clusters of one L2 table,
//!
//! 1. new data clusters get refcount 1 and the refcounts are flushed ([`Qcow2Update::alloc`]);
//! 2. the data is written (into new clusters, or in place into clusters this image alone
//!    owns), then flushed;
//! 3. the L2 entries change: in place when the table is this image's alone, else a new
//!    table (written whole, flushed, refcount raised first) that the L1 entry then points
//!    at (flushed);
//! 4. only then are the references the old entries held dropped (flushed).
//!
//! A crash between any two steps leaves every guest cluster with its old content or its
//! new one, and at worst leaked clusters. A cluster shared with an internal snapshot
//! (refcount above 1) is never written in place: it is copied, and the active L2 table's
//! reference moved to the copy. A compressed cluster written to becomes a normal one.

use std::sync::Arc;

use super::*;
use crate::blkdebug::Event;
use crate::image::Image;

/// What one guest cluster becomes.
#[derive(Clone, Copy, Debug)]
pub enum ClusterOp<'a> {
    /// These bytes (one whole cluster).
    Data(&'a [u8]),
    /// Reads as zeros, whatever the backing file holds.
    Zero,
    /// Unallocated: reads through to the backing file (zeros without one).
    Unmap,
}

/// Guest-data writes into an open qcow2 image (see the module documentation). Made by
/// [`Qcow2Update::data_writer`], which refuses images whose data vimg cannot write.
#[derive(Debug)]
pub struct DataWriter<'u> {
    pub(super) up: &'u mut Qcow2Update,
}

/// The state of the L2 table a batch of writes goes to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Table {
    /// No table yet.
    New,
    /// This image's own table (refcount 1): entries change in place.
    Own(u64),
    /// Shared with a snapshot: copied before it changes.
    Shared(u64),
}

impl Qcow2Update {
    /// The (device, inode) of the file open for writing: a caller that reopened by name a
    /// file the gate judged compares it with the gate's file.
    pub fn identity(&self) -> Result<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let m = self
            .file
            .metadata()
            .map_err(|e| io_err(&self.path, "stat", e))?;
        Ok((m.dev(), m.ino()))
    }

    /// Opens the image for guest-data writes: refuses what vimg cannot write correctly
    /// (external data files, encryption, extended L2 entries, persistent bitmaps, which
    /// would miss the writes) and images that are dirty or corrupt.
    pub fn data_writer(&mut self) -> Result<DataWriter<'_>> {
        if self.has_data_file {
            return Err(Error::unsupported(
                "vimg does not write guest data into qcow2 images with an external data file",
            ));
        }
        if self.header.crypt_method != 0 && self.cipher.is_none() {
            return Err(Error::unsupported(
                "vimg does not write guest data into encrypted qcow2 images without their key",
            ));
        }
        if self.g.extended_l2 {
            return Err(Error::unsupported(
                "vimg does not write guest data into qcow2 images with extended L2 entries",
            ));
        }
        self.require_consistent()?;
        // Enabled persistent bitmaps get the writes' bits (update/bitmap_writes.rs).
        self.bitmaps_begin_writes()?;
        Ok(DataWriter { up: self })
    }
}

impl DataWriter<'_> {
    /// The cluster size.
    pub fn cluster_size(&self) -> u64 {
        self.up.cs()
    }

    /// The virtual size.
    pub fn virtual_size(&self) -> u64 {
        self.up.header.size
    }

    /// The L2 entry of guest cluster `c` as it is on disk now (0 when no table maps it).
    pub fn entry(&self, c: u64) -> Result<u64> {
        let per = self.up.g.l2_entries();
        let l1e = self.up.l1.get((c / per) as usize).copied().ok_or_else(|| {
            Error::invalid_argument(format!("guest cluster {c} is past the L1 table"))
        })?;
        let l2 = l1e & L1E_OFFSET_MASK;
        if l2 == 0 {
            return Ok(0);
        }
        let mut b = [0u8; 8];
        self.up.pread(&mut b, l2 + 8 * (c % per))?;
        Ok(u64::from_be_bytes(b))
    }

    /// True when guest cluster `c` is allocated in this image (data, compressed, or a zero
    /// cluster): reads of it do not reach the backing file.
    pub fn is_allocated(&self, c: u64) -> Result<bool> {
        Ok(self.entry(c)? != 0)
    }

    /// Writes whole clusters from guest cluster `first` on (`data.len()` a multiple of the
    /// cluster size; bytes past the virtual size are the caller's, normally zeros).
    pub fn write_clusters(&mut self, first: u64, data: &[u8]) -> Result<()> {
        let cs = self.cluster_size() as usize;
        if !data.len().is_multiple_of(cs) {
            return Err(Error::invalid_argument(
                "write_clusters takes whole clusters",
            ));
        }
        let ops: Vec<ClusterOp<'_>> = data.chunks_exact(cs).map(ClusterOp::Data).collect();
        self.apply(first, &ops)
    }

    /// Makes `n` guest clusters from `first` on read as zeros (version 3: zero clusters;
    /// version 2: unallocated without a backing file, written zeros with one).
    pub fn zero_clusters(&mut self, first: u64, n: u64) -> Result<()> {
        self.repeat(first, n, ClusterOp::Zero)
    }

    /// Makes `n` guest clusters from `first` on unallocated (their clusters freed).
    pub fn unmap_clusters(&mut self, first: u64, n: u64) -> Result<()> {
        self.repeat(first, n, ClusterOp::Unmap)
    }

    /// Makes every guest cluster below `size` unallocated, visiting only the L2 tables the
    /// L1 table points at: the work is bounded by the tables the file holds, not by the
    /// virtual size its header claims (clusters without a table are unallocated already).
    pub fn unmap_mapped(&mut self, size: u64) -> Result<()> {
        let per = self.up.g.l2_entries();
        let clusters = size.div_ceil(self.cluster_size());
        for i in 0..self.up.l1.len() as u64 {
            let first = i.saturating_mul(per);
            if first >= clusters {
                break;
            }
            if self.up.l1[i as usize] & L1E_OFFSET_MASK == 0 {
                continue;
            }
            let n = per.min(clusters - first);
            self.apply(first, &vec![ClusterOp::Unmap; n as usize])?;
        }
        Ok(())
    }

    fn repeat(&mut self, first: u64, n: u64, op: ClusterOp<'_>) -> Result<()> {
        let per = self.up.g.l2_entries();
        let mut c = first;
        let end = first + n;
        while c < end {
            let k = (per - c % per).min(end - c);
            self.apply(c, &vec![op; k as usize])?;
            c += k;
        }
        Ok(())
    }

    /// Writes `data` at guest offset `off`. Clusters only partly covered keep the rest of
    /// their content: read from this image (through vimg's read layer) when allocated here,
    /// else from `backing` (this image's backing chain, opened by the caller), else zeros.
    pub fn write_at(&mut self, off: u64, data: &[u8], backing: Option<&Image>) -> Result<()> {
        if self.up.g.extended_l2 {
            // Only safe rebase's writes (update/extl2_write.rs).
            return self.write_subclusters_over(off, data, backing);
        }
        let end = off
            .checked_add(data.len() as u64)
            .filter(|&e| e <= self.virtual_size())
            .ok_or_else(|| Error::invalid_argument("write past the virtual size"))?;
        let cs = self.cluster_size();
        // The bitmaps get the bytes written, not the whole clusters rewritten.
        self.up.note_written(off, end - off);
        let tracking = self.up.written.take();
        let r = self.write_at_inner(off, end, data, backing, cs);
        if tracking.is_some() {
            self.up.written = tracking;
        }
        r
    }

    fn write_at_inner(
        &mut self,
        off: u64,
        end: u64,
        data: &[u8],
        backing: Option<&Image>,
        cs: u64,
    ) -> Result<()> {
        let mut pos = off;
        while pos < end {
            let c = pos / cs;
            let cstart = c * cs;
            if pos == cstart && end - pos >= cs {
                // Whole clusters, up to the end of this L2 table or of the data.
                let per = self.up.g.l2_entries();
                let k = ((end - pos) / cs).min(per - c % per);
                let from = (pos - off) as usize;
                self.write_clusters(c, &data[from..from + (k * cs) as usize])?;
                pos += k * cs;
                continue;
            }
            let mut buf = self.cluster_content(c, backing)?;
            let n = (cstart + cs).min(end) - pos;
            let from = (pos - off) as usize;
            let at = (pos - cstart) as usize;
            buf[at..at + n as usize].copy_from_slice(&data[from..from + n as usize]);
            self.write_clusters(c, &buf)?;
            pos += n;
        }
        Ok(())
    }

    /// The guest content of cluster `c` as it reads now (zeros past the virtual size).
    fn cluster_content(&self, c: u64, backing: Option<&Image>) -> Result<Vec<u8>> {
        let cs = self.cluster_size();
        let mut buf = vec![0u8; cs as usize];
        let start = c * cs;
        let len = (self.virtual_size().saturating_sub(start)).min(cs) as usize;
        let e = self.entry(c)?;
        if e == 0 {
            if let Some(b) = backing {
                let n = b.virtual_size().saturating_sub(start).min(len as u64) as usize;
                if n > 0 {
                    b.read_at(&mut buf[..n], start)?;
                }
            }
        } else if e & OFLAG_COMPRESSED == 0 && e & OFLAG_ZERO != 0 {
            // Reads as zeros.
        } else {
            // Through a fresh reader of this file (its tables as they are on disk now).
            let ro = self
                .up
                .file
                .try_clone()
                .map_err(|e| io_err(&self.up.path, "dup", e))?;
            let storage: Arc<dyn Storage> = Arc::new(
                FileStorage::from_file(ro, &self.up.path)
                    .map_err(|e| io_err(&self.up.path, "stat", e))?,
            );
            // Decrypting, for an encrypted image (update/crypt.rs).
            let r = self.up.reader_over(storage.clone())?;
            let img = Image::from_reader(r, self.up.path.display().to_string(), storage);
            img.read_at(&mut buf[..len], start)?;
        }
        Ok(buf)
    }

    /// Applies `ops` to the guest clusters from `first` on, which lie in one L2 table.
    fn apply(&mut self, first: u64, ops: &[ClusterOp<'_>]) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        if self.up.g.extended_l2 {
            // Whole-cluster entries would drop the subcluster bitmaps.
            return Err(Error::unsupported(
                "vimg does not write whole clusters into qcow2 images with extended L2 entries",
            ));
        }
        {
            let cs = self.up.cs();
            let size = self.up.header.size;
            let start = first * cs;
            let end = ((first + ops.len() as u64) * cs).min(size);
            self.up.note_written(start, end.saturating_sub(start));
        }
        let up = &mut *self.up;
        let cs = up.cs();
        let cb = up.cb();
        let per = up.g.l2_entries();
        let l1i = first / per;
        let j0 = (first % per) as usize;
        if j0 + ops.len() > per as usize
            || l1i >= up.l1.len() as u64
            || (first + ops.len() as u64 - 1) * cs >= up.header.size.next_multiple_of(cs)
        {
            return Err(Error::invalid_argument(format!(
                "guest clusters {first}+{} are outside the image or its L2 table",
                ops.len()
            )));
        }
        let l2 = up.l1[l1i as usize] & L1E_OFFSET_MASK;
        let (mut table, state) = if l2 == 0 {
            (vec![0u64; per as usize], Table::New)
        } else {
            let mut raw = vec![0u8; cs as usize];
            up.pread(&mut raw, l2)?;
            let t: Vec<u64> = raw
                .chunks_exact(8)
                .map(|w| u64::from_be_bytes(w.try_into().unwrap_or([0; 8])))
                .collect();
            let state = if up.refcount(l2 >> cb)? == 1 {
                Table::Own(l2)
            } else {
                Table::Shared(l2)
            };
            (t, state)
        };
        let v3 = up.header.version >= 3;
        let backing = up.header.backing_file_offset != 0;
        let zeros = vec![0u8; cs as usize];
        // Decide each cluster's new entry.
        let mut changed: Vec<(usize, u64)> = Vec::new();
        let mut in_place: Vec<(u64, usize, &[u8])> = Vec::new();
        let mut fresh: Vec<(usize, &[u8])> = Vec::new();
        let mut drop_refs: Vec<(u64, u64)> = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let j = j0 + i;
            let old = table[j];
            let op = match *op {
                ClusterOp::Zero if !v3 && backing => ClusterOp::Data(&zeros),
                ClusterOp::Zero if !v3 => ClusterOp::Unmap,
                o => o,
            };
            match op {
                ClusterOp::Data(d) => {
                    if d.len() as u64 != cs {
                        return Err(Error::invalid_argument("a cluster write of the wrong size"));
                    }
                    let host = old & L2E_OFFSET_MASK;
                    let own = old & OFLAG_COMPRESSED == 0
                        && host != 0
                        && !matches!(state, Table::Shared(_))
                        && up.refcount(host >> cb)? == 1;
                    if own {
                        in_place.push((host, j, d));
                        if old != host | OFLAG_COPIED {
                            changed.push((j, host | OFLAG_COPIED));
                        }
                    } else {
                        fresh.push((j, d));
                        drop_refs.extend(up.entry_clusters(old));
                    }
                }
                ClusterOp::Zero | ClusterOp::Unmap => {
                    let new = if matches!(op, ClusterOp::Zero) {
                        OFLAG_ZERO
                    } else {
                        0
                    };
                    if old != new {
                        changed.push((j, new));
                        drop_refs.extend(up.entry_clusters(old));
                    }
                }
            }
        }
        // A new L2 table (none yet, or a copy of one shared with a snapshot) gets its
        // cluster before the data clusters, as QEMU allocates it (block/qcow2-cluster.c:
        // the table is found or made before the data is allocated), so the file's layout
        // is QEMU's. Only the refcount is written now; a crash before the L1 entry points
        // at the table leaks that one cluster.
        let new_table = match state {
            Table::Own(_) => None,
            Table::New if fresh.is_empty() && changed.iter().all(|c| c.1 == 0) => None,
            Table::Shared(_) if fresh.is_empty() && changed.is_empty() => None,
            Table::New | Table::Shared(_) => Some(up.alloc(1)?),
        };
        // 1-2: data, into new clusters (refcounts raised and flushed by alloc) and into
        // clusters this image alone owns, then flushed.
        if !fresh.is_empty() {
            let at = up.alloc(fresh.len() as u64)?;
            let mut buf = Vec::with_capacity(fresh.len() * cs as usize);
            for (k, (j, d)) in fresh.iter().enumerate() {
                // Encrypted where the image is, for the cluster it lands in.
                let host = (at + k as u64) << cb;
                buf.extend_from_slice(&up.stored(host, (l1i * per + *j as u64) * cs, d)?);
                changed.push((*j, host | OFLAG_COPIED));
            }
            up.debug_event(Event::WriteAio);
            up.pwrite(&buf, at << cb)?;
        }
        for (host, j, d) in &in_place {
            up.debug_event(Event::WriteAio);
            let d = up.stored(*host, (l1i * per + *j as u64) * cs, d)?;
            up.pwrite(&d, *host)?;
        }
        if !fresh.is_empty() || !in_place.is_empty() {
            up.sync()?;
        }
        if changed.is_empty() {
            return Ok(());
        }
        // 3: the L2 entries.
        for &(j, v) in &changed {
            table[j] = v;
        }
        let encode = |t: &[u64]| -> Vec<u8> { t.iter().flat_map(|v| v.to_be_bytes()).collect() };
        match state {
            Table::Own(l2) => {
                let lo = changed.iter().map(|c| c.0).min().unwrap_or(0);
                let hi = changed.iter().map(|c| c.0).max().unwrap_or(0);
                up.debug_event(Event::L2Update);
                up.pwrite(&encode(&table[lo..=hi]), l2 + 8 * lo as u64)?;
                up.sync()?;
            }
            Table::New | Table::Shared(_) => {
                let Some(t) = new_table else {
                    return Ok(());
                };
                up.debug_event(Event::L2AllocWrite);
                up.pwrite(&encode(&table), t << cb)?;
                up.sync()?;
                let e = (t << cb) | OFLAG_COPIED;
                up.debug_event(Event::L1Update);
                up.pwrite(&e.to_be_bytes(), up.header.l1_table_offset + 8 * l1i)?;
                up.sync()?;
                up.l1[l1i as usize] = e;
                if let Table::Shared(old) = state {
                    // The snapshot keeps the old table; the active L1 no longer counts it.
                    drop_refs.push((old >> cb, 1));
                }
            }
        }
        // 4: the references the old entries held.
        if !drop_refs.is_empty() {
            for (c, n) in drop_refs {
                up.free(c, n)?;
            }
            up.sync()?;
        }
        Ok(())
    }

    /// Truncates the file after the last cluster still in use (after clusters were
    /// unmapped): only free clusters go, so a crash before or after leaves the same image.
    pub fn trim_end(&mut self) -> Result<()> {
        let up = &mut *self.up;
        let cs = up.cs();
        let clusters = up.file_len.div_ceil(cs);
        let mut last = 0u64;
        for c in (0..clusters).rev() {
            if up.refcount(c)? != 0 {
                last = c;
                break;
            }
        }
        let end = (last + 1) * cs;
        if end < up.file_len {
            up.sync()?;
            up.set_len(end)?;
        }
        Ok(())
    }

    /// Flushes what was written (every step already flushes; this is the caller's
    /// explicit end).
    pub fn finish(self) -> Result<()> {
        self.up.sync()?;
        self.up.bitmaps_end_writes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qcow2(dir: &std::path::Path, size: u64) -> std::path::PathBuf {
        let p = dir.join("t.qcow2");
        let opts = crate::options::CreateOptions::new();
        let out = crate::output::Output::new(p.clone());
        let w = crate::formats::registry::create(crate::Format::Qcow2, &out, size, &opts)
            .expect("create");
        w.finish().expect("finish");
        out.commit().expect("commit");
        p
    }

    fn read_all(p: &std::path::Path) -> Vec<u8> {
        let img = Image::open(p, &crate::OpenOptions::default()).expect("open");
        let mut v = vec![0u8; img.virtual_size() as usize];
        img.read_at(&mut v, 0).expect("read");
        v
    }

    #[test]
    fn writes_zeroes_and_unmaps_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = qcow2(dir.path(), 4 << 20);
        let mut want = vec![0u8; 4 << 20];
        {
            let mut up = Qcow2Update::open(&p, ExternalPolicy::Deny).unwrap();
            let mut w = up.data_writer().unwrap();
            let a: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8 + 1).collect();
            w.write_at(1000, &a, None).unwrap();
            want[1000..1000 + a.len()].copy_from_slice(&a);
            let b = vec![7u8; 70_000];
            w.write_at(3 << 20, &b, None).unwrap();
            want[3 << 20..(3 << 20) + b.len()].copy_from_slice(&b);
            // Partly over what was written: the rest of the cluster is kept.
            w.write_at(65_000, &[9u8; 10], None).unwrap();
            want[65_000..65_010].fill(9);
            w.zero_clusters(2, 1).unwrap();
            want[2 << 16..3 << 16].fill(0);
            w.unmap_clusters(48, 2).unwrap();
            want[48 << 16..50 << 16].fill(0);
            w.finish().unwrap();
        }
        assert_eq!(read_all(&p), want);
        let img = Image::open(&p, &crate::OpenOptions::default().open_backing(false)).unwrap();
        let rep = crate::image::check(&img).unwrap();
        assert_eq!(rep.corruptions + rep.leaks, 0, "{:?}", rep.messages);
    }
}
