//! Compressed guest-data writes into a qcow2 image open for writing: what `rebase -c`
//! writes (iotest 314). The encoder is the creator's ([`super::super::write`]'s
//! `compress_cluster`, as `convert -c` uses it) and so is the descriptor
//! ([`encode_compressed`]).
//!
//! Spec: "Compressed Clusters Descriptor"; QEMU's layout (block/qcow2-refcount.c,
//! `qcow2_alloc_bytes`): compressed clusters are packed byte by byte from a running
//! offset that starts afresh with each open; one that does not fit the rest of the
//! current host cluster continues into the next free cluster when that one is adjacent,
//! else starts at the new cluster. Every host cluster a compressed cluster touches counts
//! one reference for it; the file grows by the bytes written, not to the end of the
//! cluster they start (QEMU's file length). A cluster that does not compress below the
//! cluster size is written uncompressed, as QEMU does; the last cluster of a disk that is
//! not cluster aligned is compressed zero-padded. With extended L2 entries a compressed
//! entry's bitmap is 0, and only clusters with no host cluster and an empty bitmap take
//! one (update/extl2_write.rs writes the uncompressed ones).
//!
//! Crash safety, per L2 table (the order of update_data.rs): the L2 table's cluster (when
//! the table is new) and the host clusters the compressed bytes take get their references
//! first (flushed), then the bytes are written (flushed), then the L2 entries (in place, or
//! the new table whole and then its L1 entry, each flushed). A crash leaves every guest
//! cluster unallocated or pointing at its complete compressed data, with at worst leaked
//! references.

use super::data::DataWriter;
use super::*;
use crate::mapping::Codec;

impl DataWriter<'_> {
    /// Writes whole clusters from guest cluster `first` on, compressed where that makes
    /// them shorter (`data.len()` a multiple of the cluster size; bytes past the virtual
    /// size zeros). The clusters must be unallocated in this image (or plain zero
    /// clusters), as QEMU's compressed writes require; `rebase` writes only those.
    pub fn write_compressed(&mut self, first: u64, data: &[u8]) -> Result<()> {
        let cs = self.cluster_size() as usize;
        if !data.len().is_multiple_of(cs) {
            return Err(Error::invalid_argument(
                "write_compressed takes whole clusters",
            ));
        }
        let codec = if self.up.header.compression_type == COMPRESSION_ZSTD {
            Codec::Zstd
        } else {
            Codec::Deflate
        };
        let per = self.up.g.l2_entries();
        let units: Vec<&[u8]> = data.chunks_exact(cs).collect();
        let mut i = 0usize;
        while i < units.len() {
            let c = first + i as u64;
            // One L2 table at a time.
            let table_end = (i + (per - c % per) as usize).min(units.len());
            let mut run: Vec<Vec<u8>> = Vec::new();
            let mut j = i;
            while j < table_end {
                match super::super::write::compress_cluster(codec, units[j]) {
                    Some(e) => run.push(e),
                    None => break,
                }
                j += 1;
            }
            if run.is_empty() {
                // QEMU writes a cluster that does not shrink as a normal one.
                if self.extended() {
                    let start = c * cs as u64;
                    let n = (self.virtual_size() - start).min(cs as u64) as usize;
                    self.write_subclusters(start, &units[i][..n])?;
                } else {
                    self.write_clusters(c, units[i])?;
                }
                i += 1;
                continue;
            }
            let size = self.up.header.size;
            let start = c * cs as u64;
            let end = (start + (run.len() * cs) as u64).min(size);
            self.up.note_written(start, end.saturating_sub(start));
            self.up.write_compressed_run(c, &run)?;
            i = j;
        }
        Ok(())
    }
}

impl Qcow2Update {
    /// Host bytes for one compressed cluster of `n` bytes (fewer than a cluster), as
    /// QEMU's `qcow2_alloc_bytes` places them; references raised (not flushed).
    fn alloc_compressed_bytes(&mut self, n: u64) -> Result<u64> {
        let cs = self.cs();
        let cb = self.cb();
        let mut off = self.compressed_tail;
        // A cluster freed since (nothing here frees one) starts afresh.
        if off != 0 && self.refcount(off >> cb)? == 0 {
            off = 0;
        }
        let free_in = if off == 0 { 0 } else { cs - off % cs };
        if off == 0 || free_in < n {
            // `alloc` gives the new cluster its reference (and flushes).
            // The file grows by the bytes written, not to the cluster's end (QEMU's layout).
            let newc = self.alloc_with(1, false)? << cb;
            let continues = off != 0 && off.next_multiple_of(cs) == newc;
            if continues {
                // The bytes start in the current cluster and run into the new one.
                self.set_refcounts(off >> cb, 1, |old| Ok(old + 1))?;
            } else {
                off = newc;
            }
        } else {
            self.set_refcounts(off >> cb, 1, |old| Ok(old + 1))?;
        }
        let next = off + n;
        self.compressed_tail = if next.is_multiple_of(cs) { 0 } else { next };
        Ok(off)
    }

    /// Compressed clusters `encoded` at guest clusters `first..`, all in one L2 table.
    fn write_compressed_run(&mut self, first: u64, encoded: &[Vec<u8>]) -> Result<()> {
        let cs = self.cs();
        let cb = self.cb();
        let per = self.g.l2_entries();
        let l1i = first / per;
        let j0 = (first % per) as usize;
        if j0 + encoded.len() > per as usize
            || l1i >= self.l1.len() as u64
            || (first + encoded.len() as u64 - 1) * cs >= self.header.size.next_multiple_of(cs)
        {
            return Err(Error::invalid_argument(format!(
                "guest clusters {first}+{} are outside the image or its L2 table",
                encoded.len()
            )));
        }
        let l2 = self.l1[l1i as usize] & L1E_OFFSET_MASK;
        // Words per entry: an extended entry's bitmap follows it (0 for a compressed one,
        // as QEMU writes it).
        let stride = if self.g.extended_l2 { 2usize } else { 1 };
        // The table is found or made before the data bytes, as QEMU allocates them.
        let (mut table, new_table) = if l2 == 0 {
            (vec![0u64; per as usize * stride], Some(self.alloc(1)?))
        } else {
            if self.refcount(l2 >> cb)? != 1 {
                return Err(Error::unsupported(
                    "vimg does not write compressed clusters into an L2 table an internal snapshot shares",
                ));
            }
            let mut raw = vec![0u8; cs as usize];
            self.pread(&mut raw, l2)?;
            let t: Vec<u64> = raw
                .chunks_exact(8)
                .map(|w| u64::from_be_bytes(w.try_into().unwrap_or([0; 8])))
                .collect();
            (t, None)
        };
        for (k, _) in encoded.iter().enumerate() {
            let e = table[(j0 + k) * stride];
            let held = if stride == 2 {
                // QEMU fails on a host cluster; rebase writes only where nothing is held.
                e != 0 || table[(j0 + k) * 2 + 1] != 0
            } else {
                e != 0 && e != OFLAG_ZERO
            };
            if held {
                return Err(Error::unsupported(format!(
                    "guest cluster {} is allocated; vimg writes compressed clusters only where none is",
                    first + k as u64
                )));
            }
        }
        // References, then the bytes.
        let mut placed: Vec<(u64, u64)> = Vec::with_capacity(encoded.len());
        for e in encoded {
            let n = e.len() as u64;
            let host = self.alloc_compressed_bytes(n)?;
            if host + n > 1u64 << self.g.csize_shift {
                return Err(Error::unsupported(
                    "compressed qcow2 data would pass the largest offset a compressed cluster descriptor holds",
                ));
            }
            placed.push((host, n));
        }
        self.sync()?;
        for (e, &(host, _)) in encoded.iter().zip(&placed) {
            self.pwrite(e, host)?;
        }
        self.sync()?;
        // The L2 entries.
        for (k, &(host, n)) in placed.iter().enumerate() {
            table[(j0 + k) * stride] = encode_compressed(&self.g, host, n);
            if stride == 2 {
                table[(j0 + k) * 2 + 1] = 0;
            }
        }
        let encode = |t: &[u64]| -> Vec<u8> { t.iter().flat_map(|v| v.to_be_bytes()).collect() };
        match new_table {
            None => {
                let (lo, hi) = (j0 * stride, (j0 + encoded.len()) * stride);
                self.pwrite(&encode(&table[lo..hi]), l2 + 8 * lo as u64)?;
                self.sync()?;
            }
            Some(t) => {
                self.pwrite(&encode(&table), t << cb)?;
                self.sync()?;
                let e = (t << cb) | OFLAG_COPIED;
                self.pwrite(&e.to_be_bytes(), self.header.l1_table_offset + 8 * l1i)?;
                self.sync()?;
                self.l1[l1i as usize] = e;
            }
        }
        Ok(())
    }
}
