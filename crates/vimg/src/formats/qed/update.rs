//! Changing an existing QED image in place, as qemu-img does through QEMU's block/qed.c:
//! `resize` (grow only), the backing file reference (`rebase`), guest data (`commit`,
//! safe `rebase`, `convert -n`) and `check -r`. The image is first opened by
//! [`QedReader`] (header and every table checked, the same code as reading), then the
//! same file is changed through the tables it read.
//!
//! Crash safety (docs/interop/qed_spec.txt, "Consistency checking"; QEMU's order):
//! - new clusters are allocated at the end of the file and never reused, so a crash
//!   before a table points at them leaves leaked clusters, never a wrong pointer;
//! - guest data is written (and flushed) before the L2 entry that points at it; a new L2
//!   table is written whole into fresh clusters after the data and flushed before the L1
//!   entry points at it; each table update is the sectors holding the changed entries;
//! - an image without a backing file gets the need-check flag before its first
//!   allocation and loses it after the final flush, as QEMU sets it (with a backing file
//!   QEMU flushes before every L2 update instead, which vimg always does);
//! - the header is changed last, by one write inside its first sector (resize, the
//!   backing file with a name of up to 448 bytes; a longer name's tail is written first).
//!
//! A crash test hook counts the writes ([`crate::formats::qcow2::update::CRASH_HOOK_ENV`]).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::error::QedError;
use super::header::{
    write_table, Header, F_BACKING_FILE, F_BACKING_FORMAT_NO_PROBE, F_NEED_CHECK, HEADER_SIZE,
    ZERO_CLUSTER,
};
use super::read::QedReader;
use crate::check::CheckReport;
use crate::error::{Error, ErrorKind, Result};
use crate::formats::inplace_file::UpdateFile;
use crate::formats::qcow2::update::{CrashHook, Prealloc, RepairReport};
use crate::image::Image;
use crate::mapping::ImageReader;

/// Bytes of the header QEMU rewrites (the sector holding the header fields).
const HEADER_SECTOR: usize = 512;

fn io_err(path: &Path, what: impl std::fmt::Display, e: std::io::Error) -> Error {
    Error::io(format_args!("{what} of '{}'", path.display()), e)
}

/// A QED image opened for writing.
#[derive(Debug)]
pub struct QedUpdate {
    file: File,
    path: PathBuf,
    header: Header,
    cs: u64,
    /// Entries per table.
    per: u64,
    l1: Vec<u64>,
    /// Per L1 entry covering the disk: its L2 table, or `None`.
    l2: Vec<Option<Vec<u64>>>,
    /// Where the next cluster is allocated (QEMU's `file_size`).
    alloc_end: u64,
    leaks: u64,
    /// Opened for `check -r` only, its tables not checked (the reader refused them).
    damaged: bool,
    hook: CrashHook,
}

impl QedUpdate {
    /// Opens `path` read-write; the image is first opened and checked by [`QedReader`].
    /// Unknown autoclear feature bits are cleared, as QEMU clears them on a read-write open.
    pub fn open(path: &Path) -> Result<QedUpdate> {
        let (f, storage) = UpdateFile::open(path)?;
        let file = f.into_file();
        let meta = file.metadata().map_err(|e| io_err(path, "stat", e))?;
        let r = QedReader::open(storage)?;
        let report = r.check()?;
        let mut u = QedUpdate {
            damaged: false,
            file,
            path: path.to_path_buf(),
            cs: r.cluster_size,
            per: r.header.table_entries(),
            l1: r.l1.clone(),
            l2: r.l2.clone(),
            alloc_end: meta.len() / r.cluster_size * r.cluster_size,
            leaks: report.leaks,
            header: r.header.clone(),
            hook: CrashHook::from_env(),
        };
        // QEMU on a read-write open: unknown autoclear bits cleared; an image not closed
        // cleanly is checked and fixed (qed_check), and loses the need-check flag at close.
        // Here the reader has checked every table (an image it accepts is one qed_check
        // finds nothing to fix in), so the flag goes now, before anything builds on it.
        if u.header.autoclear_features != 0 || u.header.features & F_NEED_CHECK != 0 {
            u.sync()?;
            let mut h = u.header.clone();
            h.autoclear_features = 0;
            h.features &= !F_NEED_CHECK;
            u.write_header(&h)?;
            u.sync()?;
        }
        Ok(u)
    }

    /// Opens `path` read-write for `check -r`: as [`QedUpdate::open`], or, when the
    /// reader refuses the tables as corrupt, with the header alone (its fields checked by
    /// the reader before the tables), for QEMU's repair to clear what it can. Such an
    /// image can only be repaired.
    pub fn open_for_repair(path: &Path) -> Result<QedUpdate> {
        let err = match QedUpdate::open(path) {
            Ok(u) => return Ok(u),
            Err(e) if e.kind() == ErrorKind::Corrupt => e,
            Err(e) => return Err(e),
        };
        let file = UpdateFile::open(path)?.0.into_file();
        let mut hb = [0u8; HEADER_SIZE];
        file.read_exact_at(&mut hb, 0)
            .map_err(|e| io_err(path, "read the header", e))?;
        let header = Header::parse(&hb)?;
        let len = file.metadata().map_err(|e| io_err(path, "stat", e))?.len();
        let cs = u64::from(header.cluster_size);
        // The fields the reader checked before it met the tables; once more, cheaply.
        if !cs.is_power_of_two() || cs < 4096 || header.table_size == 0 {
            return Err(err);
        }
        // And the backing file name, which the reader checks after the tables: a repair
        // that fixed them must leave an image that opens (found by the repair target).
        if header.features & super::header::F_BACKING_FILE != 0 {
            let hb = u64::from(header.header_size).saturating_mul(cs);
            super::open::check_backing_name_field(&header, hb)?;
        }
        Ok(QedUpdate {
            file,
            path: path.to_path_buf(),
            cs,
            per: header.table_entries(),
            l1: Vec::new(),
            l2: Vec::new(),
            alloc_end: len / cs * cs,
            leaks: 0,
            damaged: true,
            header,
            hook: CrashHook::from_env(),
        })
    }

    /// The header as it is now.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The cluster size.
    pub fn cluster_size(&self) -> u64 {
        self.cs
    }

    /// The (device, inode) of the file open for writing.
    pub fn identity(&self) -> Result<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let m = self
            .file
            .metadata()
            .map_err(|e| io_err(&self.path, "stat", e))?;
        Ok((m.dev(), m.ino()))
    }

    /// Refuses to build on an image opened for repair only.
    fn require_clean(&self) -> Result<()> {
        if self.damaged {
            return Err(Error::corrupt(format!(
                "'{}' has corrupt QED tables; only 'check -r' changes it",
                self.path.display()
            )));
        }
        Ok(())
    }

    // ---- raw I/O with the crash hook ----

    fn pwrite(&mut self, buf: &[u8], off: u64) -> Result<()> {
        self.hook.point();
        self.file
            .write_all_at(buf, off)
            .map_err(|e| io_err(&self.path, format_args!("write at {off:#x}"), e))?;
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        self.hook.point();
        self.file
            .sync_data()
            .map_err(|e| io_err(&self.path, "fsync", e))
    }

    /// Writes the header fields of `h`: the first sector read, patched and written back in
    /// one write, as QEMU's qed_write_header does.
    fn write_header(&mut self, h: &Header) -> Result<()> {
        let mut sector = [0u8; HEADER_SECTOR];
        self.file
            .read_exact_at(&mut sector, 0)
            .map_err(|e| io_err(&self.path, "read the header", e))?;
        h.write_to(&mut sector);
        self.pwrite(&sector, 0)?;
        self.header = h.clone();
        Ok(())
    }

    // ---- resize ----

    /// Grows the virtual size to `size` (QEMU's rules and messages: no preallocation, whole
    /// sectors within what two levels of tables address, no shrinking).
    pub fn resize(&mut self, size: u64, prealloc: Prealloc) -> Result<()> {
        let name = match prealloc {
            Prealloc::Off => None,
            Prealloc::Metadata => Some("metadata"),
            Prealloc::Falloc => Some("falloc"),
            Prealloc::Full => Some("full"),
        };
        if let Some(n) = name {
            return Err(Error::refusal(
                ErrorKind::Unsupported,
                format!("Unsupported preallocation mode '{n}'"),
            ));
        }
        let max = self.per * self.per * self.cs;
        if !size.is_multiple_of(512) || size > max {
            return Err(Error::refusal(
                ErrorKind::InvalidArgument,
                "Invalid image size specified",
            ));
        }
        if size < self.header.image_size {
            return Err(Error::refusal(
                ErrorKind::Unsupported,
                "Shrinking images is currently not supported",
            ));
        }
        self.require_clean()?;
        // L1 entries past the old size were never checked: the new area must not bring
        // any to life.
        let span = self.per * self.cs;
        let old = self.l2.len();
        let needed = size.div_ceil(span) as usize;
        for i in old..needed {
            let v = self.l1.get(i).copied().unwrap_or(0);
            if v != 0 {
                return Err(QedError::Offset {
                    what: format!(
                        "L1 entry {i} (at {:#x}), past the old virtual size",
                        self.header.l1_table_offset + 8 * i as u64
                    ),
                    value: v,
                    why: "not zero; vimg does not grow the disk over it".into(),
                }
                .into());
            }
        }
        let mut h = self.header.clone();
        h.image_size = size;
        self.write_header(&h)?;
        self.sync()?;
        self.l2.resize(needed, None);
        Ok(())
    }

    // ---- backing file ----

    /// Points the image at `backing` (name and format name, stored as given) or at none,
    /// as QEMU's bdrv_qed_co_change_backing_file: the name right after the header fields,
    /// which must fit in the header clusters.
    pub fn set_backing(&mut self, backing: Option<(&str, &str)>) -> Result<()> {
        if backing.is_some() && self.header.compat_features != 0 {
            // Unknown compat features may keep data after the header fields.
            return Err(Error::refusal(
                ErrorKind::Unsupported,
                "Operation not supported",
            ));
        }
        self.require_clean()?;
        let mut h = self.header.clone();
        h.features &= !(F_BACKING_FILE | F_BACKING_FORMAT_NO_PROBE);
        let name = backing.map(|(n, _)| n.as_bytes()).unwrap_or(&[]);
        if let Some((_, fmt)) = backing {
            h.features |= F_BACKING_FILE;
            if fmt == "raw" {
                h.features |= F_BACKING_FORMAT_NO_PROBE;
            }
        }
        h.backing_filename_offset = HEADER_SIZE as u32;
        h.backing_filename_size = name.len() as u32;
        let room = u64::from(h.header_size) * self.cs;
        let total = HEADER_SIZE + name.len();
        if total as u64 > room || name.len() > super::MAX_BACKING_NAME as usize {
            return Err(Error::refusal(
                ErrorKind::Unsupported,
                "No space left in the file header",
            ));
        }
        let mut buf = vec![0u8; total.max(HEADER_SECTOR)];
        self.file
            .read_exact_at(&mut buf[..HEADER_SECTOR], 0)
            .map_err(|e| io_err(&self.path, "read the header", e))?;
        h.write_to(&mut buf);
        buf[HEADER_SIZE..total].copy_from_slice(name);
        if total > HEADER_SECTOR {
            // The tail first: until the first sector is written the old header stands.
            let tail = buf[HEADER_SECTOR..].to_vec();
            self.pwrite(&tail, HEADER_SECTOR as u64)?;
            self.sync()?;
        }
        self.pwrite(&buf[..HEADER_SECTOR], 0)?;
        self.sync()?;
        self.header = h;
        Ok(())
    }

    // ---- check -r ----

    fn file_len(&self) -> Result<u64> {
        Ok(self
            .file
            .metadata()
            .map_err(|e| io_err(&self.path, "stat", e))?
            .len())
    }

    /// `check -r` (leaks or all: QEMU's qed repairs the same for both): QEMU's qed_check
    /// with fix. Invalid L1 and L2 entries are cleared (whole L2 tables rewritten, then
    /// the L1 table: a crash between leaves entries still invalid, never a new wrong
    /// one); clusters named twice stay corruptions; leaks are counted, not freed (QED
    /// never reuses space, and QEMU leaves them); a consistent image loses its need-check
    /// flag, after a flush (QEMU's close clears it even when corruptions remain).
    pub fn repair(&mut self) -> Result<RepairReport> {
        let len = self.file_len()?;
        let scan = super::check::scan(&self.file, &self.path, &self.header, len, true)?;
        for (off, b) in &scan.fixes {
            self.pwrite(b, *off)?;
        }
        let r = scan.report;
        // qed_check_mark_clean wants no corruption left, but QEMU's close clears the flag
        // whatever the check found; qemu-img check -r leaves the image without it.
        if self.header.features & F_NEED_CHECK != 0 {
            self.sync()?;
            let mut h = self.header.clone();
            h.features &= !F_NEED_CHECK;
            self.write_header(&h)?;
        }
        self.sync()?;
        Ok(RepairReport {
            corruptions_fixed: r.corruptions_fixed,
            before: r,
            ..RepairReport::default()
        })
    }

    /// QEMU's qed_check without fix, over the tables on disk (`check -r`'s second check).
    pub fn check_report(&self) -> Result<CheckReport> {
        let len = self.file_len()?;
        Ok(super::check::scan(&self.file, &self.path, &self.header, len, false)?.report)
    }

    /// Leaked clusters found at open.
    pub fn leaks(&self) -> u64 {
        self.leaks
    }

    /// Opens the image for guest-data writes.
    pub fn data_writer(&mut self) -> Result<QedDataWriter<'_>> {
        self.require_clean()?;
        Ok(QedDataWriter {
            u: self,
            set_check: false,
        })
    }
}

/// Guest-data writes into a [`QedUpdate`]'s image, in QEMU's order (module docs).
#[derive(Debug)]
pub struct QedDataWriter<'a> {
    u: &'a mut QedUpdate,
    /// This writer set the need-check flag and clears it at [`QedDataWriter::finish`].
    set_check: bool,
}

impl QedDataWriter<'_> {
    /// The cluster size.
    pub fn cluster_size(&self) -> u64 {
        self.u.cs
    }

    fn entry(&self, c: u64) -> u64 {
        let (i, j) = ((c / self.u.per) as usize, (c % self.u.per) as usize);
        match self.u.l2.get(i) {
            Some(Some(t)) => t.get(j).copied().unwrap_or(0),
            _ => 0,
        }
    }

    /// Writes `data` at guest offset `off`; the parts of newly allocated clusters outside
    /// it keep what the image showed there (zeros for a zero cluster, `backing` for an
    /// unallocated one).
    pub fn write_at(&mut self, off: u64, data: &[u8], backing: Option<&Image>) -> Result<()> {
        let size = self.u.header.image_size;
        let end = off
            .checked_add(data.len() as u64)
            .filter(|e| *e <= size)
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "write of {} bytes at {off:#x} past the end of the QED image ({size:#x} bytes)",
                    data.len()
                ))
            })?;
        let cs = self.u.cs;
        let per = self.u.per;
        let mut pos = off;
        while pos < end {
            let c = pos / cs;
            let e = self.entry(c);
            if e > ZERO_CLUSTER {
                // Allocated: in place, no metadata changes.
                let n = (cs - pos % cs).min(end - pos);
                let from = (pos - off) as usize;
                let buf = data[from..from + n as usize].to_vec();
                self.u.pwrite(&buf, e + pos % cs)?;
                pos += n;
                continue;
            }
            // A run of clusters without data, under one L2 table.
            let table_end = (c / per + 1) * per;
            let mut last = c + 1;
            while last < table_end && last * cs < end && self.entry(last) <= ZERO_CLUSTER {
                last += 1;
            }
            let run_start = c * cs;
            let run_end = (last * cs).min(end.div_ceil(cs) * cs);
            let n = (run_end - run_start) / cs;
            let mut buf = vec![0u8; (run_end - run_start) as usize];
            // Head and tail: what the image shows there now.
            let head = (pos - run_start) as usize;
            let stop = end.min(run_end);
            if head > 0 {
                self.fill_old(&mut buf[..head], run_start, backing)?;
            }
            let tail_at = (stop - run_start) as usize;
            if tail_at < buf.len() {
                self.fill_old(&mut buf[tail_at..], stop, backing)?;
            }
            let from = (pos - off) as usize;
            buf[head..tail_at].copy_from_slice(&data[from..from + (stop - pos) as usize]);
            self.allocate(c, n, &buf)?;
            pos = stop;
        }
        Ok(())
    }

    /// Reads what the image shows at guest `off` (not allocated here: zero or backing).
    fn fill_old(&self, buf: &mut [u8], off: u64, backing: Option<&Image>) -> Result<()> {
        buf.fill(0);
        if self.entry(off / self.u.cs) == ZERO_CLUSTER {
            return Ok(());
        }
        let Some(b) = backing else { return Ok(()) };
        let n = b.virtual_size().saturating_sub(off).min(buf.len() as u64) as usize;
        if n > 0 {
            b.read_at(&mut buf[..n], off)?;
        }
        Ok(())
    }

    /// QEMU's need-check flag before the first allocation of an image without a backing
    /// file (qed_should_set_need_check).
    fn mark_need_check(&mut self) -> Result<()> {
        let u = &mut *self.u;
        if u.header.features & (F_BACKING_FILE | F_NEED_CHECK) == 0 {
            let mut h = u.header.clone();
            h.features |= F_NEED_CHECK;
            u.write_header(&h)?;
            u.sync()?;
            self.set_check = true;
        }
        Ok(())
    }

    /// Allocates `n` clusters at the end of the file for guest clusters `c..c + n` (one L2
    /// table), writes `buf` there and points the tables at them, in QEMU's order.
    fn allocate(&mut self, c: u64, n: u64, buf: &[u8]) -> Result<()> {
        self.mark_need_check()?;
        let u = &mut *self.u;
        let cs = u.cs;
        // QEMU's qed_alloc_clusters: the end of the file rounded down to whole clusters
        // (a partial last cluster is never in use: open refuses a table naming it).
        let at = u.alloc_end;
        u.alloc_end += n * cs;
        u.pwrite(buf, at)?;
        u.sync()?;
        self.point(c, n, |k| at + k * cs)
    }

    /// Makes whole guest clusters `first..first + count` read as zeros, as QEMU's
    /// qed_co_pwrite_zeroes: clusters with data are zeroed in place, the others become
    /// zero clusters (L2 entry 1).
    pub fn zero_clusters(&mut self, first: u64, count: u64) -> Result<()> {
        let cs = self.u.cs;
        let per = self.u.per;
        let end = first
            .checked_add(count)
            .filter(|e| *e <= self.u.header.image_size.div_ceil(cs))
            .ok_or_else(|| {
                Error::invalid_argument("zero clusters past the end of the QED image")
            })?;
        let zeros = vec![0u8; cs as usize];
        let mut c = first;
        while c < end {
            let e = self.entry(c);
            if e == ZERO_CLUSTER {
                c += 1;
            } else if e > ZERO_CLUSTER {
                self.u.pwrite(&zeros, e)?;
                c += 1;
            } else {
                let table_end = (c / per + 1) * per;
                let mut last = c + 1;
                while last < end.min(table_end) && self.entry(last) == 0 {
                    last += 1;
                }
                self.mark_need_check()?;
                self.point(c, last - c, |_| ZERO_CLUSTER)?;
                c = last;
            }
        }
        Ok(())
    }

    /// Points the L2 entries of guest clusters `c..c + n` (one L2 table) at `value(k)`:
    /// the sectors holding them when the table exists; else a new table at the end of the
    /// file, written whole and flushed, then the sector of the L1 entry.
    fn point(&mut self, c: u64, n: u64, value: impl Fn(u64) -> u64) -> Result<()> {
        let u = &mut *self.u;
        let cs = u.cs;
        let (i, j) = ((c / u.per) as usize, (c % u.per) as usize);
        let table_bytes = u64::from(u.header.table_size) * cs;
        let entries = (0..n).map(value);
        match u.l2.get_mut(i) {
            Some(Some(t)) => {
                for (k, v) in entries.enumerate() {
                    t[j + k] = v;
                }
                let first = (j * 8) / 512 * 512;
                let last = ((j + n as usize) * 8).div_ceil(512) * 512;
                let mut b = vec![0u8; table_bytes as usize];
                write_table(t, &mut b);
                let part = b[first..last].to_vec();
                let l2_off = u.l1[i];
                u.pwrite(&part, l2_off + first as u64)?;
            }
            Some(None) => {
                let mut t = vec![0u64; u.per as usize];
                for (k, v) in entries.enumerate() {
                    t[j + k] = v;
                }
                let l2_off = u.alloc_end;
                u.alloc_end += table_bytes;
                let mut b = vec![0u8; table_bytes as usize];
                write_table(&t, &mut b);
                u.pwrite(&b, l2_off)?;
                u.sync()?;
                u.l1[i] = l2_off;
                u.l2[i] = Some(t);
                let first = (i * 8) / 512 * 512;
                let mut l1b = vec![0u8; table_bytes as usize];
                write_table(&u.l1, &mut l1b);
                let part = l1b[first..first + 512].to_vec();
                let l1_off = u.header.l1_table_offset;
                u.pwrite(&part, l1_off + first as u64)?;
            }
            None => {
                return Err(Error::msg(
                    ErrorKind::Io,
                    format!("QED guest cluster {c} lies past the tables"),
                ))
            }
        }
        Ok(())
    }

    /// Flushes, and clears the need-check flag this writer set (QEMU's clean close).
    pub fn finish(self) -> Result<()> {
        self.u.sync()?;
        if self.set_check {
            let mut h = self.u.header.clone();
            h.features &= !F_NEED_CHECK;
            self.u.write_header(&h)?;
            self.u.sync()?;
        }
        Ok(())
    }
}
