//! Guest-data writes at subcluster granularity into a qcow2 image with extended L2 entries,
//! for safe `rebase` (iotest 271), whose writes fill only subclusters the image does not
//! hold (neither allocated nor zero): qemu-img then writes aligned to the subcluster size
//! (`rebase -c`: to the cluster size). vimg lays them out as QEMU's driver does
//! (block/qcow2-cluster.c, `handle_copied`, `handle_alloc`, `calculate_l2_meta`,
//! `qcow2_alloc_cluster_link_l2`, `qcow2_subcluster_zeroize`):
//!
//! - a cluster that has a host cluster (refcount 1, copied flag) is written in place at
//!   the subclusters' offsets; no copy-on-write, the other subclusters keep their state;
//! - a run of clusters without one, in one L2 table, gets one contiguous run of new host
//!   clusters (the L2 table first, when it is new); only the written subclusters' bytes
//!   are written (the file grows by the writes, not by the allocation);
//! - the written subclusters become allocated (allocation bit set, zero bit cleared);
//! - a zero write sets the zero bits of partly covered clusters' subclusters and makes a
//!   wholly covered cluster's bitmap all-zero, its host cluster kept; the last cluster of a
//!   disk that ends inside it counts as wholly covered.
//!
//! Spec: "Extended L2 Entries" (docs/interop/qcow2.rst).
//!
//! Anything else (a subcluster already allocated or zero, internal snapshots, encryption)
//! is refused before anything is written: [`Qcow2Update::subcluster_writer`] refuses the
//! images, and each write checks its whole request before its first write.
//!
//! Crash safety, per L2 table (the order of update_data.rs): new host clusters (and a new
//! L2 table) get their references first (flushed), then the data is written (flushed),
//! then the entries change (in place, or the new table whole and then its L1 entry, each
//! flushed). Subclusters whose allocation bit is clear are never read, so writing their
//! host bytes first changes nothing a reader sees; a crash leaves each subcluster
//! unallocated or holding its new content, with at worst leaked clusters. A zero write
//! only touches subclusters that read as zeros already (rebase zeroes where the old
//! backing file has ended).

use super::data::DataWriter;
use super::*;
use crate::blkdebug::Event;

/// Extended L2 bitmap: every subcluster zero, none allocated.
const ALL_ZERO: u64 = 0xFFFF_FFFF_0000_0000;

/// The allocation bits of subclusters `[a, b)` (b <= 32).
fn alloc_bits(a: u64, b: u64) -> u64 {
    let upto = |n: u64| {
        if n >= 32 {
            0xFFFF_FFFF
        } else {
            (1u64 << n) - 1
        }
    };
    upto(b) & !upto(a)
}

impl Qcow2Update {
    /// Opens an image with extended L2 entries for safe `rebase`'s writes (see the module
    /// documentation); refuses what they could get wrong. Images without extended L2
    /// entries get [`Self::data_writer`].
    pub fn subcluster_writer(&mut self) -> Result<DataWriter<'_>> {
        if !self.g.extended_l2 {
            return self.data_writer();
        }
        let name = self.path.display().to_string();
        let refuse = |why: &str| {
            Err(Error::unsupported(format!(
                "vimg does not write guest data into '{name}' (extended L2 entries): {why}"
            )))
        };
        if self.has_data_file {
            return refuse("it has an external data file");
        }
        if self.header.crypt_method != 0 {
            return refuse("it is encrypted");
        }
        if self.nb_snapshots > 0 {
            return refuse("it has internal snapshots");
        }
        self.require_consistent()?;
        self.bitmaps_begin_writes()?;
        Ok(DataWriter { up: self })
    }
}

/// An L2 table as (entry, bitmap) pairs.
type ExtTable = Vec<(u64, u64)>;

/// One cluster's part of a request: guest cluster, first and end subcluster.
#[derive(Clone, Copy)]
struct Part {
    c: u64,
    lo: u64,
    hi: u64,
}

impl DataWriter<'_> {
    /// True for an image with extended L2 entries (written through this module).
    pub fn extended(&self) -> bool {
        self.up.g.extended_l2
    }

    /// What safe `rebase` compares and writes whole: the subcluster size (the cluster
    /// size without extended L2 entries).
    pub fn write_unit(&self) -> u64 {
        self.up.g.subcluster_size
    }

    /// The L2 entry and bitmap of guest cluster `c` (zeros without a table).
    pub fn ext_entry(&self, c: u64) -> Result<(u64, u64)> {
        let per = self.up.g.l2_entries();
        let l1e = self.up.l1.get((c / per) as usize).copied().ok_or_else(|| {
            Error::invalid_argument(format!("guest cluster {c} is past the L1 table"))
        })?;
        let l2 = l1e & L1E_OFFSET_MASK;
        if l2 == 0 {
            return Ok((0, 0));
        }
        let mut b = [0u8; 16];
        self.up.pread(&mut b, l2 + 16 * (c % per))?;
        let (e, m) = b.split_at(8);
        let w = |x: &[u8]| u64::from_be_bytes(x.try_into().unwrap_or([0; 8]));
        Ok((w(e), w(m)))
    }

    /// True when the whole guest cluster `c` can take a compressed cluster as QEMU writes
    /// one: no host cluster and no subcluster allocated or zero.
    pub fn ext_cluster_empty(&self, c: u64) -> Result<bool> {
        Ok(self.ext_entry(c)? == (0, 0))
    }

    /// Splits `[off, off + len)` (subcluster-aligned; the end may be the virtual size) into
    /// per-cluster subcluster ranges, refusing an unaligned request.
    fn parts(&self, off: u64, len: u64) -> Result<Vec<Part>> {
        let cs = self.up.cs();
        let sc = self.up.g.subcluster_size;
        let size = self.virtual_size();
        let end = off
            .checked_add(len)
            .filter(|&e| e <= size)
            .ok_or_else(|| Error::invalid_argument("write past the virtual size"))?;
        if !off.is_multiple_of(sc) || !(end.is_multiple_of(sc) || end == size) {
            return Err(Error::unsupported(format!(
                "vimg writes images with extended L2 entries in whole subclusters ({sc} bytes); {off:#x}+{len:#x} is not"
            )));
        }
        let mut v = Vec::new();
        let mut pos = off;
        while pos < end {
            let c = pos / cs;
            let stop = ((c + 1) * cs).min(end);
            v.push(Part {
                c,
                lo: (pos - c * cs) / sc,
                hi: (stop - c * cs).div_ceil(sc),
            });
            pos = stop;
        }
        Ok(v)
    }

    /// Reads the L2 table of L1 index `t` as (entry, bitmap) pairs, and its state.
    fn ext_table(&mut self, t: u64) -> Result<(ExtTable, Option<u64>)> {
        let cs = self.up.cs();
        let cb = self.up.cb();
        let per = self.up.g.l2_entries() as usize;
        let l2 = self.up.l1[t as usize] & L1E_OFFSET_MASK;
        if l2 == 0 {
            return Ok((vec![(0, 0); per], None));
        }
        if self.up.l1[t as usize] & OFLAG_COPIED == 0 || self.up.refcount(l2 >> cb)? != 1 {
            return Err(Error::unsupported(format!(
                "the L2 table at {l2:#x} is shared; vimg does not write subclusters through it"
            )));
        }
        let mut raw = vec![0u8; cs as usize];
        self.up.pread(&mut raw, l2)?;
        let w = |x: &[u8]| u64::from_be_bytes(x.try_into().unwrap_or([0; 8]));
        let t = raw
            .chunks_exact(16)
            .map(|p| (w(&p[..8]), w(&p[8..])))
            .collect();
        Ok((t, Some(l2)))
    }

    /// Checks that every subcluster of `parts` is unallocated in this image (no
    /// allocation bit, no zero bit, not compressed), and that a host cluster it has is
    /// this image's alone: what this module writes.
    fn check_unallocated(&mut self, parts: &[Part]) -> Result<()> {
        let per = self.up.g.l2_entries();
        let cb = self.up.cb();
        let mut t_cur = u64::MAX;
        let mut table = Vec::new();
        for p in parts {
            let t = p.c / per;
            if t >= self.up.l1.len() as u64 {
                return Err(Error::invalid_argument(format!(
                    "guest cluster {} is past the L1 table",
                    p.c
                )));
            }
            if t != t_cur {
                table = self.ext_table(t)?.0;
                t_cur = t;
            }
            let (e, bm) = table[(p.c % per) as usize];
            let range = alloc_bits(p.lo, p.hi);
            let host = e & L2E_OFFSET_MASK;
            let held = e & OFLAG_COMPRESSED != 0 || bm & range != 0 || (bm >> 32) & range != 0;
            if held {
                return Err(Error::unsupported(format!(
                    "guest cluster {} is allocated here (entry {e:#018x}, bitmap {bm:#018x}); vimg writes only subclusters the image does not hold",
                    p.c
                )));
            }
            if host != 0
                && (e & OFLAG_COPIED == 0
                    || !host.is_multiple_of(self.up.cs())
                    || self.up.refcount(host >> cb)? != 1)
            {
                return Err(Error::unsupported(format!(
                    "the host cluster {host:#x} of guest cluster {} is shared or misaligned; vimg does not write into it",
                    p.c
                )));
            }
        }
        Ok(())
    }

    /// Writes `data` at `off` into subclusters this image does not hold (see the module
    /// documentation). `data` may end inside the last subcluster only at the virtual size.
    pub fn write_subclusters(&mut self, off: u64, data: &[u8]) -> Result<()> {
        self.write_subclusters_over(off, data, None)
    }

    /// [`Self::write_subclusters`]; a write that ends at a virtual size inside a
    /// subcluster fills the rest of it as QEMU's copy-on-write tail does, with what
    /// `backing` (the image's backing chain) holds there (zeros past its end).
    pub fn write_subclusters_over(
        &mut self,
        off: u64,
        data: &[u8],
        backing: Option<&crate::image::Image>,
    ) -> Result<()> {
        let parts = self.parts(off, data.len() as u64)?;
        let len = data.len() as u64;
        let end = off + len;
        let sc = self.up.g.subcluster_size;
        let padded;
        let data = if end.is_multiple_of(sc) {
            data
        } else {
            let mut v = data.to_vec();
            let mut tail = vec![0u8; (end.next_multiple_of(sc) - end) as usize];
            if let Some(b) = backing {
                let n = b.virtual_size().saturating_sub(end).min(tail.len() as u64) as usize;
                if n > 0 {
                    b.read_at(&mut tail[..n], end)?;
                }
            }
            v.extend_from_slice(&tail);
            padded = v;
            &padded[..]
        };
        self.check_unallocated(&parts)?;
        self.up.note_written(off, len);
        let per = self.up.g.l2_entries();
        let mut i = 0;
        while i < parts.len() {
            let t = parts[i].c / per;
            let mut j = i;
            while j < parts.len() && parts[j].c / per == t {
                j += 1;
            }
            self.write_in_table(t, &parts[i..j], off, data)?;
            i = j;
        }
        Ok(())
    }

    /// The writes of `parts` (all in L2 table `t`); `data` starts at guest `off`.
    fn write_in_table(&mut self, t: u64, parts: &[Part], off: u64, data: &[u8]) -> Result<()> {
        let cs = self.up.cs();
        let cb = self.up.cb();
        let sc = self.up.g.subcluster_size;
        let per = self.up.g.l2_entries();
        let (mut table, l2) = self.ext_table(t)?;
        // The table first, then the data clusters, as QEMU allocates them.
        let new_table = match l2 {
            None => Some(self.up.alloc(1)?),
            Some(_) => None,
        };
        let bytes_of = |p: &Part| -> (usize, usize) {
            let start = p.c * cs + p.lo * sc;
            let end = (p.c * cs + p.hi * sc).min(off + data.len() as u64);
            ((start - off) as usize, (end - off) as usize)
        };
        debug_assert!(parts.iter().all(|p| bytes_of(p).1 <= data.len()));
        // Clusters without a host cluster, in runs of consecutive guest clusters, get
        // consecutive new ones.
        let mut hosts: Vec<u64> = Vec::with_capacity(parts.len());
        let mut k = 0;
        while k < parts.len() {
            let j0 = (parts[k].c % per) as usize;
            let host = table[j0].0 & L2E_OFFSET_MASK;
            if host != 0 {
                hosts.push(host);
                k += 1;
                continue;
            }
            let mut m = k + 1;
            while m < parts.len()
                && parts[m].c == parts[m - 1].c + 1
                && table[(parts[m].c % per) as usize].0 & L2E_OFFSET_MASK == 0
            {
                m += 1;
            }
            let at = self.up.alloc_with((m - k) as u64, false)?;
            for n in 0..(m - k) as u64 {
                hosts.push((at + n) << cb);
            }
            k = m;
        }
        for (p, &host) in parts.iter().zip(&hosts) {
            let (a, b) = bytes_of(p);
            self.up.debug_event(Event::WriteAio);
            self.up.pwrite(&data[a..b], host + p.lo * sc)?;
        }
        self.up.sync()?;
        let (mut lo, mut hi) = (usize::MAX, 0usize);
        for (p, &host) in parts.iter().zip(&hosts) {
            let j = (p.c % per) as usize;
            let range = alloc_bits(p.lo, p.hi);
            let (_, bm) = table[j];
            table[j] = (host | OFLAG_COPIED, (bm | range) & !(range << 32));
            lo = lo.min(j);
            hi = hi.max(j);
        }
        self.store_table(t, &table, l2, new_table, (lo, hi))
    }

    /// Writes the entries `lo..=hi` of table `t` (in place), or the new table whole and
    /// then its L1 entry.
    fn store_table(
        &mut self,
        t: u64,
        table: &[(u64, u64)],
        l2: Option<u64>,
        new_table: Option<u64>,
        (lo, hi): (usize, usize),
    ) -> Result<()> {
        let cb = self.up.cb();
        let encode = |t: &[(u64, u64)]| -> Vec<u8> {
            t.iter()
                .flat_map(|&(e, m)| e.to_be_bytes().into_iter().chain(m.to_be_bytes()))
                .collect()
        };
        if lo > hi {
            return Ok(());
        }
        match (l2, new_table) {
            (Some(l2), _) => {
                self.up.debug_event(Event::L2Update);
                self.up
                    .pwrite(&encode(&table[lo..=hi]), l2 + 16 * lo as u64)?;
                self.up.sync()
            }
            (None, Some(nt)) => {
                self.up.debug_event(Event::L2AllocWrite);
                self.up.pwrite(&encode(table), nt << cb)?;
                self.up.sync()?;
                let e = (nt << cb) | OFLAG_COPIED;
                self.up.debug_event(Event::L1Update);
                self.up
                    .pwrite(&e.to_be_bytes(), self.up.header.l1_table_offset + 8 * t)?;
                self.up.sync()?;
                self.up.l1[t as usize] = e;
                Ok(())
            }
            (None, None) => Err(Error::invalid_argument("internal: no L2 table to write")),
        }
    }

    /// Makes `[off, off + len)` (subcluster-aligned; the end may be the virtual size)
    /// read as zeros with zero bits, as QEMU's `qcow2_subcluster_zeroize` does; the
    /// subclusters must be ones this image does not hold.
    pub fn zero_subclusters(&mut self, off: u64, len: u64) -> Result<()> {
        let parts = self.parts(off, len)?;
        self.check_unallocated(&parts)?;
        self.up.note_written(off, len);
        let per = self.up.g.l2_entries();
        let sc = self.up.g.subcluster_size;
        let cs = self.up.cs();
        let size = self.virtual_size();
        let mut i = 0;
        while i < parts.len() {
            let t = parts[i].c / per;
            let (mut table, l2) = self.ext_table(t)?;
            let new_table = match l2 {
                None => Some(self.up.alloc(1)?),
                Some(_) => None,
            };
            let (mut lo, mut hi) = (usize::MAX, 0usize);
            while i < parts.len() && parts[i].c / per == t {
                let p = parts[i];
                let j = (p.c % per) as usize;
                let (e, bm) = table[j];
                // A cluster covered to its end or to the disk's end is zeroed whole.
                let whole = p.lo == 0 && (p.hi * sc >= cs || p.c * cs + p.hi * sc >= size);
                let nb = if whole {
                    ALL_ZERO
                } else {
                    let range = alloc_bits(p.lo, p.hi);
                    (bm | (range << 32)) & !range
                };
                if nb != bm {
                    table[j] = (e, nb);
                    lo = lo.min(j);
                    hi = hi.max(j);
                }
                i += 1;
            }
            if lo <= hi || new_table.is_some() {
                if new_table.is_some() && lo > hi {
                    (lo, hi) = (0, 0);
                }
                self.store_table(t, &table, l2, new_table, (lo, hi))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::Image;

    /// A new qcow2 image with extended L2 entries (64 KiB clusters, 2 KiB subclusters).
    fn ext_qcow2(dir: &std::path::Path, size: u64) -> std::path::PathBuf {
        let p = dir.join("t.qcow2");
        let opts = crate::options::CreateOptions::new().with("extended_l2", "on");
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
    fn alloc_bits_cover_the_range() {
        assert_eq!(alloc_bits(0, 32), 0xFFFF_FFFF);
        assert_eq!(alloc_bits(1, 2), 0b10);
        assert_eq!(alloc_bits(30, 32), 0xC000_0000);
        assert_eq!(alloc_bits(5, 5), 0);
    }

    #[test]
    fn writes_and_zeroes_subclusters_and_reads_them_back() {
        let dir = tempfile::tempdir().unwrap();
        let size = (1 << 20) + 3 * 512;
        let p = ext_qcow2(dir.path(), size);
        let mut want = vec![0u8; size as usize];
        {
            let mut up = Qcow2Update::open(&p, ExternalPolicy::Deny).unwrap();
            let mut w = up.subcluster_writer().unwrap();
            assert_eq!(w.write_unit(), 2048);
            // Two subclusters of cluster 0, then in place into the same host cluster.
            w.write_subclusters(2048, &[1u8; 4096]).unwrap();
            w.write_subclusters(60 << 10, &[2u8; 2048]).unwrap();
            // Across a cluster boundary, into two new clusters.
            w.write_subclusters(126 << 10, &[3u8; 6144]).unwrap();
            // Zeros, partly and wholly covered clusters.
            w.zero_subclusters(200 << 10, 184 << 10).unwrap();
            // The last subcluster ends at the (unaligned) disk end.
            w.write_subclusters(size - 1536, &[4u8; 1536]).unwrap();
            w.finish().unwrap();
        }
        want[2048..6144].fill(1);
        want[60 << 10..62 << 10].fill(2);
        want[126 << 10..132 << 10].fill(3);
        want[size as usize - 1536..].fill(4);
        assert_eq!(read_all(&p), want);
        let img = Image::open(&p, &crate::OpenOptions::default().open_backing(false)).unwrap();
        let rep = crate::image::check(&img).unwrap();
        assert_eq!(rep.corruptions + rep.leaks, 0, "{:?}", rep.messages);
        // One host cluster for cluster 0, one table, two clusters for 1 and 2.
        let mut up = Qcow2Update::open(&p, ExternalPolicy::Deny).unwrap();
        let w = up.subcluster_writer().unwrap();
        let (e0, b0) = w.ext_entry(0).unwrap();
        assert_ne!(e0 & L2E_OFFSET_MASK, 0);
        assert_eq!(b0, 0b110 | (1 << 30));
        let (_, b3) = w.ext_entry(3).unwrap();
        assert_eq!(b3 >> 32, 0xFFFF_FFFF & !0xF, "cluster 3: zero from 200k on");
        let (e4, b4) = w.ext_entry(4).unwrap();
        assert_eq!(
            (e4, b4),
            (0, ALL_ZERO),
            "cluster 4: wholly zero, no host cluster"
        );
    }

    #[test]
    fn refuses_held_subclusters_and_unaligned_requests_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let p = ext_qcow2(dir.path(), 1 << 20);
        let mut up = Qcow2Update::open(&p, ExternalPolicy::Deny).unwrap();
        let mut w = up.subcluster_writer().unwrap();
        w.write_subclusters(4096, &[1u8; 2048]).unwrap();
        w.zero_subclusters(8192, 2048).unwrap();
        w.finish().unwrap();
        drop(up);
        let before = std::fs::read(&p).unwrap();
        let mut up = Qcow2Update::open(&p, ExternalPolicy::Deny).unwrap();
        let mut w = up.subcluster_writer().unwrap();
        // Allocated, zero, unaligned start, unaligned end inside the disk.
        assert!(w.write_subclusters(2048, &[9u8; 4096]).is_err());
        assert!(w.write_subclusters(8192, &[9u8; 2048]).is_err());
        assert!(w.zero_subclusters(0, 6144).is_err());
        assert!(w.write_subclusters(512, &[9u8; 2048]).is_err());
        assert!(w.write_subclusters(16384, &[9u8; 1000]).is_err());
        assert!(w.write_subclusters(1 << 20, &[9u8; 2048]).is_err());
        drop(up);
        assert_eq!(std::fs::read(&p).unwrap(), before, "a refused write wrote");
    }
}
