//! Guest-data writes into an existing qcow (version 1) image (`convert -n`, `commit` into a
//! qcow base, emptying a qcow top after `commit`), placed where QEMU's block/qcow.c
//! (`get_cluster_offset`, `qcow_co_pwritev`, `qcow_make_empty`) places them, in an order
//! that survives a crash:
//!
//! - a write into an allocated (uncompressed) cluster goes in place;
//! - a cluster not allocated here, or compressed, gets a new cluster at the end of the
//!   file (rounded up to the cluster size), after a new L2 table (also at the rounded end
//!   of the file) when its L1 entry has none: QEMU's layout. The new cluster is written
//!   whole: the guest data, and for the rest the old content (a compressed cluster
//!   decompressed, as QEMU does), else the backing file's, else zeros;
//! - with AES encryption (header `crypt_method` 1) every sector written is encrypted with
//!   its guest sector as IV ([`super::aes`]), with the key of the user's secret;
//! - each write call is one batch: new clusters and new L2 tables (already holding their
//!   entries) are written, then flushed; then the entries of L2 tables that existed and
//!   the L1 entries of the new tables, then flushed. qcow has no refcounts: a process
//!   killed at any point leaves every cluster old or new, with at worst unreferenced space
//!   at the end of the file, which the next allocation writes past;
//! - [`QcowUpdate::make_empty`] (after `commit`) zeroes the L1 table, flushes, and cuts the
//!   file after it, as QEMU's `qcow_make_empty` does.
//!
//! Zero writes leave unallocated clusters alone where nothing shows through (no backing
//! file) and write zeros elsewhere: QEMU's driver has no other way to express zeros.
//!
//! Refused before anything is written: what the reader refuses (every table and cluster
//! checked, no overlaps), and an encrypted image without its key (qemu-img's words).

use std::path::Path;

use super::aes::{AesKey, CRYPT_AES};
use super::header::{Header, COMPRESSED};
use super::read::{compressed, QcowReader};
use crate::error::{Error, Result};
use crate::formats::inplace_file::UpdateFile;
use crate::image::Image;
use crate::mapping::Codec;

/// A qcow (version 1) image open for guest-data writes.
#[derive(Debug)]
pub struct QcowUpdate {
    f: UpdateFile,
    header: Header,
    virtual_size: u64,
    cluster_bits: u32,
    l2_bits: u32,
    l1: Vec<u64>,
    /// Per L1 entry: the L2 table, or `None` when unallocated.
    l2: Vec<Option<Vec<u64>>>,
    key: Option<AesKey>,
    /// The file's length as this updater has made it.
    end: u64,
}

/// One batch of new clusters and tables, as [`QcowUpdate::write_at`] plans it.
#[derive(Default)]
struct Batch {
    /// New bytes at the end of the file: `(offset, bytes)`, ascending.
    fresh: Vec<(u64, Vec<u8>)>,
    /// L2 tables that existed and whose entries changed: `(L1 index, first, last)`.
    entries: Vec<(usize, usize, usize)>,
    /// L1 entries of new L2 tables (first, last).
    l1: Option<(usize, usize)>,
    /// New L2 tables (L1 index), written whole with their entries.
    new_tables: Vec<usize>,
}

impl QcowUpdate {
    /// Opens the qcow image at `path` read-write; the reader checks it first. An
    /// AES-encrypted image needs `key_secret` (the id of the secret whose text is the key,
    /// as qemu-img's `encrypt.key-secret`).
    pub fn open(path: &Path, key_secret: Option<&str>) -> Result<QcowUpdate> {
        let (f, storage) = UpdateFile::open(path)?;
        let r = QcowReader::open_with(storage, true)?;
        let key = match r.header.crypt_method {
            CRYPT_AES => Some(AesKey::from_secret(key_secret)?),
            _ => None,
        };
        let end = f.len()?;
        // The reader checked the L1 table (inside the file, its size within the limits).
        let mut raw = vec![0u8; r.l2.len() * 8];
        crate::storage::read_exact(
            &*r.storage,
            &mut raw,
            r.header.l1_table_offset,
            "qcow L1 table",
        )?;
        let l1 = super::header::parse_table(&raw);
        Ok(QcowUpdate {
            f,
            virtual_size: r.virtual_size,
            cluster_bits: r.cluster_bits,
            l2_bits: r.l2_bits,
            header: r.header.clone(),
            l1,
            l2: r.l2,
            key,
            end,
        })
    }

    /// The (device, inode) of the file.
    pub fn identity(&self) -> Result<(u64, u64)> {
        self.f.identity()
    }

    /// The virtual size (whole sectors, as QEMU counts it).
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// The cluster size (the unit of allocation).
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    fn range(&self, off: u64, len: u64) -> Result<u64> {
        off.checked_add(len)
            .filter(|e| *e <= self.virtual_size)
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "write of {len} bytes at {off:#x} past the end of the qcow image ({:#x} bytes)",
                    self.virtual_size
                ))
            })
    }

    fn entry(&self, c: u64) -> u64 {
        let i = (c >> self.l2_bits) as usize;
        let j = (c & ((1 << self.l2_bits) - 1)) as usize;
        self.l2.get(i).and_then(|t| t.as_ref()).map_or(0, |t| t[j])
    }

    /// The next cluster-aligned offset at the end of the file, claimed for `n` bytes.
    fn claim(&mut self, n: u64) -> Result<u64> {
        let cs = self.cluster_size();
        let at = self
            .end
            .checked_next_multiple_of(cs)
            .filter(|a| a.checked_add(n).is_some_and(|e| e <= i64::MAX as u64))
            .ok_or_else(|| Error::invalid_argument("the qcow image file would grow too large"))?;
        self.end = at + n;
        Ok(at)
    }

    /// The guest content of cluster `c` other than what this updater writes: the
    /// decompressed old cluster, else the backing file's, else zeros (encrypted clusters
    /// are rewritten whole, so this is plain text).
    fn old_content(&self, c: u64, e: u64, backing: Option<&Image>) -> Result<Vec<u8>> {
        let cs = self.cluster_size();
        let mut buf = vec![0u8; cs as usize];
        if e & COMPRESSED != 0 {
            let (off, len) = compressed(e, self.cluster_bits);
            let mut raw = vec![0u8; len as usize];
            self.f.read_at(&mut raw, off)?;
            crate::codec::decompress(Codec::Deflate, &raw, &mut buf).map_err(|err| {
                Error::corrupt(format!(
                    "qcow compressed cluster {c} at {off:#x} ({len} bytes): {err}"
                ))
            })?;
        } else if let Some(b) = backing {
            let start = c * cs;
            let m = b.virtual_size().saturating_sub(start).min(cs) as usize;
            if m > 0 {
                b.read_at(&mut buf[..m], start)?;
            }
        }
        Ok(buf)
    }

    /// Writes `data` at guest offset `off` (see the module documentation for the order).
    /// `backing` (the image's backing chain) supplies the rest of new clusters written in
    /// part.
    pub fn write_at(&mut self, off: u64, data: &[u8], backing: Option<&Image>) -> Result<()> {
        let end = self.range(off, data.len() as u64)?;
        if self.key.is_some() && (!off.is_multiple_of(512) || !data.len().is_multiple_of(512)) {
            return Err(Error::invalid_argument(format!(
                "a write of {} bytes at {off:#x} into an AES-encrypted qcow image is not whole sectors",
                data.len()
            )));
        }
        let cs = self.cluster_size();
        let per = 1usize << self.l2_bits;
        let mut batch = Batch::default();
        let mut pos = off;
        while pos < end {
            let c = pos / cs;
            let within = pos % cs;
            let n = (cs - within).min(end - pos);
            let piece = &data[(pos - off) as usize..(pos - off + n) as usize];
            let e = self.entry(c);
            if e != 0 && e & COMPRESSED == 0 {
                // In place.
                match &self.key {
                    None => self.f.write_at(piece, e + within)?,
                    Some(k) => {
                        let mut buf = piece.to_vec();
                        k.apply(pos, &mut buf, true)?;
                        self.f.write_at(&buf, e + within)?;
                    }
                }
                pos += n;
                continue;
            }
            let mut buf = if n == cs {
                piece.to_vec()
            } else {
                let mut b = self.old_content(c, e, backing)?;
                b[within as usize..(within + n) as usize].copy_from_slice(piece);
                b
            };
            if let Some(k) = &self.key {
                k.apply(c * cs, &mut buf, true)?;
            }
            let i = (c >> self.l2_bits) as usize;
            let j = (c as usize) & (per - 1);
            if self.l2.get(i).is_none() {
                return Err(Error::invalid_argument(format!(
                    "guest cluster {c} has no L1 entry in the qcow image"
                )));
            }
            if self.l2[i].is_none() {
                let at = self.claim(8 << self.l2_bits)?;
                self.l1[i] = at;
                self.l2[i] = Some(vec![0; per]);
                batch.new_tables.push(i);
                batch.l1 = Some(match batch.l1 {
                    None => (i, i),
                    Some((a, z)) => (a.min(i), z.max(i)),
                });
            } else if !batch.new_tables.contains(&i) {
                match batch.entries.iter_mut().find(|t| t.0 == i) {
                    Some(t) => {
                        t.1 = t.1.min(j);
                        t.2 = t.2.max(j);
                    }
                    None => batch.entries.push((i, j, j)),
                }
            }
            let at = self.claim(cs)?;
            if let Some(t) = self.l2[i].as_mut() {
                t[j] = at;
            }
            batch.fresh.push((at, buf));
            pos += n;
        }
        self.commit_batch(batch)
    }

    /// Writes a planned batch: new bytes, flush, table entries, flush.
    fn commit_batch(&mut self, batch: Batch) -> Result<()> {
        if batch.fresh.is_empty() {
            return Ok(());
        }
        // New L2 tables with their final entries, among the new clusters, ascending.
        let mut fresh = batch.fresh;
        for &i in &batch.new_tables {
            if let Some(t) = &self.l2[i] {
                fresh.push((self.l1[i], table_bytes(t)));
            }
        }
        fresh.sort_by_key(|w| w.0);
        // Runs of adjacent writes go as one.
        let mut run: Option<(u64, Vec<u8>)> = None;
        for (at, b) in fresh {
            match run.as_mut() {
                Some((s, r)) if *s + r.len() as u64 == at && r.len() < (8 << 20) => {
                    r.extend_from_slice(&b)
                }
                _ => {
                    if let Some((s, r)) = run.take() {
                        self.f.write_at(&r, s)?;
                    }
                    run = Some((at, b));
                }
            }
        }
        if let Some((s, r)) = run {
            self.f.write_at(&r, s)?;
        }
        self.f.sync()?;
        for (i, a, z) in batch.entries {
            if let Some(t) = &self.l2[i] {
                let b = table_bytes(&t[a..=z]);
                self.f.write_at(&b, self.l1[i] + a as u64 * 8)?;
            }
        }
        if let Some((a, z)) = batch.l1 {
            let b = table_bytes(&self.l1[a..=z]);
            self.f
                .write_at(&b, self.header.l1_table_offset + a as u64 * 8)?;
        }
        self.f.sync()
    }

    /// Makes `[off, off + len)` read as zeros: unallocated clusters with nothing below
    /// them are left alone, zeros are written elsewhere.
    pub fn write_zeroes(&mut self, off: u64, len: u64, backing: Option<&Image>) -> Result<()> {
        let end = self.range(off, len)?;
        let cs = self.cluster_size();
        const STEP: u64 = 1 << 20;
        let zeros = vec![0u8; STEP.min(len).max(1) as usize];
        let mut pos = off;
        while pos < end {
            let c = pos / cs;
            let n = (cs - pos % cs).min(end - pos);
            if self.entry(c) == 0 && backing.is_none() {
                pos += n;
                continue;
            }
            // A run of clusters that need zeros written, up to STEP bytes.
            let mut stop = pos + n;
            while stop < end && stop - pos < STEP {
                let c = stop / cs;
                if self.entry(c) == 0 && backing.is_none() {
                    break;
                }
                stop = (stop + cs - stop % cs).min(end).min(pos + STEP);
            }
            self.write_at(pos, &zeros[..(stop - pos) as usize], backing)?;
            pos = stop;
        }
        Ok(())
    }

    /// Empties the image (every guest cluster unallocated) as QEMU's `qcow_make_empty`
    /// does after `commit`: the L1 table zeroed and flushed, then the file cut after it.
    pub fn make_empty(&mut self) -> Result<()> {
        let l1_bytes = self.l1.len() as u64 * 8;
        self.f
            .write_at(&vec![0u8; l1_bytes as usize], self.header.l1_table_offset)?;
        self.f.sync()?;
        self.l1.iter_mut().for_each(|e| *e = 0);
        self.l2.iter_mut().for_each(|t| *t = None);
        self.end = self.header.l1_table_offset + l1_bytes;
        self.f.set_len(self.end)?;
        self.f.sync()
    }

    /// Flushes.
    pub fn finish(&mut self) -> Result<()> {
        self.f.sync()
    }
}

fn table_bytes(t: &[u64]) -> Vec<u8> {
    let mut b = Vec::with_capacity(t.len() * 8);
    for v in t {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b
}

#[cfg(test)]
#[path = "update_tests.rs"]
mod tests;
