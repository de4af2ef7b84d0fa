//! Changing an existing qcow2 image in place: the read-write open behind `check -r`,
//! `resize` and the other in-place subcommands. It shares the reader's header and table
//! code: an image is first opened (and every table checked) by [`Qcow2Reader`], then the
//! same file is reopened for writing.
//!
//! Crash safety (spec: "Host cluster management", "Reference counts"; the rule QEMU's
//! block/qcow2*.c follows): a crash at any moment leaves an image that opens, holds the old
//! or the new content for every cluster, and at worst leaks clusters. The order of writes
//! makes that so:
//!
//! - a cluster's refcount is raised (and flushed) before any table points at it, and
//!   lowered only after the last pointer to it is gone (and flushed): a crash in between
//!   is a leak, never a cluster in use with a refcount too low;
//! - new tables (L1, refcount table) are written whole into fresh clusters and flushed
//!   before the header points at them;
//! - the file is extended before refcounts describe clusters past its end, so a leak is
//!   always inside the file where `check -r leaks` sees it;
//! - every write into a structure already in use is one table entry, or a run of refcount
//!   entries (each of which is old or new on its own), or header fields inside the first
//!   sector (one write, so one sector: old or new as a whole).
//!
//! The test hook: `VIMG_TEST_CRASH_AFTER_WRITES=N` (environment, read at open) kills the
//! process with SIGKILL just before its `N+1`-th write, flush or truncation of the image,
//! so tests can stop an operation at every point. Nothing in an image can set it.

#[path = "update_data.rs"]
mod data;
pub use data::{ClusterOp, DataWriter};

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::check::check_findings;
use super::error::Qcow2Error;
use super::header::*;
use super::read::Qcow2Reader;
use crate::check::CheckReport;
use crate::error::{Error, Result};
use crate::formats::OpenContext;
use crate::gate::ExternalPolicy;
use crate::limits;
use crate::storage::{FileStorage, Storage};

mod amend_progress;
use amend_progress::AmendOp;
pub(super) mod bitmap;
mod compress;
mod crypt;
mod crypt_rules;
mod expand_zeros;
mod extl2_write;
mod header_ext;
mod make_empty;
mod misaligned;
mod prealloc;
mod prealloc_zero;
mod rebuild;
mod rebuild_dirty;
mod resize_tail;
mod resize_zero;
mod shadow;
pub(super) mod snapshot;
mod snapshot_place;
mod snapshot_repair;
mod snapshot_table;

/// The environment variable of the crash hook (see the module documentation).
pub const CRASH_HOOK_ENV: &str = "VIMG_TEST_CRASH_AFTER_WRITES";

/// Counts the image's writes, flushes and truncations; kills the process at the
/// configured one (tests only set it). The count is the process's, shared by every image
/// an operation changes (`commit` writes the base, then the top).
#[derive(Debug)]
pub(crate) struct CrashHook {
    left: Option<&'static std::sync::Mutex<Option<u64>>>,
}

impl CrashHook {
    pub(crate) fn from_env() -> CrashHook {
        static LEFT: std::sync::OnceLock<std::sync::Mutex<Option<u64>>> =
            std::sync::OnceLock::new();
        let left = LEFT.get_or_init(|| {
            std::sync::Mutex::new(
                std::env::var(CRASH_HOOK_ENV)
                    .ok()
                    .and_then(|v| v.trim().parse().ok()),
            )
        });
        CrashHook { left: Some(left) }
    }

    /// Called before each write, flush or truncation.
    pub(crate) fn point(&mut self) {
        let Some(m) = self.left else { return };
        let Ok(mut g) = m.lock() else { return };
        if let Some(n) = g.as_mut() {
            if *n == 0 {
                // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
                unsafe {
                    libc::kill(libc::getpid(), libc::SIGKILL);
                }
            }
            *n -= 1;
        }
    }
}

/// A qcow2 image opened for writing.
#[derive(Debug)]
pub struct Qcow2Update {
    file: File,
    path: PathBuf,
    header: Header,
    g: Geometry,
    l1: Vec<u64>,
    reftable: Vec<u64>,
    file_len: u64,
    nb_snapshots: u32,
    has_data_file: bool,
    has_bitmaps: bool,
    /// No free cluster lies below this index.
    free_hint: u64,
    /// Where the next compressed cluster's bytes go (0: a fresh cluster), as QEMU's
    /// `free_byte_offset` (update/compress.rs).
    compressed_tail: u64,
    /// The last refcount block read, by refcount table index.
    block: Option<(u64, Vec<u8>)>,
    hook: CrashHook,
    /// Guest byte ranges written since the enabled bitmaps were marked in use (Some while
    /// a data writer tracks them: `update/bitmap_writes.rs`).
    written: Option<Vec<(u64, u64)>>,
    /// `bitmap` stores every other bitmap anew too, as qemu-img does on closing (true
    /// unless [`Qcow2Update::keep_other_bitmaps`]).
    store_all_bitmaps: bool,
    /// The policy the image was opened under (the check's reopen opens the data file
    /// through it: the data clusters are then counted as the data file's, not this file's).
    policy: ExternalPolicy,
    /// The data cipher of an encrypted image (LUKS or the legacy AES), unlocked at open
    /// with the secret the user bound to the file (`update/crypt.rs`).
    cipher: Option<Arc<crate::formats::cluster_crypt::ClusterCipher>>,
    /// blkdebug rules the user put over this file (`blkdebug::writes`): every read, write
    /// and flush passes them, and [`Qcow2Update::debug_event`] drives them.
    dbg: Option<Arc<crate::blkdebug::Blkdebug>>,
    /// What `check -r all` did to the snapshot table at open (update/snapshot_repair.rs).
    snapshot_scan: Option<super::check_snapshots::Scan>,
    /// Where `amend -p` reports (update/amend_progress.rs).
    amend_progress: Option<amend_progress::AmendProgress>,
}

fn io_err(path: &Path, what: impl std::fmt::Display, e: std::io::Error) -> Error {
    Error::io(format_args!("{what} of '{}'", path.display()), e)
}

/// How `resize` treats the new area (qemu-img's `--preallocation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prealloc {
    /// Nothing allocated.
    Off,
    /// Metadata only (qcow2); raw treats it as `off`.
    Metadata,
    /// fallocate(2) the new area.
    Falloc,
    /// Write zeros over the new area.
    Full,
}

impl Prealloc {
    /// Parses qemu-img's mode names.
    pub fn parse(s: &str) -> Result<Prealloc> {
        match s {
            "off" => Ok(Prealloc::Off),
            "metadata" => Ok(Prealloc::Metadata),
            "falloc" => Ok(Prealloc::Falloc),
            "full" => Ok(Prealloc::Full),
            _ => Err(Error::invalid_argument(format!(
                "Invalid preallocation mode '{s}'"
            ))),
        }
    }
}

/// How much `check -r` may repair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repair {
    /// Leaked clusters only.
    Leaks,
    /// Leaks and the corruptions vimg knows how to fix (refcounts too low where the
    /// refcount block exists, copied flags).
    All,
}

/// The outcome of `check -r`.
#[derive(Debug, Default)]
pub struct RepairReport {
    /// The check before the repair.
    pub before: CheckReport,
    /// The fixing pass's lines, in cluster order: `Repairing cluster ...` for what was
    /// fixed, `ERROR cluster ...` again for what was not (as QEMU prints them).
    pub messages: Vec<String>,
    /// Leaked clusters fixed.
    pub leaks_fixed: u64,
    /// Corruptions fixed.
    pub corruptions_fixed: u64,
    /// Copied-flag findings after the refcounts were fixed (QEMU checks them then):
    /// `Repairing ...` lines for [`Repair::All`], `ERROR ...` for [`Repair::Leaks`].
    pub copied_messages: Vec<String>,
    /// A used cluster has refcount 0: QEMU rebuilds the refcount structures then, and
    /// refuses with `-r leaks`; vimg then repaired nothing.
    pub needs_rebuild: bool,
}

/// How `Checker::check_copied` begins its lines.
const COPIED_PREFIX: &str = "ERROR OFLAG_COPIED";

impl RepairReport {
    /// The first check's lines as QEMU prints them during a repair: without the copied-flag
    /// findings, which QEMU looks for only after fixing the refcounts.
    pub fn before_messages(&self) -> impl Iterator<Item = &String> {
        self.before
            .messages
            .iter()
            .filter(|m| !m.starts_with(COPIED_PREFIX))
    }
}

impl Qcow2Update {
    /// Opens `path` read-write. The image is first opened by the reader (every table
    /// checked, files it names through the gate under `policy`); images vimg cannot change
    /// safely are refused before anything is written.
    pub fn open(path: &Path, policy: ExternalPolicy) -> Result<Qcow2Update> {
        Qcow2Update::open_inner(path, policy, false)
    }

    /// Opens `path` for `check -r all`: a snapshot table past QEMU's limits is cut to
    /// them first, as QEMU's check does (update/snapshot_repair.rs).
    pub fn open_for_repair_all(path: &Path, policy: ExternalPolicy) -> Result<Qcow2Update> {
        Qcow2Update::open_inner(path, policy, true)
    }

    fn open_inner(path: &Path, policy: ExternalPolicy, repair: bool) -> Result<Qcow2Update> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(format_args!("open '{}' for writing", path.display()), e))?;
        let meta = file.metadata().map_err(|e| io_err(path, "stat", e))?;
        if !meta.file_type().is_file() {
            return Err(Error::unsupported(format!(
                "'{}' is not a regular file; vimg changes only regular files in place",
                path.display()
            )));
        }
        let ro = file.try_clone().map_err(|e| io_err(path, "dup", e))?;
        let storage: Arc<dyn Storage> =
            Arc::new(FileStorage::from_file(ro, path).map_err(|e| io_err(path, "stat", e))?);
        let mut ctx = OpenContext::new(Some(path), policy);
        // Encrypted images open with their key (update/crypt.rs), or not at all.
        let cipher = crypt_rules::unlock(&storage, &mut ctx)?;
        let (mut storage, mut scan) = Qcow2Update::prepare_snapshot_repair(storage, repair)?;
        let mut meta = meta;
        if let Some(end) = scan
            .as_ref()
            .filter(|sc| sc.dropped > 0 && sc.end > meta.len())
            .map(|sc| sc.end)
        {
            // An entry whose extra data the repair cuts may run past the end of the file
            // (iotest 261 pokes 64 KiB into the last entry of a table that ends the file);
            // QEMU reads what is not there as zeros, and so does the repair once the file
            // holds them (a longer file reads the same to QEMU: nothing else changes).
            file.set_len(end)
                .map_err(|e| io_err(path, "extend over the snapshot table", e))?;
            meta = file.metadata().map_err(|e| io_err(path, "stat", e))?;
            let ro = file.try_clone().map_err(|e| io_err(path, "dup", e))?;
            let fresh: Arc<dyn Storage> =
                Arc::new(FileStorage::from_file(ro, path).map_err(|e| io_err(path, "stat", e))?);
            (storage, scan) = Qcow2Update::prepare_snapshot_repair(fresh, repair)?;
        }
        ctx.qcow2_snapshot_repair = scan.as_ref().is_some_and(|s| s.dropped > 0);
        let r = Qcow2Reader::open(storage, &ctx)?;
        let h = r.header.clone();
        if h.incompatible_features & INCOMPAT_CORRUPT != 0 {
            return Err(Qcow2Error::Unsupported(
                "the image is marked corrupt; vimg does not change it".into(),
            )
            .into());
        }
        let file_len = meta.len();
        let dbg = {
            use std::os::unix::fs::MetadataExt;
            crate::blkdebug::writes::bound((meta.dev(), meta.ino()))
        };
        let mut u = Qcow2Update {
            file,
            path: path.to_path_buf(),
            g: r.g,
            l1: r.l1.to_vec(),
            reftable: r.reftable.to_vec(),
            file_len,
            nb_snapshots: h.nb_snapshots,
            has_data_file: h.incompatible_features & INCOMPAT_DATA_FILE != 0,
            has_bitmaps: !r.bitmaps.is_empty(),
            header: h,
            free_hint: 0,
            compressed_tail: 0,
            block: None,
            hook: CrashHook::from_env(),
            written: None,
            store_all_bitmaps: true,
            policy,
            cipher,
            dbg,
            snapshot_scan: None,
            amend_progress: None,
        };
        u.clear_unknown_autoclear()?;
        u.apply_snapshot_scan(scan)?;
        Ok(u)
    }

    /// The spec: a program that opens an image for writing and does not know an autoclear
    /// feature bit must clear it (its meaning may not survive the change). One 8-byte
    /// field of the header, as QEMU clears them on every read-write open (iotest 036).
    fn clear_unknown_autoclear(&mut self) -> Result<()> {
        let known = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW;
        let bits = self.header.autoclear_features;
        if self.header.version < 3 || bits & !known == 0 {
            return Ok(());
        }
        self.pwrite(&(bits & known).to_be_bytes(), 88)?;
        self.sync()?;
        self.header.autoclear_features = bits & known;
        Ok(())
    }

    /// The header as it is now.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Refuses images whose state a change must not build on: the dirty bit (refcounts
    /// not up to date) and, by a full check, any corruption.
    fn require_consistent(&self) -> Result<()> {
        if self.header.incompatible_features & INCOMPAT_DIRTY != 0 {
            return Err(Qcow2Error::Unsupported(
                "the image is dirty (lazy refcounts not written back); repair it with 'check -r all' first"
                    .into(),
            )
            .into());
        }
        let rep = self.reader_check()?.0;
        // Version-3 snapshot entries without the disk size are no danger to a change (QEMU
        // writes on; `snapshot -c/-d` complete them): not counted here.
        let incomplete = rep
            .messages
            .iter()
            .filter(|m| {
                m.starts_with("ERROR snapshot table entry") && m.ends_with(" is incomplete")
            })
            .count() as u64;
        if rep.corruptions > incomplete || rep.check_errors > 0 {
            return Err(Error::corrupt(format!(
                "'{}' has {} corruptions; repair it with 'check -r all' first",
                self.path.display(),
                rep.corruptions - incomplete + rep.check_errors
            )));
        }
        Ok(())
    }

    fn reader_check(&self) -> Result<(CheckReport, super::check::Findings)> {
        let ro = self
            .file
            .try_clone()
            .map_err(|e| io_err(&self.path, "dup", e))?;
        let storage: Arc<dyn Storage> = Arc::new(
            FileStorage::from_file(ro, &self.path).map_err(|e| io_err(&self.path, "stat", e))?,
        );
        // The data file is not read by the check, but opened, so that its clusters are
        // known not to be this file's (the gate judged it at the first open already).
        let policy = if self.has_data_file {
            self.policy
        } else {
            ExternalPolicy::Deny
        };
        let ctx = self.reader_ctx(policy);
        let r = Qcow2Reader::open(storage, &ctx)?;
        check_findings(&r)
    }

    // ---- raw I/O with the crash hook ----

    /// Fires a blkdebug event (nothing without rules).
    pub(crate) fn debug_event(&self, ev: crate::blkdebug::Event) {
        if let Some(d) = &self.dbg {
            d.event(ev);
        }
    }

    /// A request checked against the blkdebug rules, if any.
    fn debug_check(
        &self,
        off: u64,
        len: u64,
        io: crate::blkdebug::IoType,
        what: std::fmt::Arguments<'_>,
    ) -> Result<()> {
        match &self.dbg {
            Some(d) => d
                .check(off, len, io)
                .map_err(|e| io_err(&self.path, what, e)),
            None => Ok(()),
        }
    }

    fn pwrite(&mut self, buf: &[u8], off: u64) -> Result<()> {
        self.debug_check(
            off,
            buf.len() as u64,
            crate::blkdebug::IoType::Write,
            format_args!("write at {off:#x}"),
        )?;
        self.hook.point();
        self.file
            .write_all_at(buf, off)
            .map_err(|e| io_err(&self.path, format_args!("write at {off:#x}"), e))?;
        self.file_len = self.file_len.max(off + buf.len() as u64);
        Ok(())
    }

    /// Writes `len` zero bytes at `off` as one request that blkdebug rules see as a
    /// `write-zeroes` (QEMU's `bdrv_pwrite_zeroes`).
    fn pwrite_zeroes(&mut self, off: u64, len: u64) -> Result<()> {
        self.debug_check(
            off,
            len,
            crate::blkdebug::IoType::WriteZeroes,
            format_args!("write zeroes at {off:#x}"),
        )?;
        let dbg = self.dbg.take();
        let r = self.pwrite(&vec![0u8; len as usize], off);
        self.dbg = dbg;
        r
    }

    fn sync(&mut self) -> Result<()> {
        self.debug_check(0, 0, crate::blkdebug::IoType::Flush, format_args!("fsync"))?;
        self.hook.point();
        self.file
            .sync_data()
            .map_err(|e| io_err(&self.path, "fsync", e))
    }

    fn set_len(&mut self, len: u64) -> Result<()> {
        self.hook.point();
        self.file
            .set_len(len)
            .map_err(|e| io_err(&self.path, "truncate", e))?;
        self.file_len = len;
        Ok(())
    }

    /// Punches holes over the clusters of `runs` whose refcount is 0 (after the drop was
    /// flushed: nothing references them, so a crash at any point leaves the same image).
    /// Where the filesystem cannot punch, the clusters stay as they are (free either way).
    fn punch_free(&mut self, runs: &[(u64, u64)]) -> Result<()> {
        use std::os::unix::io::AsRawFd;
        let cb = self.cb();
        for &(first, n) in runs {
            let end = first.saturating_add(n);
            let mut c = first;
            while c < end {
                if self.refcount(c)? != 0 {
                    c += 1;
                    continue;
                }
                let s = c;
                while c < end && self.refcount(c)? == 0 {
                    c += 1;
                }
                let off = s << cb;
                if off >= self.file_len {
                    continue;
                }
                let len = ((c - s) << cb).min(self.file_len - off);
                self.hook.point();
                // SAFETY: a plain syscall on a descriptor this updater owns; no memory is
                // passed. A failure (no hole punching here) leaves the free blocks in place.
                let _ = unsafe {
                    libc::fallocate(
                        self.file.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        off as i64,
                        len as i64,
                    )
                };
            }
        }
        Ok(())
    }

    fn pread(&self, buf: &mut [u8], off: u64) -> Result<()> {
        buf.fill(0);
        if off >= self.file_len {
            return Ok(());
        }
        let n = (self.file_len - off).min(buf.len() as u64) as usize;
        self.debug_check(
            off,
            n as u64,
            crate::blkdebug::IoType::Read,
            format_args!("read at {off:#x}"),
        )?;
        self.file
            .read_exact_at(&mut buf[..n], off)
            .map_err(|e| io_err(&self.path, format_args!("read at {off:#x}"), e))
    }

    fn cs(&self) -> u64 {
        self.g.cluster_size
    }

    fn cb(&self) -> u32 {
        self.g.cluster_bits
    }

    // ---- refcounts ----

    /// The refcount block of refcount table index `rti`, if there is one.
    fn block_offset(&self, rti: u64) -> Option<u64> {
        let e = *self.reftable.get(rti as usize)?;
        let off = e & REFT_OFFSET_MASK;
        (off != 0).then_some(off)
    }

    fn load_block(&mut self, rti: u64) -> Result<Option<&mut Vec<u8>>> {
        let Some(off) = self.block_offset(rti) else {
            return Ok(None);
        };
        if self.block.as_ref().is_none_or(|(k, _)| *k != rti) {
            let mut b = vec![0u8; self.cs() as usize];
            self.pread(&mut b, off)?;
            self.block = Some((rti, b));
        }
        Ok(self.block.as_mut().map(|(_, b)| b))
    }

    /// The stored refcount of host cluster `c`.
    pub fn refcount(&mut self, c: u64) -> Result<u64> {
        let bits = self.g.refblock_bits;
        let order = self.g.refcount_order;
        let idx = (c & ((1u64 << bits) - 1)) as usize;
        Ok(match self.load_block(c >> bits)? {
            Some(b) => refcount_get(b, order, idx),
            None => 0,
        })
    }

    /// Sets the refcounts of clusters `[first, first + n)` to `value(old)`, one refcount
    /// block write per block touched (each entry is old or new on its own). Blocks that do
    /// not exist yet are created first; a block that would have to be created to store 0
    /// is left absent. Not flushed.
    fn set_refcounts(
        &mut self,
        first: u64,
        n: u64,
        value: impl Fn(u64) -> Result<u64>,
    ) -> Result<()> {
        let bits = self.g.refblock_bits;
        let order = self.g.refcount_order;
        let max = self.g.refcount_max();
        let mut c = first;
        let end = first + n;
        while c < end {
            let rti = c >> bits;
            let block_end = ((rti + 1) << bits).min(end);
            if self.block_offset(rti).is_none() {
                // Every refcount the missing block would hold is 0.
                if value(0)? == 0 {
                    c = block_end;
                    continue;
                }
                return Err(Error::corrupt(format!(
                    "no refcount block for host cluster {c} (refcount table entry {rti})"
                )));
            }
            let Some(off) = self.block_offset(rti) else {
                return Err(Error::corrupt("refcount block vanished"));
            };
            // The table entry is the image's word: a block past the end of the file is
            // refused, never written there (a write would grow the file to that offset).
            if off.checked_add(self.cs()).is_none_or(|e| e > self.file_len) {
                return Err(Error::corrupt(format!(
                    "'{}': refcount table entry {rti} points at {off:#x}, past the end of the file ({} bytes)",
                    self.path.display(),
                    self.file_len
                )));
            }
            self.debug_event(crate::blkdebug::Event::RefblockAlloc);
            let Some(b) = self.load_block(rti)? else {
                return Err(Error::corrupt("refcount block vanished"));
            };
            let lo = (c & ((1 << bits) - 1)) as usize;
            let hi = (block_end - 1 - (rti << bits)) as usize;
            for i in lo..=hi {
                let old = refcount_get(b, order, i);
                let new = value(old)?;
                if new > max {
                    return Err(Qcow2Error::Unsupported(format!(
                        "refcount of host cluster {} would exceed {max}",
                        (rti << bits) + i as u64
                    ))
                    .into());
                }
                refcount_set(b, order, i, new);
            }
            // The bytes that hold entries lo..=hi.
            let bit_lo = (lo as u64) << order;
            let bit_hi = ((hi as u64 + 1) << order) - 1;
            let (blo, bhi) = ((bit_lo / 8) as usize, (bit_hi / 8) as usize);
            let bytes = b[blo..=bhi].to_vec();
            self.pwrite(&bytes, off + blo as u64)?;
            c = block_end;
        }
        Ok(())
    }

    /// Makes sure a refcount block covers every cluster of `[first, first + n)`. Missing
    /// blocks are written after both that range and the end of the file (where they also
    /// count themselves), flushed, then entered in the refcount table and flushed. Returns
    /// false when the refcount table had to grow first (the caller searches again: the
    /// grown table took clusters at the end of the file).
    fn ensure_blocks(&mut self, first: u64, n: u64) -> Result<bool> {
        let bits = self.g.refblock_bits;
        let cb = self.cb();
        let cs = self.cs();
        let order = self.g.refcount_order;
        let p = (first + n).max(self.file_len.div_ceil(cs));
        let mut b = 0u64;
        let new_blocks = loop {
            let mut missing: Vec<u64> = ((first >> bits)..=((first + n - 1) >> bits))
                .filter(|&k| self.block_offset(k).is_none())
                .collect();
            if b > 0 {
                missing.extend(
                    (p >> bits..=((p + b - 1) >> bits)).filter(|&k| self.block_offset(k).is_none()),
                );
            }
            missing.sort_unstable();
            missing.dedup();
            if missing.len() as u64 <= b {
                break missing;
            }
            b = missing.len() as u64;
        };
        if new_blocks.is_empty() {
            return Ok(true);
        }
        let need_entries = new_blocks.iter().max().map_or(0, |m| m + 1);
        if need_entries > self.reftable.len() as u64 {
            self.grow_reftable(need_entries)?;
            return Ok(false);
        }
        let b = new_blocks.len() as u64;
        self.extend_to((p + b) << cb)?;
        for (j, &k) in new_blocks.iter().enumerate() {
            let mut blk = vec![0u8; cs as usize];
            for c in p..p + b {
                if c >> bits == k {
                    refcount_set(&mut blk, order, (c & ((1 << bits) - 1)) as usize, 1);
                }
            }
            self.pwrite(&blk, (p + j as u64) << cb)?;
        }
        // New blocks placed in ranges whose block already exists are counted there.
        for c in p..p + b {
            if !new_blocks.contains(&(c >> bits)) {
                self.set_refcounts(c, 1, |_| Ok(1))?;
            }
        }
        self.sync()?;
        // Link the blocks so that a block's own refcount is live before the entry that
        // makes it referenced: a block whose cluster another new block counts waits for
        // that one (a flush between the levels).
        let mut todo: Vec<(u64, u64)> = new_blocks
            .iter()
            .enumerate()
            .map(|(j, &k)| (k, p + j as u64))
            .collect();
        while !todo.is_empty() {
            // (refcount table index, cluster) pairs.
            type Links = Vec<(u64, u64)>;
            let (ready, wait): (Links, Links) = todo.iter().partition(|&&(k, c)| {
                let owner = c >> bits;
                owner == k || !todo.iter().any(|&(k2, _)| k2 == owner)
            });
            if ready.is_empty() {
                return Err(Error::unsupported(
                    "new refcount blocks would count each other; vimg cannot link them safely",
                ));
            }
            for (k, c) in ready {
                let off = c << cb;
                self.reftable[k as usize] = off;
                let at = self.header.refcount_table_offset + 8 * k;
                self.pwrite(&off.to_be_bytes(), at)?;
            }
            self.sync()?;
            todo = wait;
        }
        self.block = None;
        Ok(true)
    }

    /// Replaces the refcount table with one of at least `min_entries` entries, at the end
    /// of the file, with new refcount blocks for the clusters it and they occupy.
    fn grow_reftable(&mut self, min_entries: u64) -> Result<()> {
        let cs = self.cs();
        let cb = self.cb();
        let bits = self.g.refblock_bits;
        let per_cluster = cs / 8;
        let want = min_entries.max(self.reftable.len() as u64 * 3 / 2);
        let t = want.div_ceil(per_cluster).max(1);
        if t * cs > MAX_REFTABLE_BYTES {
            return Err(
                Qcow2Error::Unsupported("the refcount table would grow past 8 MiB".into()).into(),
            );
        }
        let entries = t * per_cluster;
        let e = self.file_len.div_ceil(cs);
        // Blocks needed for [e, e + t + b): iterate to a fixed point.
        let mut b = 0u64;
        let new_blocks = loop {
            let last = e + t + b - 1;
            let missing: Vec<u64> = ((e >> bits)..=(last >> bits))
                .filter(|&k| self.block_offset(k).is_none())
                .collect();
            if missing.len() as u64 <= b {
                break missing;
            }
            b = missing.len() as u64;
        };
        let b = new_blocks.len() as u64;
        if e + t + b > entries << bits {
            return Err(Qcow2Error::Unsupported(
                "the refcount table would not cover itself".into(),
            )
            .into());
        }
        let mut table = self.reftable.clone();
        table.resize(entries as usize, 0);
        let order = self.g.refcount_order;
        // The new blocks' contents: every cluster of [e, e + t + b) they cover has refcount 1.
        for (j, &k) in new_blocks.iter().enumerate() {
            let at = e + t + j as u64;
            table[k as usize] = at << cb;
            let mut blk = vec![0u8; cs as usize];
            for c in e..e + t + b {
                if c >> bits == k {
                    refcount_set(&mut blk, order, (c & ((1 << bits) - 1)) as usize, 1);
                }
            }
            self.extend_to((at + 1) << cb)?;
            self.pwrite(&blk, at << cb)?;
        }
        // Existing blocks that cover part of the new area.
        let mut raw = Vec::with_capacity((t * cs) as usize);
        for &v in &table {
            raw.extend_from_slice(&v.to_be_bytes());
        }
        self.extend_to((e + t + b) << cb)?;
        self.pwrite(&raw, e << cb)?;
        let old_off = self.header.refcount_table_offset;
        let old_clusters = u64::from(self.header.refcount_table_clusters);
        let old_table = std::mem::replace(&mut self.reftable, table);
        let covered_old: Vec<u64> = (e..e + t + b)
            .filter(|&c| {
                old_table
                    .get((c >> bits) as usize)
                    .is_some_and(|v| v & REFT_OFFSET_MASK != 0)
            })
            .collect();
        for c in covered_old {
            self.set_refcounts(c, 1, |_| Ok(1))?;
        }
        self.sync()?;
        // Header: refcount_table_offset (48..56) and refcount_table_clusters (56..60).
        let mut h = [0u8; 12];
        h[..8].copy_from_slice(&(e << cb).to_be_bytes());
        h[8..].copy_from_slice(&(t as u32).to_be_bytes());
        self.pwrite(&h, 48)?;
        self.sync()?;
        self.header.refcount_table_offset = e << cb;
        self.header.refcount_table_clusters = t as u32;
        self.free(old_off >> cb, old_clusters)?;
        self.sync()?;
        Ok(())
    }

    /// Makes the file at least `len` bytes long, so that refcounts never describe
    /// clusters past its end.
    fn extend_to(&mut self, len: u64) -> Result<()> {
        if len > self.file_len {
            self.set_len(len)?;
        }
        Ok(())
    }

    /// Allocates `n` contiguous free clusters: raises their refcounts to 1 and flushes.
    /// Returns the first one's index. The caller writes them, flushes, then points at them.
    pub(crate) fn alloc(&mut self, n: u64) -> Result<u64> {
        self.alloc_with(n, true)
    }

    /// [`Self::alloc`]; the file is extended over the clusters only when `extend` (else
    /// the caller's writes extend it, as QEMU's do: a table written last may end the file
    /// inside its cluster).
    pub(crate) fn alloc_with(&mut self, n: u64, extend: bool) -> Result<u64> {
        let limit = limits::MAX_VIRTUAL_SIZE >> self.cb();
        let bits = self.g.refblock_bits;
        let start = 'search: loop {
            let mut c = self.free_hint.max(1);
            let mut run = 0u64;
            let start = loop {
                if c > limit {
                    return Err(Error::unsupported(
                        "no free cluster below vimg's size limit",
                    ));
                }
                // A cluster no block describes is free; a whole missing block is skipped
                // over in one step.
                let free = if self.block_offset(c >> bits).is_none() {
                    let end = ((c >> bits) + 1) << bits;
                    let take = (end - c).min(n - run);
                    run += take;
                    c += take;
                    if run == n {
                        break c - n;
                    }
                    continue;
                } else {
                    self.refcount(c)? == 0
                };
                if free {
                    run += 1;
                    if run == n {
                        break c + 1 - n;
                    }
                } else {
                    run = 0;
                    if c == self.free_hint {
                        self.free_hint = c + 1;
                    }
                }
                c += 1;
            };
            if self.ensure_blocks(start, n)? {
                break 'search start;
            }
        };
        if extend {
            self.extend_to((start + n) << self.cb())?;
        }
        self.set_refcounts(start, n, |old| {
            if old == 0 {
                Ok(1)
            } else {
                Err(Error::corrupt("cluster became used during allocation"))
            }
        })?;
        self.sync()?;
        self.free_hint = start + n;
        Ok(start)
    }

    /// Drops one reference from each of clusters `[first, first + n)`. The caller has
    /// already removed (and flushed) the pointers. Not flushed.
    pub(crate) fn free(&mut self, first: u64, n: u64) -> Result<()> {
        self.debug_event(crate::blkdebug::Event::ClusterFree);
        self.set_refcounts(first, n, |old| {
            old.checked_sub(1)
                .ok_or_else(|| Error::corrupt("refcount would drop below zero"))
        })?;
        self.free_hint = self.free_hint.min(first);
        Ok(())
    }

    // ---- check -r ----

    /// `check -r`: fixes leaks (and, with [`Repair::All`], the corruptions vimg can fix),
    /// then the caller checks again.
    pub fn repair(&mut self, mode: Repair) -> Result<RepairReport> {
        if self.has_data_file {
            return Err(Error::unsupported(
                "vimg does not repair qcow2 images with an external data file",
            ));
        }
        // Misaligned preallocated L2 entries are fixed while QEMU counts the references
        // (update/misaligned.rs): before the check the rest of the repair works from.
        let (aligned, n_aligned) = match mode {
            Repair::All => self.repair_misaligned_prealloc()?,
            Repair::Leaks => (Vec::new(), 0),
        };
        let (mut before, found) = self.reader_check()?;
        before.messages.splice(0..0, aligned);
        let mut out = RepairReport {
            before,
            corruptions_fixed: n_aligned,
            ..RepairReport::default()
        };
        self.report_snapshot_scan(&mut out);
        out.needs_rebuild = found.refcounts.iter().any(|&(_, s, c)| s == 0 && c > 0);
        if out.needs_rebuild && mode == Repair::Leaks {
            return Ok(out);
        }
        if out.needs_rebuild {
            self.repair_by_rebuild(&found, &mut out)?;
            // The snapshot table's own fixes need the new refcounts.
            out.corruptions_fixed += self.repair_snapshot_table(&mut out.before)?;
            return Ok(out);
        }
        // Leaks first (never a risk), then refcounts that are too low; the snapshot
        // table after them (it needs allocation), as QEMU orders it.
        for &(c, stored, counted) in &found.refcounts {
            let fix = if stored > counted {
                out.leaks_fixed += 1;
                true
            } else {
                mode == Repair::All
            };
            if !fix {
                // QEMU's fixing pass names what it leaves as the first pass did.
                out.messages.push(format!(
                    "ERROR cluster {c} refcount={stored} reference={counted}"
                ));
                continue;
            }
            if stored < counted && self.block_offset(c >> self.g.refblock_bits).is_none() {
                return Err(Qcow2Error::Unsupported(format!(
                    "cluster {c} is used but has no refcount block; vimg cannot rebuild refcount structures"
                ))
                .into());
            }
            out.messages.push(format!(
                "Repairing cluster {c} refcount={stored} reference={counted}"
            ));
            self.set_refcounts(c, 1, |_| Ok(counted))?;
            if stored < counted {
                out.corruptions_fixed += 1;
            }
            self.free_hint = self.free_hint.min(c);
        }
        self.sync()?;
        // Copied flags follow the refcounts just written.
        let (rep, again) = self.reader_check()?;
        out.copied_messages = rep
            .messages
            .iter()
            .filter(|m| m.starts_with(COPIED_PREFIX))
            .map(|m| match mode {
                Repair::All => format!("Repairing{}", &m["ERROR".len()..]),
                Repair::Leaks => m.clone(),
            })
            .collect();
        if mode == Repair::All {
            for (at, v) in again.copied {
                self.pwrite(&v.to_be_bytes(), at)?;
                out.corruptions_fixed += 1;
            }
            self.sync()?;
            out.corruptions_fixed += self.repair_snapshot_table(&mut out.before)?;
            if self.header.incompatible_features & INCOMPAT_DIRTY != 0 {
                let f = self.header.incompatible_features & !INCOMPAT_DIRTY;
                self.pwrite(&f.to_be_bytes(), 72)?;
                self.sync()?;
                self.header.incompatible_features = f;
            }
        }
        Ok(out)
    }

    // ---- resize ----

    /// Changes the virtual size to `size` (a multiple of 512). Growing grows the L1 table
    /// when needed (a new table, then the header); shrinking (`shrink`) first lowers the
    /// size in the header, then drops the clusters past it and trims the file.
    pub fn resize(&mut self, size: u64, prealloc: Prealloc) -> Result<()> {
        if !size.is_multiple_of(512) {
            return Err(Error::invalid_argument(
                "The new size must be a multiple of 512",
            ));
        }
        if prealloc != Prealloc::Off {
            return Err(Error::unsupported(
                "vimg resizes qcow2 images with --preallocation=off only",
            ));
        }
        if self.has_data_file {
            return Err(Error::unsupported(
                "vimg does not resize qcow2 images with an external data file",
            ));
        }
        if self.has_bitmaps {
            return Err(Error::unsupported(
                "Can't resize an image with persistent bitmaps (vimg does not resize bitmaps)",
            ));
        }
        if size > limits::MAX_VIRTUAL_SIZE {
            return Err(Error::unsupported(format!(
                "Image is too big (virtual size {size} exceeds vimg's limit of {} bytes)",
                limits::MAX_VIRTUAL_SIZE
            )));
        }
        self.require_consistent()?;
        let old = self.header.size;
        if self.nb_snapshots > 0 && self.header.version < 3 {
            return Err(Error::unsupported(
                "Can't resize a v2 image which has snapshots",
            ));
        }
        if size < old && self.nb_snapshots > 0 {
            // Tables shared with snapshots: shrunk through copies (`update/rebuild.rs`).
            return self.shrink_shadowed(size);
        }
        if size >= old {
            self.grow(size)
        } else {
            self.shrink(size)
        }
    }

    fn grow(&mut self, size: u64) -> Result<()> {
        let cs = self.cs();
        let cb = self.cb();
        let need = self.g.l1_entries_for(size);
        if need <= self.l1.len() as u64 {
            self.pwrite(&size.to_be_bytes(), 24)?;
            self.sync()?;
            self.header.size = size;
            return Ok(());
        }
        let bytes = need * 8;
        if bytes > MAX_L1_BYTES {
            return Err(Error::unsupported(format!(
                "Image is too big: its L1 table would need {bytes} bytes (limit {MAX_L1_BYTES})"
            )));
        }
        let n = bytes.div_ceil(cs);
        let at = self.alloc(n)?;
        let mut raw = vec![0u8; (n * cs) as usize];
        for (i, &e) in self.l1.iter().enumerate() {
            raw[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
        }
        self.pwrite(&raw, at << cb)?;
        self.sync()?;
        // size (24..32), crypt_method (32..36), l1_size (36..40), l1_table_offset (40..48).
        let mut h = [0u8; 24];
        h[..8].copy_from_slice(&size.to_be_bytes());
        h[8..12].copy_from_slice(&self.header.crypt_method.to_be_bytes());
        h[12..16].copy_from_slice(&(need as u32).to_be_bytes());
        h[16..].copy_from_slice(&(at << cb).to_be_bytes());
        self.pwrite(&h, 24)?;
        self.sync()?;
        let (old_off, old_len) = (self.header.l1_table_offset, self.l1.len() as u64);
        self.header.size = size;
        self.header.l1_size = need as u32;
        self.header.l1_table_offset = at << cb;
        self.l1.resize(need as usize, 0);
        if old_len > 0 {
            self.free(old_off >> cb, (old_len * 8).div_ceil(cs))?;
            self.sync()?;
        }
        Ok(())
    }

    fn shrink(&mut self, size: u64) -> Result<()> {
        let cs = self.cs();
        let cb = self.cb();
        let g = self.g;
        self.pwrite(&size.to_be_bytes(), 24)?;
        self.sync()?;
        self.header.size = size;
        // Guest clusters from `keep` on go.
        let keep = size.div_ceil(cs);
        let per = g.l2_entries();
        let width = if g.extended_l2 { 16u64 } else { 8 };
        for l1i in 0..self.l1.len() as u64 {
            let l1e = self.l1[l1i as usize];
            let l2 = l1e & L1E_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let first = l1i * per;
            if first + per <= keep {
                continue;
            }
            let from = keep.saturating_sub(first);
            let mut raw = vec![0u8; cs as usize];
            self.pread(&mut raw, l2)?;
            let mut freed: Vec<(u64, u64)> = Vec::new();
            for j in from..per {
                let at = (j * width) as usize;
                let e = u64::from_be_bytes(raw[at..at + 8].try_into().unwrap_or([0; 8]));
                freed.extend(self.entry_clusters(e));
            }
            if from == 0 {
                // The whole table goes: drop the L1 entry, then the table and its clusters.
                self.debug_event(crate::blkdebug::Event::L1Update);
                self.pwrite(&0u64.to_be_bytes(), self.header.l1_table_offset + 8 * l1i)?;
                self.sync()?;
                self.l1[l1i as usize] = 0;
                freed.push((l2 >> cb, 1));
            } else {
                let lo = (from * width) as usize;
                let zeros = vec![0u8; raw.len() - lo];
                self.pwrite(&zeros, l2 + lo as u64)?;
                self.sync()?;
            }
            for &(c, n) in &freed {
                self.free(c, n)?;
            }
            self.sync()?;
            // As QEMU discards what a shrink frees (block/qcow2-cluster.c, the clusters
            // freed with QCOW2_DISCARD_ALWAYS): the blocks go back to the filesystem.
            self.punch_free(&freed)?;
        }
        // Trim the file after the last cluster still in use.
        let clusters = self.file_len.div_ceil(cs);
        let mut last = 0u64;
        for c in (0..clusters).rev() {
            if self.refcount(c)? != 0 {
                last = c;
                break;
            }
        }
        let end = (last + 1) << cb;
        if end < self.file_len {
            self.set_len(end)?;
        }
        Ok(())
    }

    /// The host clusters a (standard or compressed) L2 entry references, as runs.
    fn entry_clusters(&self, e: u64) -> Option<(u64, u64)> {
        let g = self.g;
        if e & OFLAG_COMPRESSED != 0 {
            let coffset = e & g.coffset_mask;
            let sectors = ((e >> g.csize_shift) & g.csize_mask) + 1;
            let len = sectors * 512 - (coffset & 511);
            let first = coffset >> g.cluster_bits;
            let last = (coffset + len - 1) >> g.cluster_bits;
            Some((first, last - first + 1))
        } else {
            let off = e & L2E_OFFSET_MASK;
            (off != 0).then_some((off >> g.cluster_bits, 1))
        }
    }
}

/// What `amend -o` may change (the options vimg supports; the CLI refuses the others).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Amend {
    /// `compat`: 2 (0.10) or 3 (1.1).
    pub version: Option<u32>,
    /// `lazy_refcounts`.
    pub lazy_refcounts: Option<bool>,
    /// `refcount_bits`: the new refcount width (checked here: a power of two, 1 to 64).
    pub refcount_bits: Option<u64>,
    /// `data_file_raw`: may be switched off; on only where it already is (qemu-img's rule).
    pub data_file_raw: Option<bool>,
}

impl Qcow2Update {
    /// `amend`: changes the compatibility level, the lazy-refcounts bit, the refcount
    /// width and the raw-data-file bit, with qemu-img's checks and in qemu-img's order
    /// (upgrade, refcount width, features, downgrade). Header-only changes are one write
    /// inside the first sector (the header, its extensions and the backing file name as
    /// one sector at offset 0; an image whose header would not fit one sector is refused).
    /// A new refcount width, and a downgrade to 0.10 of an image with zero clusters (which
    /// are expanded as qemu-img expands them), are one shadow switch (`update/rebuild.rs`).
    /// A downgrade refuses what version 2 cannot hold (feature bits, bitmaps, other
    /// refcount widths); zero clusters, also those of internal snapshots, are expanded.
    pub fn amend(&mut self, a: Amend) -> Result<()> {
        let upgrade = a.version.is_some_and(|v| v > self.header.version);
        self.amend_inner(a)?;
        if upgrade {
            self.progress(AmendOp::Upgrade, 2, 2);
        }
        Ok(())
    }

    fn amend_inner(&mut self, a: Amend) -> Result<()> {
        let old = self.header.clone();
        let mut h = old.clone();
        if let Some(v) = a.version {
            h.version = v;
        }
        let mut order = old.refcount_order;
        if let Some(bits) = a.refcount_bits {
            if bits == 0 || bits > 64 || !bits.is_power_of_two() {
                return Err(Error::invalid_argument(
                    "Refcount width must be a power of two and may not exceed 64 bits",
                ));
            }
            let o = bits.trailing_zeros();
            if o != order {
                if h.version < 3 && bits != 16 {
                    return Err(Error::invalid_argument(
                        "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
                    ));
                }
                order = o;
            }
        }
        let raw_now = old.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0;
        if a.data_file_raw == Some(true) && !raw_now {
            return Err(Error::invalid_argument(
                "data-file-raw cannot be set on existing images",
            ));
        }
        self.require_consistent()?;
        let mut expand = false;
        if h.version < 3 {
            // As qemu-img: only a change of the lazy-refcounts bit is checked (asking for
            // the state the image is in changes nothing).
            let lazy_now = old.compatible_features & COMPAT_LAZY_REFCOUNTS != 0;
            if a.lazy_refcounts == Some(true) && !lazy_now {
                return Err(Error::invalid_argument(
                    "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
                ));
            }
            if old.version >= 3 {
                if order != 4 {
                    return Err(Error::invalid_argument(
                        "compat=0.10 requires refcount_bits=16",
                    ));
                }
                if self.has_data_file {
                    return Err(Error::unsupported(
                        "Cannot downgrade an image with a data file",
                    ));
                }
                self.refuse_snapshot_downgrade()?;
                if old.incompatible_features != 0 {
                    return Err(Error::unsupported(format!(
                        "Cannot downgrade an image with incompatible features {:#x} set",
                        old.incompatible_features
                    )));
                }
                if self.has_bitmaps || old.autoclear_features != 0 {
                    return Err(Error::unsupported(
                        "Cannot downgrade an image with persistent bitmaps or autoclear features",
                    ));
                }
                if self.has_zero_clusters()? {
                    // Those of the active L1 table and of every snapshot's.
                    expand = true;
                    crypt_rules::refuse_expand(self.cipher.is_some())?;
                }
            }
            h.incompatible_features = 0;
            h.compatible_features = 0;
            h.autoclear_features = 0;
            h.refcount_order = 4;
            h.header_length = V2_HEADER_LEN as u32;
            h.compression_type = 0;
        } else {
            if old.version < 3 {
                h.header_length = V3_HEADER_LEN as u32;
                h.refcount_order = 4;
            }
            h.refcount_order = order;
            match a.lazy_refcounts {
                Some(true) => h.compatible_features |= COMPAT_LAZY_REFCOUNTS,
                Some(false) => h.compatible_features &= !COMPAT_LAZY_REFCOUNTS,
                None => {}
            }
            if a.data_file_raw == Some(false) {
                h.autoclear_features &= !AUTOCLEAR_DATA_FILE_RAW;
            }
        }
        // amend -p: QEMU's operations (a version change, a refcount width change).
        self.progress_ops(
            u64::from(h.version != old.version) + u64::from(h.refcount_order != old.refcount_order),
        );
        if old.version < 3 && h.version >= 3 {
            self.progress(AmendOp::Upgrade, 0, 2);
            // QEMU completes version-2 snapshot entries first (`update/snapshot_table.rs`).
            self.upgrade_snapshot_table()?;
            h.snapshots_offset = self.header.snapshots_offset;
            self.progress(AmendOp::Upgrade, 1, 2);
        }
        if old.version >= 3 && h.version < 3 && !expand {
            // Nothing to expand: every L1 entry was visited by the scan for zero clusters.
            let steps = self.downgrade_steps()?;
            for i in 1..=steps {
                self.progress(AmendOp::Downgrade, i, steps);
            }
        }
        if h == old {
            return Ok(());
        }
        if expand && h.refcount_order == old.refcount_order {
            // Without snapshots, in place as QEMU does it (update/expand_zeros.rs); the new
            // header is built first so that a refusal comes before any write.
            self.build_first_sector(&mut h.clone())?;
            if self.expand_zeros_in_place(old.backing_file_offset != 0)? {
                expand = false;
                // An allocation may have moved the refcount table.
                h.refcount_table_offset = self.header.refcount_table_offset;
                h.refcount_table_clusters = self.header.refcount_table_clusters;
            }
        }
        if h.refcount_order != old.refcount_order || expand {
            return self.rebuild_switch(
                h,
                if expand {
                    rebuild::L2Change::ExpandZeros
                } else {
                    rebuild::L2Change::Keep
                },
            );
        }
        if h.version == old.version {
            // Only feature bits change: one field, or the two adjacent ones in one write
            // (compatible at 80..88, autoclear at 88..96).
            let mut f = [0u8; 16];
            f[..8].copy_from_slice(&h.compatible_features.to_be_bytes());
            f[8..].copy_from_slice(&h.autoclear_features.to_be_bytes());
            if h.autoclear_features == old.autoclear_features {
                self.pwrite(&f[..8], 80)?;
            } else {
                self.pwrite(&f, 80)?;
            }
            self.sync()?;
            self.header = h;
            return Ok(());
        }
        let sector = self.build_first_sector(&mut h)?;
        self.pwrite(&sector, 0)?;
        self.sync()?;
        self.header = h;
        Ok(())
    }

    /// `rebase -u`: points the image at another backing file (`Some((name, format))`,
    /// both stored as given) or at none, changing nothing else. The header, the backing
    /// format extension and the name are written as one sector at offset 0, as `amend`
    /// writes them: a crash leaves the old backing reference or the new one. A name too
    /// long for that one sector is refused before anything is written.
    pub fn set_backing(&mut self, backing: Option<(&str, &str)>) -> Result<()> {
        self.require_consistent()?;
        let mut h = self.header.clone();
        let sector = self.first_sector(&mut h, Some(backing))?;
        self.pwrite(&sector, 0)?;
        self.sync()?;
        self.header = h;
        Ok(())
    }

    /// The header, its extensions (the backing format, when the image has one) and the
    /// backing file name, laid out in 512 bytes; `h`'s backing file offset is set.
    fn build_first_sector(&self, h: &mut Header) -> Result<Vec<u8>> {
        self.first_sector(h, None)
    }

    /// [`Self::build_first_sector`], with the backing reference replaced when `replace`
    /// is `Some` (`Some(None)`: no backing file).
    fn first_sector(
        &self,
        h: &mut Header,
        replace: Option<Option<(&str, &str)>>,
    ) -> Result<Vec<u8>> {
        self.first_sector_with(h, replace, None, None)
    }

    /// [`Self::first_sector`], with the bitmaps extension replaced when `bitmaps` is
    /// `Some` (`Some(None)`: none). Otherwise the bitmaps extension is kept when the
    /// autoclear bit says it is valid. The external data file name is kept, or replaced
    /// when `data_file` is `Some` (`Some(None)`: the extension removed).
    fn first_sector_with(
        &self,
        h: &mut Header,
        replace: Option<Option<(&str, &str)>>,
        bitmaps: Option<Option<BitmapsExt>>,
        data_file: Option<Option<&str>>,
    ) -> Result<Vec<u8>> {
        let cs = self.cs();
        let head_len = self.file_len.min(cs) as usize;
        let mut first = vec![0u8; head_len.max(V3_HEADER_LEN)];
        self.pread(&mut first, 0)?;
        let ext_end = if self.header.backing_file_offset != 0 {
            self.header.backing_file_offset
        } else {
            cs
        };
        let exts = parse_extensions(
            &first,
            self.header.len(),
            (ext_end as usize).min(first.len()),
            cs,
        )?;
        // Kept as QEMU keeps them (update/header_ext.rs).
        let unknown = header_ext::unknown_extensions(
            &first,
            self.header.len(),
            (ext_end as usize).min(first.len()),
        );
        let data_file_name: Option<Vec<u8>> = match data_file {
            Some(new) => new.map(|n| n.as_bytes().to_vec()),
            // Kept byte for byte (the parsed name is lossy).
            None => match &exts.data_file {
                Some(n) if n.contains('\u{FFFD}') => {
                    return Err(Error::unsupported(
                        "vimg cannot rewrite a header whose data file name is not UTF-8",
                    ))
                }
                Some(n) => Some(n.as_bytes().to_vec()),
                None => None,
            },
        };
        let backing_name = if self.header.backing_file_offset != 0 {
            let off = self.header.backing_file_offset as usize;
            let len = self.header.backing_file_size as usize;
            first
                .get(off..off + len)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| Error::corrupt("backing file name outside the first cluster"))?
        } else {
            Vec::new()
        };
        let (backing_name, backing_format) = match replace {
            None => (backing_name, exts.backing_format.clone()),
            Some(None) => (Vec::new(), None),
            Some(Some((name, format))) => (name.as_bytes().to_vec(), Some(format.to_string())),
        };
        // Room for everything the first cluster can hold plus the names checked below.
        let mut buf = vec![0u8; 4096 + 2 * cs as usize];
        let mut off = h.len();
        if backing_name.len() > 1023 {
            return Err(Error::invalid_argument(format!(
                "the backing file name is {} bytes long, more than the 1023 qcow2 allows",
                backing_name.len()
            )));
        }
        if let Some(f) = &backing_format {
            if f.len() > 1024 {
                return Err(Error::invalid_argument(
                    "the backing format name is too long",
                ));
            }
            off = write_extension(&mut buf, off, EXT_BACKING_FORMAT, f.as_bytes());
        }
        // QEMU's order (qcow2_update_header): backing format, data file, bitmaps.
        if let Some(n) = &data_file_name {
            if n.len() > 1023 {
                return Err(Error::invalid_argument(format!(
                    "the data file name is {} bytes long; vimg writes names of up to 1023",
                    n.len()
                )));
            }
            off = write_extension(&mut buf, off, EXT_DATA_FILE, n);
        }
        // Then the LUKS header pointer, kept as it is (QEMU's order).
        if let Some(ext) = crypt_rules::extension(exts.crypto) {
            off = write_extension(&mut buf, off, EXT_CRYPTO, &ext);
        }
        let bitmaps = match bitmaps {
            Some(b) => b,
            None if self.header.autoclear_features & AUTOCLEAR_BITMAPS != 0 => {
                exts.bitmaps.clone().and_then(|b| b.ok())
            }
            None => None,
        };
        // QEMU writes its feature-name table into every version 3 header; vimg does so when
        // the header still fits in the one sector it writes atomically (or when the
        // unknown extensions make it a multi-sector write anyway).
        let table_len = 8 + header_ext::feature_table_data().len();
        let rest = bitmaps
            .as_ref()
            .map_or(0, |_| 8 + BitmapsExt::LEN.div_ceil(8) * 8)
            + 8
            + backing_name.len();
        let table_fits = off + table_len + rest <= 512;
        if h.version >= 3 && (!unknown.is_empty() || table_fits) {
            off = write_extension(
                &mut buf,
                off,
                EXT_FEATURE_TABLE,
                &header_ext::feature_table_data(),
            );
        }
        if let Some(b) = bitmaps {
            let mut data = [0u8; BitmapsExt::LEN];
            b.write_to(&mut data);
            off = write_extension(&mut buf, off, EXT_BITMAPS, &data);
        }
        for u in &unknown {
            if off + 8 + u.data.len() + 8 > cs as usize + 4096 {
                return Err(Error::unsupported("No space left on device"));
            }
            off = write_extension(&mut buf, off, u.magic, &u.data);
        }
        off = write_extension(&mut buf, off, EXT_END, &[]);
        if !backing_name.is_empty() {
            h.backing_file_offset = off as u64;
            h.backing_file_size = backing_name.len() as u32;
            buf[off..off + backing_name.len()].copy_from_slice(&backing_name);
            off += backing_name.len();
        } else {
            h.backing_file_offset = 0;
            h.backing_file_size = 0;
        }
        if !unknown.is_empty() {
            // QEMU's layout: the header cluster holds it all, or the rewrite fails with
            // ENOSPC (qcow2_update_header); one write of the sectors it needs.
            if off > cs as usize {
                return Err(Error::unsupported("No space left on device"));
            }
            h.write_to(&mut buf);
            buf.truncate(off.div_ceil(512) * 512);
            return Ok(buf);
        }
        if off > 512 {
            return Err(Error::unsupported(format!(
                "the new header with its extensions and backing file name takes {off} bytes, more than one sector; vimg changes it only in one atomic write"
            )));
        }
        h.write_to(&mut buf);
        buf.truncate(512);
        Ok(buf)
    }

    /// `amend -o data_file=NAME`: stores another external data file name (as given; the
    /// user typed it), or with an empty `NAME` removes the name, leaving the image to be
    /// opened with the data file named on the command line, as qemu-img does
    /// (block/qcow2.c, `qcow2_amend_options`). Only images that already have an external
    /// data file take it. One write of the first sector: a crash leaves the old name or
    /// the new one.
    pub fn set_data_file(&mut self, name: &str) -> Result<()> {
        self.check_data_file_amend()?;
        self.require_consistent()?;
        let mut h = self.header.clone();
        let new = (!name.is_empty()).then_some(name);
        let sector = self.first_sector_with(&mut h, None, None, Some(new))?;
        self.pwrite(&sector, 0)?;
        self.sync()?;
        self.header = h;
        Ok(())
    }

    /// qemu-img's rule for `amend -o data_file=`: refused (before anything changes) on an
    /// image without an external data file.
    pub fn check_data_file_amend(&self) -> Result<()> {
        if !self.has_data_file {
            return Err(Error::invalid_argument(
                "data-file can only be set for images that use an external data file",
            ));
        }
        Ok(())
    }

    /// True when an active or snapshot L2 table has a zero-flagged entry.
    fn has_zero_clusters(&self) -> Result<bool> {
        self.zero_clusters_in(false)
    }

    /// True when an L2 table named by a snapshot's L1 table (and, unless
    /// `snapshots_only`, by the active one) has a zero-flagged entry.
    fn zero_clusters_in(&self, snapshots_only: bool) -> Result<bool> {
        let cs = self.cs() as usize;
        let mut l1s: Vec<(u64, u64)> = Vec::new();
        if !snapshots_only {
            l1s.push((self.header.l1_table_offset, u64::from(self.header.l1_size)));
        }
        let mut raw = vec![0u8; 16];
        // Snapshot L1 tables, from the snapshot table.
        let mut at = self.header.snapshots_offset;
        for _ in 0..self.nb_snapshots {
            let mut sh = vec![0u8; SNAPSHOT_HEADER_LEN];
            self.pread(&mut sh, at)?;
            let s = SnapshotHeader::parse(&sh)?;
            l1s.push((s.l1_table_offset, u64::from(s.l1_size)));
            at += s.entry_len();
            at = at.next_multiple_of(8);
        }
        let mut seen = std::collections::HashSet::new();
        for (off, n) in l1s {
            let mut l1 = vec![0u8; (n * 8) as usize];
            self.pread(&mut l1, off)?;
            for e in l1.chunks_exact(8) {
                let l2 = u64::from_be_bytes(e.try_into().unwrap_or([0; 8])) & L1E_OFFSET_MASK;
                if l2 == 0 || !seen.insert(l2) {
                    continue;
                }
                raw.resize(cs, 0);
                self.pread(&mut raw, l2)?;
                for w in raw.chunks_exact(8) {
                    let v = u64::from_be_bytes(w.try_into().unwrap_or([0; 8]));
                    if v & OFLAG_COMPRESSED == 0 && v & OFLAG_ZERO != 0 {
                        return Ok(true);
                    }
                }
            }
        }
        Ok(false)
    }
}

/// `amend -p` (update/amend_progress.rs counts in QEMU's units).
impl Qcow2Update {
    /// Reports `amend`'s progress to `sink` (percent, in QEMU's units: see the module
    /// documentation) from the next [`Qcow2Update::amend`] on.
    pub fn set_amend_progress(&mut self, sink: Box<dyn FnMut(f64) + Send>) {
        self.amend_progress = Some(amend_progress::AmendProgress::new(sink));
    }

    /// Tells the progress how many operations the `amend` under way reports.
    pub(super) fn progress_ops(&mut self, ops: u64) {
        if let Some(p) = &mut self.amend_progress {
            p.total_ops = ops;
        }
    }

    /// Operation `op` is at step `offset` of `work`.
    pub(super) fn progress(&mut self, op: AmendOp, offset: u64, work: u64) {
        if let Some(p) = &mut self.amend_progress {
            p.report(op, offset, work);
        }
    }

    /// The steps of a downgrade: the active L1 table's entries and every snapshot's.
    pub(super) fn downgrade_steps(&self) -> Result<u64> {
        let mut n = self.l1.len() as u64;
        if self.nb_snapshots > 0 {
            for t in self.snapshot_l1_tables()? {
                n += t.len() as u64;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod fuzz_tests;
