//! Where writers put their bytes, and the all-or-nothing rule for them.
//!
//! An [`Output`] owns every file a conversion creates. In the default atomic mode each file
//! is written as a hidden temporary in the destination's folder; [`Output::commit`] fsyncs
//! them, renames them over their final names and fsyncs the folder. Dropping an uncommitted
//! `Output` (an error, a cancel) removes the temporaries, so the destination is either
//! absent, unchanged, or complete. A destination that is a symlink to a regular file is
//! replaced by the rename; the file it pointed to is never written.
//!
//! Durability is paid for during the copy, not after it: large writes are sent to the disk
//! as soon as they are made (`sync_file_range`), and once a bounded window of them is in
//! flight the oldest is waited for and dropped from the page cache. The fsync at commit then
//! finds almost nothing left to write, and a conversion keeps at most [`WRITEBACK_WINDOW`]
//! of each output file in the page cache, not the whole output: it neither evicts the
//! machine's cache nor stalls on reclaiming it.
//!
//! That is for regular files. What the destination is decides how it is written
//! ([`check_destination`], through symlinks, before anything is created): a block device
//! is opened in place and never replaced (its size from the device, `O_DIRECT` on request,
//! zero ranges zeroed with `fallocate`/`BLKZEROOUT` so none of its old content shows
//! through); a character device or FIFO is streamed to like stdout; a directory or socket
//! is refused. A replaced regular file keeps its owner, group and mode; where it cannot be
//! replaced (unwritable folder, an owner a new file cannot be given) it is written in place
//! with a note. Temporary names carry the pid and the process's start time, so a later run
//! removes those of a process that is gone ([`remove_stale_temporaries`]). A multi-file
//! output is renamed extents first and the main file (the descriptor) last, and a failed
//! rename puts back what was replaced.
//!
//! [`OutFile`] is one output file with positional writes. It can also be a one-pass stream
//! (stdout): writes must then come in ascending order, gaps are filled with zeros, and a
//! write behind the current position is an error that says the format needs seeking.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::checksum::{hash_storage, Checksum, HashAlg, InOrderHasher};
use crate::error::{Error, ErrorKind, Result};
use crate::storage::FileStorage;

/// Temporaries of every live [`Output`], so a signal handler can remove them.
static LIVE_TEMPS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Removes every temporary file of every uncommitted [`Output`] in this process. For signal
/// handlers: call it, then exit.
pub fn remove_all_temporaries() {
    if let Ok(list) = LIVE_TEMPS.lock() {
        for p in list.iter() {
            let _ = fs::remove_file(p);
        }
    }
}

fn register_temp(p: &Path) {
    if let Ok(mut l) = LIVE_TEMPS.lock() {
        l.push(p.to_path_buf());
    }
}

fn unregister_temp(p: &Path) {
    if let Ok(mut l) = LIVE_TEMPS.lock() {
        l.retain(|x| x != p);
    }
}

enum Sink {
    File(File),
    Stream(Mutex<StreamState>),
}

struct StreamState {
    w: Box<dyn Write + Send>,
    pos: u64,
    /// Length the stream must reach at `finish`, from `set_len`.
    len: u64,
}

/// A block device written in place.
struct Device {
    /// Its size (`lseek(SEEK_END)`, what `BLKGETSIZE64` reports).
    size: u64,
    /// Its logical block size (`BLKSSZGET`): the alignment `O_DIRECT` needs.
    block: u64,
    /// Opened with `O_DIRECT` (`-t none`/`directsync`): every write goes through an aligned
    /// bounce buffer, partial blocks read-modify-written.
    direct: bool,
    /// The image's length on the device (from `set_len`; the whole device until then):
    /// what a checksum covers.
    image_len: AtomicU64,
    /// Serialises read-modify-write of partial blocks.
    rmw: Mutex<()>,
    /// Set once a zeroing `fallocate` mode or `BLKZEROOUT` turned out unsupported.
    no_punch: AtomicBool,
    no_zero_range: AtomicBool,
    no_zeroout: AtomicBool,
}

/// How far a destination written in place (a device, a stream, `-n`) got: bytes written and
/// the end of the furthest write. Shared with the caller, who reports it on error or signal.
#[derive(Debug, Default)]
pub struct WriteCounter {
    /// Bytes written (data and zeros).
    pub bytes: AtomicU64,
    /// The end of the furthest write.
    pub high: AtomicU64,
}

impl WriteCounter {
    fn add(&self, offset: u64, len: u64) {
        self.bytes.fetch_add(len, Ordering::Relaxed);
        self.high.fetch_max(offset + len, Ordering::Relaxed);
    }
}

/// One output file: positional writes through `&self`, shareable between threads.
#[derive(Clone)]
pub struct OutFile {
    sink: Arc<Sink>,
    /// Set for a block device written in place.
    dev: Option<Arc<Device>>,
    /// Counts what reaches a destination written in place.
    counter: Option<Arc<WriteCounter>>,
    name: Arc<str>,
    /// Hashes the bytes while they are written in order (the main file, when a checksum
    /// was asked for).
    hash: Option<Arc<Mutex<InOrderHasher>>>,
    /// Writeback bookkeeping (files only).
    wb: Arc<Writeback>,
}

/// Writes of at least this many bytes are sent to the disk at once and tracked in the
/// writeback window; smaller ones (metadata, compressed clusters) are sent in batches of
/// [`WRITEBACK_BATCH`] bytes.
pub const WRITEBACK_LARGE: u64 = 1 << 20;

/// Bytes of large writes that may be in flight (written, being written back) per file before
/// the oldest is waited for and dropped from the page cache. Measured on the issue 6
/// workload (768 MiB of new data, raw->raw): with no early writeback the fsync at commit
/// took 0.4 s on its own (1.0 s median in all); starting writeback early without a window
/// gave 0.4 s when the page cache had free room and 0.9-2.0 s when the kernel had to reclaim
/// first; a 32 MiB window gave 0.45-0.48 s either way. With fallocate and mapped reads in
/// place, 7 alternating runs each (qcow2->raw / raw->qcow2 / raw->raw): 8 MiB 0.43 s,
/// 32 MiB 0.40 / 0.44 / 0.42 s, 64 MiB 0.39 s, 128 MiB 0.37 / 0.39 / 0.41 s.
pub const WRITEBACK_WINDOW: u64 = 128 << 20;

/// Small writes are sent to the disk (without waiting) every this many bytes.
pub const WRITEBACK_BATCH: u64 = 8 << 20;

/// Early writeback of one output file.
#[derive(Default)]
struct Writeback {
    /// Large writes sent to the disk and not yet waited for, oldest first, and their total.
    window: Mutex<(VecDeque<(u64, u64)>, u64)>,
    /// Bytes of small writes since the last batch was sent.
    small: AtomicU64,
    /// Set when the file does not support `sync_file_range`: the fsync does it all then.
    off: AtomicBool,
    /// Set when the file does not support `fallocate`.
    no_falloc: AtomicBool,
    /// Set for outputs made with [`Output::with_sync`]`(false)`: no fsync at all.
    no_sync: AtomicBool,
}

impl std::fmt::Debug for OutFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutFile").field("name", &self.name).finish()
    }
}

static ZEROS: [u8; 65536] = [0u8; 65536];

impl OutFile {
    /// A regular file.
    pub fn from_file(file: File, name: &str) -> OutFile {
        OutFile {
            sink: Arc::new(Sink::File(file)),
            dev: None,
            counter: None,
            name: name.into(),
            hash: None,
            wb: Arc::default(),
        }
    }

    /// A one-pass stream (e.g. stdout).
    pub fn stream(w: Box<dyn Write + Send>, name: &str) -> OutFile {
        OutFile {
            sink: Arc::new(Sink::Stream(Mutex::new(StreamState { w, pos: 0, len: 0 }))),
            dev: None,
            counter: None,
            name: name.into(),
            hash: None,
            wb: Arc::default(),
        }
    }

    /// True for a one-pass stream.
    pub fn is_stream(&self) -> bool {
        matches!(*self.sink, Sink::Stream(_))
    }

    /// True for a block device written in place.
    pub fn is_device(&self) -> bool {
        self.dev.is_some()
    }

    /// The final name of this file (for messages).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The underlying file, when this is one.
    pub fn file(&self) -> Option<&File> {
        match &*self.sink {
            Sink::File(f) => Some(f),
            Sink::Stream(_) => None,
        }
    }

    /// The same file, with its bytes hashed as they are written in order.
    pub fn hashed(mut self, alg: HashAlg) -> OutFile {
        self.hash = Some(Arc::new(Mutex::new(InOrderHasher::new(alg))));
        self
    }

    /// True when this file's bytes are hashed as they are written: a writer that can write
    /// in ascending order should then (see [`InOrderHasher`]), so that the hash runs beside
    /// the copy and the finished file is not read again.
    pub fn is_hashed(&self) -> bool {
        self.hash.is_some()
    }

    fn hash_with(&self, f: impl FnOnce(&mut InOrderHasher)) {
        if let Some(h) = &self.hash {
            if let Ok(mut h) = h.lock() {
                f(&mut h);
            }
        }
    }

    /// The checksum of the finished file (call after [`OutFile::sync`]): from the in-order
    /// hash when every write came in order, else by reading the file once. `None` when no
    /// checksum was asked for.
    pub fn checksum(&self) -> Result<Option<Checksum>> {
        let Some(h) = &self.hash else {
            return Ok(None);
        };
        let len = self.len()?;
        let (alg, inline) = {
            let mut g = h
                .lock()
                .map_err(|_| Error::msg(ErrorKind::Io, "hash lock poisoned"))?;
            let alg = g.alg();
            (
                alg,
                std::mem::replace(&mut *g, InOrderHasher::new(alg)).finish(len),
            )
        };
        if let Some(c) = inline {
            return Ok(Some(c));
        }
        match &*self.sink {
            Sink::File(f) => {
                let copy = f
                    .try_clone()
                    .map_err(|e| self.err("reopen for the checksum", 0, e))?;
                let s = FileStorage::from_file(copy, &*self.name)
                    .map_err(|e| self.err("stat for the checksum", 0, e))?;
                hash_storage(&s, alg).map(Some)
            }
            Sink::Stream(_) => Err(Error::msg(
                ErrorKind::Io,
                "the stream was not written in order, so its checksum is unknown",
            )),
        }
    }

    fn err(&self, what: &str, off: u64, e: io::Error) -> Error {
        Error::io(format_args!("{what} '{}' at {off:#x}", self.name), e)
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if let Some(c) = &self.counter {
            c.add(offset, buf.len() as u64);
        }
        match &*self.sink {
            Sink::File(f) => {
                if let Some(d) = &self.dev {
                    let end = offset.checked_add(buf.len() as u64);
                    if end.is_none_or(|e| e > d.size) {
                        return Err(Error::invalid_argument(format!(
                            "write at {offset:#x} past the end of device '{}' ({} bytes)",
                            self.name, d.size
                        )));
                    }
                    if d.direct {
                        direct_write(f, d, buf, offset)
                            .map_err(|e| self.err("write", offset, e))?;
                        self.hash_with(|h| h.write(offset, buf));
                        return Ok(());
                    }
                } else {
                    self.reserve(f, offset, buf.len() as u64);
                }
                f.write_all_at(buf, offset)
                    .map_err(|e| self.err("write", offset, e))?;
                self.hash_with(|h| h.write(offset, buf));
                self.write_back(f, offset, buf.len() as u64)
            }
            Sink::Stream(s) => {
                let mut s = s
                    .lock()
                    .map_err(|_| Error::msg(ErrorKind::Io, "stream lock poisoned"))?;
                if offset < s.pos {
                    return Err(Error::unsupported(format!(
                        "this output format needs to seek back (to {offset:#x}) and cannot be written to a stream"
                    )));
                }
                while s.pos < offset {
                    let n = (offset - s.pos).min(ZEROS.len() as u64) as usize;
                    let pos = s.pos;
                    // Not hashed: the hash takes the gap before the next write as zeros.
                    s.w.write_all(&ZEROS[..n])
                        .map_err(|e| self.err("write", pos, e))?;
                    s.pos += n as u64;
                }
                s.w.write_all(buf)
                    .map_err(|e| self.err("write", offset, e))?;
                self.hash_with(|h| h.write(offset, buf));
                s.pos += buf.len() as u64;
                Ok(())
            }
        }
    }

    /// Starts writeback of what was just written at `offset`, and for large writes waits for
    /// (and drops from the page cache) the oldest ones once more than [`WRITEBACK_WINDOW`]
    /// bytes are in flight. Errors of the writes waited for are returned here: once waited
    /// for, the kernel does not report them again to the fsync.
    fn write_back(&self, f: &File, offset: u64, len: u64) -> Result<()> {
        let wb = &*self.wb;
        if wb.off.load(Ordering::Relaxed) {
            return Ok(());
        }
        let fd = f.as_raw_fd();
        if len < WRITEBACK_LARGE {
            let before = wb.small.fetch_add(len, Ordering::Relaxed);
            if before + len >= WRITEBACK_BATCH {
                wb.small.store(0, Ordering::Relaxed);
                // The whole file's dirty pages; pages already under writeback are skipped.
                self.sync_range(fd, 0, 0, libc::SYNC_FILE_RANGE_WRITE)?;
            }
            return Ok(());
        }
        // Only the whole pages of the write: a page it shares with a neighbouring write
        // (formats whose data does not start on a page, as VDI's and VHD's) would be written
        // twice, and the neighbour's write would wait for it. The commit fsync covers them.
        const PAGE: u64 = 4096;
        let first = offset.div_ceil(PAGE) * PAGE;
        let end = (offset + len) / PAGE * PAGE;
        if end <= first {
            return Ok(());
        }
        let (offset, len) = (first, end - first);
        self.sync_range(fd, offset, len, libc::SYNC_FILE_RANGE_WRITE)?;
        let mut old = Vec::new();
        {
            let mut w = wb
                .window
                .lock()
                .map_err(|_| Error::msg(ErrorKind::Io, "writeback lock poisoned"))?;
            w.0.push_back((offset, len));
            w.1 += len;
            while w.1 > WRITEBACK_WINDOW {
                let Some(r) = w.0.pop_front() else { break };
                w.1 -= r.1;
                old.push(r);
            }
        }
        for (o, n) in old {
            self.sync_range(
                fd,
                o,
                n,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            )?;
            // Clean now: the page cache need not keep them (a hint; failure is harmless).
            // SAFETY: a plain syscall on a descriptor this OutFile owns; no memory is passed.
            unsafe {
                libc::posix_fadvise(fd, o as i64, n as i64, libc::POSIX_FADV_DONTNEED);
            }
        }
        Ok(())
    }

    /// Allocates the blocks of a large write before it is made (`fallocate`, size kept).
    /// The write covers them all, so the file ends up the same; but ext4 then neither
    /// reserves delayed-allocation space page by page during the write nor allocates blocks
    /// during writeback: raw->raw 0.42 -> 0.36 s wall, 0.40 -> 0.34 s CPU (9 alternating
    /// runs). A hint only: a filesystem without `fallocate` just writes.
    ///
    /// Only for outputs that are synced: without the early writeback and the fsync (qemu-img's
    /// default, `-t unsafe`) the blocks are allocated by the kernel's flusher after vimg has
    /// exited, off the clock, while each `fallocate` here is a journal transaction made
    /// while the user waits. Back to back on a machine whose disk was busy with other
    /// writers (the issue 16 workload, raw->qcow2 with `-t unsafe`), `strace -c` showed 694
    /// `fallocate` calls taking 0.44 s of a 0.6 s run.
    fn reserve(&self, f: &File, offset: u64, len: u64) {
        if len < WRITEBACK_LARGE
            || self.wb.no_falloc.load(Ordering::Relaxed)
            || self.wb.no_sync.load(Ordering::Relaxed)
        {
            return;
        }
        let (Ok(o), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return;
        };
        // SAFETY: a plain syscall on a descriptor this OutFile owns; no memory is passed.
        if unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, o, n) } != 0 {
            let e = io::Error::last_os_error();
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP)
                    | Some(libc::ENODEV)
                    | Some(libc::EINVAL)
                    | Some(libc::ENOSYS)
            ) {
                self.wb.no_falloc.store(true, Ordering::Relaxed);
            }
        }
    }

    /// `sync_file_range`; turns early writeback off for a file that does not support it.
    fn sync_range(&self, fd: i32, offset: u64, len: u64, flags: libc::c_uint) -> Result<()> {
        let (Ok(o), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Ok(());
        };
        // SAFETY: a plain syscall on a descriptor this OutFile owns; no memory is passed.
        if unsafe { libc::sync_file_range(fd, o, n, flags) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINVAL)
            | Some(libc::ESPIPE)
            | Some(libc::EOPNOTSUPP)
            | Some(libc::ENOSYS) => {
                self.wb.off.store(true, Ordering::Relaxed);
                Ok(())
            }
            _ => Err(self.err("write back", offset, e)),
        }
    }

    /// Sets the file length (extends with a hole or truncates). On a stream, records the
    /// length to pad to at [`OutFile::sync`].
    pub fn set_len(&self, len: u64) -> Result<()> {
        if let Some(d) = &self.dev {
            // A device keeps its size: an image that fits is written into its start.
            if len > d.size {
                return Err(Error::invalid_argument("Cannot grow device files"));
            }
            d.image_len.store(len, Ordering::Relaxed);
            self.hash_with(|h| h.set_len(len));
            return Ok(());
        }
        match &*self.sink {
            Sink::File(f) => {
                f.set_len(len).map_err(|e| self.err("resize", len, e))?;
                self.hash_with(|h| h.set_len(len));
                Ok(())
            }
            Sink::Stream(s) => {
                let mut s = s
                    .lock()
                    .map_err(|_| Error::msg(ErrorKind::Io, "stream lock poisoned"))?;
                if len < s.pos {
                    return Err(Error::unsupported(
                        "this output format needs to truncate and cannot be written to a stream",
                    ));
                }
                s.len = len;
                Ok(())
            }
        }
    }

    /// Current length (for a stream: bytes written so far).
    pub fn len(&self) -> Result<u64> {
        match &*self.sink {
            Sink::File(_) if self.dev.is_some() => Ok(self.dev.as_ref().map_or(0, |d| d.size)),
            Sink::File(f) => f
                .metadata()
                .map(|m| m.len())
                .map_err(|e| self.err("stat", 0, e)),
            Sink::Stream(s) => Ok(s
                .lock()
                .map_err(|_| Error::msg(ErrorKind::Io, "stream lock poisoned"))?
                .pos),
        }
    }

    /// True when the output holds no bytes.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Reserves blocks for `[offset, offset + len)` (`fallocate`), extending the file.
    pub fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        let Sink::File(f) = &*self.sink else {
            return Ok(());
        };
        if self.dev.is_some() {
            // A device's blocks exist already.
            return Ok(());
        }
        // SAFETY: a plain syscall on a descriptor this OutFile owns; no memory is passed.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, offset as i64, len as i64) };
        if r != 0 {
            return Err(self.err("allocate", offset, io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Makes `[offset, offset + len)` read as zeros, freeing blocks where the filesystem can
    /// (hole punch), else writing zeros.
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        if let (Sink::File(f), Some(d)) = (&*self.sink, &self.dev) {
            return self.zero_device(f, d, offset, len);
        }
        if let Sink::File(f) = &*self.sink {
            // SAFETY: a plain syscall on a descriptor this OutFile owns; no memory is passed.
            let r = unsafe {
                libc::fallocate(
                    f.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset as i64,
                    len as i64,
                )
            };
            if r == 0 {
                self.hash_with(|h| h.zeroed(offset, len));
                return Ok(());
            }
        }
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(ZEROS.len() as u64) as usize;
            self.write_all_at(&ZEROS[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Zeroes `[offset, offset + len)` of a block device so that it reads as zeros: the
    /// whole blocks with `fallocate(PUNCH_HOLE)` (what qemu-img issues; the kernel
    /// guarantees zeros or refuses), else `fallocate(ZERO_RANGE)`, else `BLKZEROOUT`, else by
    /// writing zeros; partial blocks at the edges by writing zeros.
    fn zero_device(&self, f: &File, d: &Device, offset: u64, len: u64) -> Result<()> {
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= d.size)
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "zeroing at {offset:#x} past the end of device '{}'",
                    self.name
                ))
            })?;
        let a = d.block.max(512);
        let first = offset.div_ceil(a) * a;
        let last = end / a * a;
        let mut done = false;
        if first < last {
            let (o, n) = (first as i64, (last - first) as i64);
            let fd = f.as_raw_fd();
            let unsupported = |e: &io::Error| {
                matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP)
                        | Some(libc::EINVAL)
                        | Some(libc::ENOSYS)
                        | Some(libc::ENOTTY)
                )
            };
            for (flag, mode) in [
                (
                    &d.no_punch,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                ),
                (
                    &d.no_zero_range,
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                ),
            ] {
                if done || flag.load(Ordering::Relaxed) {
                    continue;
                }
                // SAFETY: a plain syscall on a descriptor this OutFile owns; no memory is passed.
                if unsafe { libc::fallocate(fd, mode, o, n) } == 0 {
                    done = true;
                } else {
                    let e = io::Error::last_os_error();
                    if !unsupported(&e) {
                        return Err(self.err("zero", first, e));
                    }
                    flag.store(true, Ordering::Relaxed);
                }
            }
            if !done && !d.no_zeroout.load(Ordering::Relaxed) {
                let range: [u64; 2] = [first, last - first];
                // SAFETY: BLKZEROOUT reads two u64 (start, length) from the pointer, which
                // points at a live array of two u64.
                if unsafe { libc::ioctl(fd, BLKZEROOUT as _, range.as_ptr()) } == 0 {
                    done = true;
                } else {
                    let e = io::Error::last_os_error();
                    if !unsupported(&e) {
                        return Err(self.err("zero", first, e));
                    }
                    d.no_zeroout.store(true, Ordering::Relaxed);
                }
            }
        }
        let write_zeros = |from: u64, to: u64| -> Result<()> {
            let mut pos = from;
            while pos < to {
                let n = (to - pos).min(ZEROS.len() as u64) as usize;
                self.write_all_at(&ZEROS[..n], pos)?;
                pos += n as u64;
            }
            Ok(())
        };
        if done {
            if let Some(c) = &self.counter {
                c.add(first, last - first);
            }
            self.hash_with(|h| h.zeroed(first, last - first));
            write_zeros(offset, first.min(end))?;
            write_zeros(last.max(first).max(offset), end)
        } else {
            write_zeros(offset, end)
        }
    }

    /// Flushes data to stable storage (files) or pads and flushes a stream.
    pub fn sync(&self) -> Result<()> {
        match &*self.sink {
            Sink::File(_) if self.wb.no_sync.load(Ordering::Relaxed) => Ok(()),
            Sink::File(f) => f.sync_all().map_err(|e| self.err("fsync", 0, e)),
            Sink::Stream(s) => {
                let mut s = s
                    .lock()
                    .map_err(|_| Error::msg(ErrorKind::Io, "stream lock poisoned"))?;
                while s.pos < s.len {
                    let n = (s.len - s.pos).min(ZEROS.len() as u64) as usize;
                    let pos = s.pos;
                    // Not hashed: the hash takes the gap before the next write as zeros.
                    s.w.write_all(&ZEROS[..n])
                        .map_err(|e| self.err("write", pos, e))?;
                    s.pos += n as u64;
                }
                s.w.flush().map_err(|e| self.err("flush", 0, e))
            }
        }
    }
}

/// `BLKZEROOUT`: `_IO(0x12, 127)`, zero a byte range of a block device.
const BLKZEROOUT: libc::c_ulong = 0x127f;
/// `BLKSSZGET`: `_IO(0x12, 104)`, the logical block size of a block device.
const BLKSSZGET: libc::c_ulong = 0x1268;

/// Alignment of `O_DIRECT` bounce buffers: a page, which satisfies every device's memory
/// alignment.
const DIRECT_ALIGN: usize = 4096;
/// Bytes one `O_DIRECT` write moves at most.
const DIRECT_CHUNK: u64 = 1 << 20;

/// A zeroed buffer of `len` bytes whose start is `DIRECT_ALIGN`-aligned: the backing
/// vector and the offset of the aligned start in it.
fn aligned_buf(len: usize) -> (Vec<u8>, usize) {
    let v = vec![0u8; len + DIRECT_ALIGN];
    let skip = v.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
    (v, skip)
}

/// Writes `buf` at `offset` of a device opened with `O_DIRECT`: whole aligned blocks
/// through an aligned bounce buffer; a block the write covers only in part is read first
/// and patched (under the device's lock, so two partial writes of one block cannot race).
fn direct_write(f: &File, d: &Device, buf: &[u8], offset: u64) -> io::Result<()> {
    let a = d.block.max(512);
    let end = offset + buf.len() as u64;
    let mut start = offset / a * a;
    let full_end = end.div_ceil(a) * a;
    let chunk = DIRECT_CHUNK.max(a) / a * a;
    let (mut v, skip) = aligned_buf(chunk.min(full_end - start) as usize);
    while start < full_end {
        let stop = (start + chunk).min(full_end);
        let n = (stop - start) as usize;
        let bounce = &mut v[skip..skip + n];
        let partial = start < offset || stop > end;
        let _guard = if partial {
            Some(
                d.rmw
                    .lock()
                    .map_err(|_| io::Error::other("device lock poisoned"))?,
            )
        } else {
            None
        };
        if start < offset {
            f.read_exact_at(&mut bounce[..a as usize], start)?;
        }
        if stop > end && (stop - a >= start + a || start >= offset) {
            let at = n - a as usize;
            f.read_exact_at(&mut bounce[at..], stop - a)?;
        }
        let from = start.max(offset);
        let to = stop.min(end);
        bounce[(from - start) as usize..(to - start) as usize]
            .copy_from_slice(&buf[(from - offset) as usize..(to - offset) as usize]);
        f.write_all_at(bounce, start)?;
        start = stop;
    }
    Ok(())
}

/// A stream that holds back what is written until [`Held::release`]: bytes a writer puts
/// out while it is being set up (a header) reach stdout only once the conversion is known
/// to be possible, so a refusal leaves stdout untouched.
struct HoldWriter {
    state: Arc<Mutex<Held>>,
}

/// The shared state of a [`HoldWriter`].
struct Held {
    inner: Box<dyn Write + Send>,
    /// `Some` while holding back.
    buf: Option<Vec<u8>>,
}

/// Bytes a held stream may buffer before it must have been released.
const MAX_HELD: usize = 16 << 20;

impl Held {
    fn release(&mut self) -> io::Result<()> {
        if let Some(b) = self.buf.take() {
            self.inner.write_all(&b)?;
        }
        Ok(())
    }
}

impl Write for HoldWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut st = self
            .state
            .lock()
            .map_err(|_| io::Error::other("stream lock poisoned"))?;
        match &mut st.buf {
            Some(b) if b.len() + data.len() <= MAX_HELD => {
                b.extend_from_slice(data);
                Ok(data.len())
            }
            Some(_) => Err(io::Error::other(
                "the output stream was not released before the writer sent data",
            )),
            None => st.inner.write(data),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut st = self
            .state
            .lock()
            .map_err(|_| io::Error::other("stream lock poisoned"))?;
        if st.buf.is_some() {
            return Ok(());
        }
        st.inner.flush()
    }
}

/// How an [`Output`] treats existing files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum OutputMode {
    /// Write temporaries, rename over the destination at commit (the default).
    Atomic,
    /// Write into the existing destination in place (`convert -n`).
    InPlace,
    /// Write the main file to stdout; no other files may be created.
    Stdout,
}

/// What a destination is, looked at through symlinks before anything is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestKind {
    /// Nothing there yet (or a dangling symlink): created as a new file.
    Missing,
    /// A regular file: replaced by temporary file and rename, keeping owner, group and mode.
    Regular,
    /// A block device: written in place, never replaced.
    BlockDevice,
    /// A character device (`/dev/null`): streamed to in place, like stdout.
    CharDevice,
    /// A FIFO: streamed to in place, like stdout.
    Fifo,
    /// A socket: refused.
    Socket,
    /// A directory: refused.
    Directory,
}

impl DestKind {
    /// True for destinations written in place as a one-pass stream.
    pub fn is_stream(self) -> bool {
        matches!(self, DestKind::CharDevice | DestKind::Fifo)
    }

    /// True for destinations that are written in place, never replaced.
    pub fn is_special(self) -> bool {
        matches!(
            self,
            DestKind::BlockDevice | DestKind::CharDevice | DestKind::Fifo
        )
    }
}

/// Looks at what `path` is (following symlinks, so `/dev/disk/by-path/...` and
/// `/dev/stdout` are judged by what they point at) and refuses the kinds no image can be
/// written to: directories and sockets. Nothing is created.
pub fn check_destination(path: &Path) -> Result<DestKind> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(DestKind::Missing),
        Err(e) => {
            return Err(Error::io(
                format_args!("look at the destination '{}'", path.display()),
                e,
            ))
        }
    };
    let t = meta.file_type();
    let kind = if t.is_file() {
        DestKind::Regular
    } else if t.is_block_device() {
        DestKind::BlockDevice
    } else if t.is_char_device() {
        DestKind::CharDevice
    } else if t.is_fifo() {
        DestKind::Fifo
    } else if t.is_socket() {
        DestKind::Socket
    } else {
        DestKind::Directory
    };
    match kind {
        DestKind::Directory => Err(Error::invalid_argument(format!(
            "Could not create '{}': Is a directory",
            path.display()
        ))),
        DestKind::Socket => Err(Error::unsupported(format!(
            "Destination '{}' is a socket; images are written to files, block devices, character devices and FIFOs",
            path.display()
        ))),
        k => Ok(k),
    }
}

/// True when `path`, or a symlink on the way to what it names, is an open descriptor's
/// name (`/dev/stdout`, `/dev/fd/N`, `/proc/self/fd/N`).
fn is_fd_path(path: &Path) -> bool {
    let mut p = path.to_path_buf();
    for _ in 0..40 {
        let s = p.to_string_lossy();
        if s.starts_with("/dev/fd/")
            || matches!(&*s, "/dev/stdout" | "/dev/stderr")
            || (s.starts_with("/proc/") && s.contains("/fd/"))
        {
            return true;
        }
        match fs::read_link(&p) {
            Ok(t) if t.is_absolute() => p = t,
            Ok(t) => p = p.parent().map(|d| d.join(&t)).unwrap_or(t),
            Err(_) => return false,
        }
    }
    false
}

/// The size of a block device open as `f` (what `BLKGETSIZE64` reports; `lseek` to the
/// end gives the same for every block device) and its logical block size.
pub fn device_geometry(f: &File) -> io::Result<(u64, u64)> {
    use std::io::Seek;
    let mut g = f;
    let size = g.seek(io::SeekFrom::End(0))?;
    g.seek(io::SeekFrom::Start(0))?;
    let mut block: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at a live int.
    let r = unsafe {
        libc::ioctl(
            f.as_raw_fd(),
            BLKSSZGET as _,
            &mut block as *mut libc::c_int,
        )
    };
    let block = if r == 0 && block >= 512 && (block as u64).is_power_of_two() {
        block as u64
    } else {
        512
    };
    Ok((size, block))
}

/// The start time of process `pid` (clock ticks since boot, field 22 of
/// `/proc/PID/stat`): with the pid, what names a process uniquely over time.
fn process_start(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain anything.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// This process's (pid, start time).
fn this_process() -> (u32, u64) {
    let pid = std::process::id();
    (pid, process_start(pid).unwrap_or(0))
}

/// The longest file name the filesystems vimg writes to accept.
const NAME_MAX: usize = 255;

/// The part of every temporary name of destination `base` before the process tag:
/// `.BASE.vimg-`, with BASE shortened (and marked with a hash of the whole name) when the
/// full name would not leave room for the tag within [`NAME_MAX`].
fn temp_prefix(base: &[u8]) -> Vec<u8> {
    // ".vimg-" + pid (10) + "-" + start (20) + "-" + tag (up to 5) + ".tmp"
    const TAG_ROOM: usize = 6 + 10 + 1 + 20 + 1 + 5 + 4;
    let room = NAME_MAX - 1 - TAG_ROOM;
    let mut p = vec![b'.'];
    if base.len() <= room {
        p.extend_from_slice(base);
    } else {
        let h = crc32fast::hash(base);
        let keep = room - 9;
        p.extend_from_slice(&base[..keep]);
        p.extend_from_slice(format!("~{h:08x}").as_bytes());
    }
    p.extend_from_slice(b".vimg-");
    p
}

/// The temporary name of `final_path` for this process with `tag` (an attempt number or
/// `old` for the backup of an existing file).
fn temp_path_for(final_path: &Path, tag: &str) -> PathBuf {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let folder = match final_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let base = final_path.file_name().map(|b| b.as_bytes()).unwrap_or(b"");
    let (pid, start) = this_process();
    let mut name = temp_prefix(base);
    name.extend_from_slice(format!("{pid}-{start}-{tag}.tmp").as_bytes());
    let _ = std::ffi::OsStr::from_bytes(&name);
    folder.join(std::ffi::OsString::from_vec(name))
}

/// Removes temporaries of `final_path` that earlier runs left behind (killed with SIGKILL,
/// or the machine went down): names vimg made for this destination whose process is gone
/// (no such pid, or a pid reused by a process that started at another time). Returns how
/// many were removed.
pub fn remove_stale_temporaries(final_path: &Path) -> usize {
    use std::os::unix::ffi::OsStrExt;
    let folder = match final_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let base = final_path.file_name().map(|b| b.as_bytes()).unwrap_or(b"");
    let prefix = temp_prefix(base);
    let Ok(dir) = fs::read_dir(&folder) else {
        return 0;
    };
    let mut removed = 0;
    for ent in dir.flatten() {
        let name = ent.file_name();
        let b = name.as_bytes();
        let Some(rest) = b.strip_prefix(prefix.as_slice()) else {
            continue;
        };
        let Some(rest) = rest.strip_suffix(b".tmp") else {
            continue;
        };
        let Ok(rest) = std::str::from_utf8(rest) else {
            continue;
        };
        let mut parts = rest.splitn(3, '-');
        let (Some(pid), Some(start), Some(_tag)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else {
            continue;
        };
        if process_start(pid) == Some(start) {
            continue; // alive (this process or another run): not ours to touch
        }
        let is_file = ent.file_type().map(|t| t.is_file()).unwrap_or(false);
        if is_file && fs::remove_file(ent.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

struct Entry {
    final_path: PathBuf,
    temp_path: Option<PathBuf>,
    file: OutFile,
}

/// The set of files one conversion writes. See the module docs for the guarantees.
pub struct Output {
    main: PathBuf,
    mode: OutputMode,
    entries: Mutex<Vec<Entry>>,
    committed: bool,
    checksum: Option<HashAlg>,
    stdout: Option<Mutex<Option<Box<dyn Write + Send>>>>,
    /// The held stdout stream, once created.
    held: Mutex<Option<Arc<Mutex<Held>>>>,
    /// Files no output file may be (the conversion's source files), with their names.
    protected: Vec<((u64, u64), String)>,
    /// Make the files and their renames durable at commit (the default).
    sync: bool,
    /// Open a block device destination with `O_DIRECT`.
    direct: bool,
    /// Zero a block device destination whole before the writer gets it.
    zero_device: bool,
    /// Counts what reaches a destination written in place.
    counter: Option<Arc<WriteCounter>>,
    /// Things the user should know about how the destination was written.
    notes: Mutex<Vec<String>>,
    /// Runs before a file is opened to be written in place (see
    /// [`Output::with_before_in_place`]).
    before_in_place: Option<BeforeInPlace>,
}

/// A check run before anything is opened to be written in place; an error stops the output.
pub type BeforeInPlace = Box<dyn Fn() -> Result<()> + Send + Sync>;

impl Output {
    /// An atomic output whose main file will be `dst`.
    pub fn new(dst: impl AsRef<Path>) -> Output {
        Output::with_mode(dst, OutputMode::Atomic)
    }

    /// An output with an explicit mode.
    pub fn with_mode(dst: impl AsRef<Path>, mode: OutputMode) -> Output {
        Output {
            main: dst.as_ref().to_path_buf(),
            mode,
            entries: Mutex::new(Vec::new()),
            committed: false,
            checksum: None,
            stdout: None,
            held: Mutex::new(None),
            protected: Vec::new(),
            sync: true,
            direct: false,
            zero_device: false,
            counter: None,
            notes: Mutex::new(Vec::new()),
            before_in_place: None,
        }
    }

    /// Runs `check` before any file of this output is opened to be written in place (a
    /// device, a FIFO, `-n`, `/dev/stdout` redirected to a file, the in-place fallback of a
    /// file whose folder is not writable), before it is truncated or a byte reaches it: an
    /// error leaves that file as it was. Temporary files are not checked; their caller
    /// checks before it commits. Convert settles a source's deferred checks here.
    pub fn with_before_in_place(mut self, check: BeforeInPlace) -> Output {
        self.before_in_place = Some(check);
        self
    }

    fn check_before_in_place(&self) -> Result<()> {
        match &self.before_in_place {
            Some(check) => check(),
            None => Ok(()),
        }
    }

    /// Zeroes a block device destination whole (`fallocate`/`BLKZEROOUT`, else writes)
    /// before the writer gets it, so that it reads as zeros as a new file does: what every
    /// format but raw assumes of a file it creates. Raw needs no such pass (the copy engine
    /// zeroes each zero range itself).
    pub fn with_zeroed_device(mut self, zero: bool) -> Output {
        self.zero_device = zero;
        self
    }

    /// Opens a block device destination with `O_DIRECT` (qemu-img's `-t none` and
    /// `-t directsync`): writes bypass the page cache, through aligned bounce buffers.
    pub fn with_direct(mut self, direct: bool) -> Output {
        self.direct = direct;
        self
    }

    /// Counts bytes written to a destination written in place (block devices, character
    /// devices, FIFOs, `-n`, the in-place fallback), so a caller can say how far a failed
    /// or interrupted run got.
    pub fn with_counter(mut self, counter: Arc<WriteCounter>) -> Output {
        self.counter = Some(counter);
        self
    }

    /// True when every file created so far is a temporary file, renamed into place only at
    /// commit (no in-place fallback, device or stream).
    pub fn all_temporary(&self) -> bool {
        self.entries
            .lock()
            .map(|v| v.iter().all(|e| e.temp_path.is_some()))
            .unwrap_or(false)
    }

    /// Notes on how the destination was written (an in-place fallback, hard links),
    /// for the user.
    pub fn notes(&self) -> Vec<String> {
        self.notes.lock().map(|n| n.clone()).unwrap_or_default()
    }

    fn note(&self, n: String) {
        if let Ok(mut v) = self.notes.lock() {
            v.push(n);
        }
    }

    /// With `false`, [`Output::commit`] neither fsyncs the files nor their folder, no early
    /// writeback is started and no blocks are reserved ahead of the writes: what qemu-img's
    /// `-t unsafe` cache mode (its `convert` default, and so the `vimg convert` default)
    /// does. The output still appears all at once and a failed conversion still
    /// leaves nothing behind, but after an operating-system crash or power loss the
    /// destination may be missing, empty or incomplete. For scratch files that are read
    /// again at once; the default (`true`) is durable.
    pub fn with_sync(mut self, sync: bool) -> Output {
        self.sync = sync;
        self
    }

    /// Refuses to create any output file (the main file or a sibling such as a VMDK
    /// extent) whose final name is, through symlinks and hard links, one of these files:
    /// `(device, inode)` and a name for messages. [`crate::convert`] passes the source's
    /// files, so no output file can be renamed over a file the conversion reads.
    pub fn with_protected(mut self, files: Vec<((u64, u64), String)>) -> Output {
        self.protected = files;
        self
    }

    /// In [`OutputMode::Stdout`], lets the bytes written so far (and from now on) through to
    /// the stream. Until then they are held back, so that a conversion refused after the
    /// writer was created (a format that needs to seek) writes nothing. [`Output::commit`]
    /// releases too.
    pub fn release_stream(&self) -> Result<()> {
        let held = self
            .held
            .lock()
            .map_err(|_| Error::msg(ErrorKind::Io, "output lock poisoned"))?
            .clone();
        if let Some(h) = held {
            h.lock()
                .map_err(|_| Error::msg(ErrorKind::Io, "stream lock poisoned"))?
                .release()
                .map_err(|e| Error::io("write to stdout", e))?;
        }
        Ok(())
    }

    /// Asks for a checksum of the main file, which [`Output::commit_and_hash`] returns: hashed
    /// while writing when the writes come in file order, else by one read at commit.
    pub fn with_checksum(mut self, alg: Option<HashAlg>) -> Output {
        self.checksum = alg;
        self
    }

    /// In [`OutputMode::Stdout`], writes the main file to `w` instead of the process's
    /// stdout (for library callers and tests that stream into a pipe or a buffer).
    pub fn with_stream(mut self, w: Box<dyn Write + Send>) -> Output {
        self.stdout = Some(Mutex::new(Some(w)));
        self
    }

    /// The main file's final path.
    pub fn main_path(&self) -> &Path {
        &self.main
    }

    /// The temporary file the main file is written as until commit (None once committed,
    /// or when it is written in place).
    pub fn main_temp_path(&self) -> Option<PathBuf> {
        let v = self.entries.lock().ok()?;
        v.iter()
            .find(|e| e.final_path == self.main)
            .and_then(|e| e.temp_path.clone())
    }

    /// The mode.
    pub fn mode(&self) -> OutputMode {
        self.mode
    }

    /// The folder the output files go into.
    pub fn folder(&self) -> PathBuf {
        match self.main.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    /// Creates (or, in place, opens) the main file.
    pub fn create_main(&self) -> Result<OutFile> {
        let main = self.main.clone();
        self.create_path(main)
    }

    /// Creates a further file next to the main file, named `file_name` (no folders).
    pub fn create_sibling(&self, file_name: &str) -> Result<OutFile> {
        if file_name.contains('/') || file_name.is_empty() || file_name == "." || file_name == ".."
        {
            return Err(Error::invalid_argument(format!(
                "invalid output file name '{file_name}'"
            )));
        }
        if self.mode == OutputMode::Stdout {
            return Err(Error::unsupported(
                "this output format writes several files and cannot be written to stdout",
            ));
        }
        if check_destination(&self.main).is_ok_and(DestKind::is_special) {
            return Err(Error::unsupported(format!(
                "this output format writes several files and cannot be written to the device or FIFO '{}'",
                self.main.display()
            )));
        }
        let p = self.folder().join(file_name);
        self.create_path(p)
    }

    /// Creates a further file the user named (`-o data_file=NAME`): a bare file name goes next
    /// to the main file as with [`Output::create_sibling`]; a name with a folder in it is the
    /// user's path, used as given (relative to the working directory, as qemu-img takes it).
    pub fn create_named(&self, name: &str) -> Result<OutFile> {
        if !name.contains('/') {
            return self.create_sibling(name);
        }
        if self.mode == OutputMode::Stdout {
            return Err(Error::unsupported(
                "this output format writes several files and cannot be written to stdout",
            ));
        }
        self.create_path(PathBuf::from(name))
    }

    fn create_path(&self, final_path: PathBuf) -> Result<OutFile> {
        let name = final_path.display().to_string();
        let mut entries = self
            .entries
            .lock()
            .map_err(|_| Error::msg(ErrorKind::Io, "output lock poisoned"))?;
        if entries.iter().any(|e| e.final_path == final_path) {
            return Err(Error::invalid_argument(format!(
                "output file '{name}' created twice"
            )));
        }
        if self.mode != OutputMode::Stdout {
            if let Ok(meta) = fs::metadata(&final_path) {
                let id = (meta.dev(), meta.ino());
                if let Some((_, src)) = self.protected.iter().find(|(p, _)| *p == id) {
                    return Err(Error::invalid_argument(format!(
                        "Output file '{name}' is the same file as '{src}', which the source reads"
                    )));
                }
            }
        }
        let kind = if self.mode == OutputMode::Stdout {
            DestKind::Missing
        } else {
            check_destination(&final_path)?
        };
        if kind.is_special() && final_path != self.main {
            return Err(Error::unsupported(format!(
                "'{name}' is a device or FIFO; the further files of a multi-file output must be files"
            )));
        }
        if self.mode == OutputMode::Stdout || kind.is_stream() {
            if final_path != self.main {
                return Err(Error::unsupported(
                    "this output format writes several files and cannot be written to stdout",
                ));
            }
            self.check_before_in_place()?;
            let (w, shown): (Box<dyn Write + Send>, String) = if self.mode == OutputMode::Stdout {
                let w: Box<dyn Write + Send> = match &self.stdout {
                    Some(slot) => slot
                        .lock()
                        .ok()
                        .and_then(|mut g| g.take())
                        .ok_or_else(|| Error::invalid_argument("output stream already taken"))?,
                    None => Box::new(io::stdout()),
                };
                (w, "-".to_string())
            } else {
                // Opened for writing only, never created or truncated: the node stays. A
                // FIFO's open waits for a reader, as qemu-img's does.
                let f = OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NOCTTY)
                    .open(&final_path)
                    .map_err(|e| Error::io(format_args!("open '{name}' for writing"), e))?;
                (Box::new(f), name.clone())
            };
            let state = Arc::new(Mutex::new(Held {
                inner: w,
                buf: Some(Vec::new()),
            }));
            if let Ok(mut h) = self.held.lock() {
                *h = Some(state.clone());
            }
            let mut out = OutFile::stream(Box::new(HoldWriter { state }), &shown);
            if kind.is_stream() {
                out.counter = self.counter.clone();
            }
            if let Some(alg) = self.checksum {
                out = out.hashed(alg);
            }
            entries.push(Entry {
                final_path,
                temp_path: None,
                file: out.clone(),
            });
            return Ok(out);
        }
        let mut in_place = self.mode == OutputMode::InPlace;
        if in_place
            || kind == DestKind::BlockDevice
            || (kind == DestKind::Regular && is_fd_path(&final_path))
        {
            self.check_before_in_place()?;
        }
        let (file, temp_path) = if kind == DestKind::BlockDevice {
            let mut o = OpenOptions::new();
            o.write(true).read(true);
            if self.direct {
                o.custom_flags(libc::O_DIRECT);
            }
            let f = o
                .open(&final_path)
                .map_err(|e| Error::io(format_args!("open device '{name}' for writing"), e))?;
            (f, None)
        } else if !in_place && kind == DestKind::Regular && is_fd_path(&final_path) {
            // `/dev/stdout` (or `/proc/self/fd/N`) redirected to a file: that open file is
            // the destination, written in place from empty as qemu-img writes it; a rename
            // would replace the system's `/dev/stdout` link.
            let f = OpenOptions::new()
                .write(true)
                .read(true)
                .truncate(true)
                .open(&final_path)
                .map_err(|e| Error::io(format_args!("open '{name}' for writing"), e))?;
            in_place = true;
            (f, None)
        } else if in_place {
            let f = OpenOptions::new()
                .write(true)
                .read(true)
                .open(&final_path)
                .map_err(|e| Error::io(format_args!("open '{name}' for writing"), e))?;
            (f, None)
        } else {
            match self.create_temp(&final_path, kind, &name)? {
                Ok((f, tmp)) => (f, Some(tmp)),
                Err(f) => {
                    in_place = true;
                    (f, None)
                }
            }
        };
        let mut out = OutFile::from_file(file, &name);
        if kind == DestKind::BlockDevice {
            let (size, block) = out
                .file()
                .map(device_geometry)
                .transpose()
                .map_err(|e| Error::io(format_args!("size of device '{name}'"), e))?
                .unwrap_or((0, 512));
            out.dev = Some(Arc::new(Device {
                size,
                block,
                direct: self.direct,
                image_len: AtomicU64::new(size),
                rmw: Mutex::new(()),
                no_punch: AtomicBool::new(false),
                no_zero_range: AtomicBool::new(false),
                no_zeroout: AtomicBool::new(false),
            }));
            if self.direct {
                out.wb.off.store(true, Ordering::Relaxed);
            }
        }
        if kind == DestKind::BlockDevice || in_place {
            out.counter = self.counter.clone();
        }
        if kind == DestKind::BlockDevice && self.zero_device {
            let size = out.len()?;
            out.zero_range(0, size)?;
        }
        if !self.sync {
            out.wb.off.store(true, Ordering::Relaxed);
            out.wb.no_sync.store(true, Ordering::Relaxed);
        }
        if let (Some(alg), true) = (self.checksum, final_path == self.main) {
            // In place the file does not start empty: only a read of the result is right.
            if self.mode != OutputMode::InPlace && kind != DestKind::BlockDevice {
                out = out.hashed(alg);
            }
        }
        entries.push(Entry {
            final_path,
            temp_path,
            file: out.clone(),
        });
        Ok(out)
    }

    /// Creates the temporary file that will replace `final_path`, with the owner, group and
    /// mode of the file it replaces (never wider). Where that cannot be done — the folder is
    /// not writable, or the owner cannot be given to a new file — but the existing file is
    /// writable, falls back to writing that file in place (truncated first, as qemu-img
    /// does) and records a note: `Ok(Err(file))`.
    fn create_temp(
        &self,
        final_path: &Path,
        kind: DestKind,
        name: &str,
    ) -> Result<std::result::Result<(File, PathBuf), File>> {
        remove_stale_temporaries(final_path);
        let old = if kind == DestKind::Regular {
            fs::metadata(final_path).ok()
        } else {
            None
        };
        let fallback = |why: String| -> Result<std::result::Result<(File, PathBuf), File>> {
            self.check_before_in_place()?;
            let f = OpenOptions::new()
                .write(true)
                .read(true)
                .truncate(true)
                .open(final_path)
                .map_err(|e| {
                    Error::io(
                        format_args!("{why}, and '{name}' cannot be written in place either"),
                        e,
                    )
                })?;
            self.note(format!(
                "{why}: '{name}' is written in place instead (not all-or-nothing: a failed run leaves it incomplete)"
            ));
            Ok(Err(f))
        };
        let mut attempt = 0u32;
        let (f, tmp) = loop {
            let tmp = temp_path_for(final_path, &attempt.to_string());
            match OpenOptions::new()
                .write(true)
                .read(true)
                .create_new(true)
                .mode(if old.is_some() { 0o600 } else { 0o644 })
                .open(&tmp)
            {
                Ok(f) => {
                    register_temp(&tmp);
                    break (f, tmp);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 1000 => {
                    attempt += 1;
                }
                Err(e)
                    if old.is_some()
                        && matches!(
                            e.raw_os_error(),
                            Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS)
                        ) =>
                {
                    return fallback(format!(
                        "no temporary file can be made in the folder of '{name}' ({e})"
                    ));
                }
                Err(e) => {
                    let folder = match final_path.parent() {
                        Some(p) if !p.as_os_str().is_empty() => p.display().to_string(),
                        _ => ".".to_string(),
                    };
                    return Err(Error::io(
                        format_args!(
                            "create a temporary file for '{name}' in the folder '{folder}'"
                        ),
                        e,
                    ));
                }
            }
        };
        if let Some(m) = &old {
            use std::os::unix::fs::PermissionsExt;
            // SAFETY: plain syscalls; no memory is passed.
            let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
            if m.uid() != euid || m.gid() != egid {
                if let Err(e) = std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid())) {
                    drop(f);
                    let _ = fs::remove_file(&tmp);
                    unregister_temp(&tmp);
                    return fallback(format!(
                        "a new file cannot keep the owner {}:{} of '{name}' ({e})",
                        m.uid(),
                        m.gid()
                    ));
                }
            }
            // After the chown, which may clear set-id bits; the old permission bits only.
            let perm = fs::Permissions::from_mode(m.mode() & 0o777);
            if let Err(e) = f.set_permissions(perm) {
                drop(f);
                let _ = fs::remove_file(&tmp);
                unregister_temp(&tmp);
                return Err(Error::io(
                    format_args!("set the mode of the new '{name}'"),
                    e,
                ));
            }
            if m.nlink() > 1 {
                self.note(format!(
                    "'{name}' has {} hard links: it is replaced by a new file, and the other links keep the old content",
                    m.nlink()
                ));
            }
        }
        Ok(Ok((f, tmp)))
    }

    /// Makes every file durable and visible under its final name.
    pub fn commit(self) -> Result<()> {
        self.commit_and_hash().map(|_| ())
    }

    /// [`Output::commit`], returning the main file's checksum when one was asked for with
    /// [`Output::with_checksum`].
    pub fn commit_and_hash(self) -> Result<Option<Checksum>> {
        self.commit_unless(None)
    }

    /// [`Output::commit_and_hash`], giving up (and removing the temporaries) when `cancel` is
    /// set by the time the files are synced: the last moment before the renames, after which
    /// the output is complete and in place. A signal that arrives during the final fsync
    /// then leaves the destination untouched rather than replaced.
    pub fn commit_unless(mut self, cancel: Option<&AtomicBool>) -> Result<Option<Checksum>> {
        let entries = std::mem::take(
            &mut *self
                .entries
                .lock()
                .map_err(|_| Error::msg(ErrorKind::Io, "output lock poisoned"))?,
        );
        let checksum_alg = self.checksum;
        let main = self.main.clone();
        let result = (|| {
            self.release_stream()?;
            for e in &entries {
                e.file.sync()?;
            }
            let mut checksum = None;
            if let Some(alg) = checksum_alg {
                if let Some(e) = entries.iter().find(|e| e.final_path == main) {
                    checksum = match e.file.checksum()? {
                        Some(c) => Some(c),
                        // A device: its image's bytes, read through a descriptor
                        // without O_DIRECT.
                        None if e.file.dev.is_some() => {
                            let len = e
                                .file
                                .dev
                                .as_ref()
                                .map_or(0, |d| d.image_len.load(Ordering::Relaxed));
                            let s = FileStorage::open(&e.final_path).map_err(|err| {
                                Error::io("reopen the device for the checksum", err)
                            })?;
                            let s = crate::storage::SliceStorage::new(
                                Arc::new(s),
                                0,
                                len,
                                &e.final_path,
                            )
                            .map_err(|err| Error::io("size the device for the checksum", err))?;
                            Some(hash_storage(&s, alg)?)
                        }
                        // In place: hash what the file holds now.
                        None => e
                            .file
                            .file()
                            .map(|f| -> Result<Checksum> {
                                let copy = f.try_clone().map_err(|err| {
                                    Error::io("reopen the output for the checksum", err)
                                })?;
                                let s = FileStorage::from_file(copy, &main).map_err(|err| {
                                    Error::io("stat the output for the checksum", err)
                                })?;
                                hash_storage(&s, alg)
                            })
                            .transpose()?,
                    };
                }
            }
            // Written in place (a device, a stream, -n): complete and synced by now, so a
            // late cancel has nothing left to keep and must not call it incomplete.
            let renames = entries.iter().any(|e| e.temp_path.is_some());
            if renames && cancel.is_some_and(|c| c.load(Ordering::SeqCst)) {
                return Err(Error::msg(ErrorKind::Cancelled, "interrupted"));
            }
            rename_all(&entries, &main)?;
            if self.mode != OutputMode::Stdout && self.sync {
                // Make the renames themselves durable.
                if let Ok(dir) = File::open(self.folder()) {
                    let _ = dir.sync_all();
                }
            }
            Ok(checksum)
        })();
        if result.is_err() {
            for e in &entries {
                if let Some(tmp) = &e.temp_path {
                    let _ = fs::remove_file(tmp);
                    unregister_temp(tmp);
                }
            }
        }
        self.committed = true;
        result
    }
}

/// Renames every temporary over its final name: the further files (VMDK extents) first,
/// the main file (the descriptor that names them) last, so that no descriptor is ever in
/// place over extents it does not describe. Each existing file is first hard-linked to a
/// backup name; a failed rename puts back every file already replaced (or removes it where
/// there was none), so the old set stays whole.
///
/// An existing file is replaced by exchanging the two names (`renameat2(RENAME_EXCHANGE)`)
/// where the filesystem can: the old file then sits under the temporary name, is put back by
/// a second exchange, and is removed at the end. A plain rename over an existing file makes
/// ext4 (`auto_da_alloc`) write back the whole new file before the rename returns, a flush
/// the user did not ask for: `strace -T` of `vimg convert -t unsafe` over an existing 800 MiB
/// qcow2 (issue 16 workload) showed the rename taking 0.40 s; the exchange takes none of it
/// (0.29-0.33 s -> 0.00-0.02 s for 400 MiB of dirty data in a direct test). The hard-link
/// backup below remains for filesystems without the exchange.
fn rename_all(entries: &[Entry], main: &Path) -> Result<()> {
    let mut order: Vec<&Entry> = entries.iter().filter(|e| e.temp_path.is_some()).collect();
    order.sort_by_key(|e| e.final_path == main);
    // (final, backup of the old file if there was one, whether the backup is the temporary
    // name after an exchange)
    let mut done: Vec<(&Path, Option<PathBuf>, bool)> = Vec::new();
    let mut result = Ok(());
    for e in &order {
        let Some(tmp) = &e.temp_path else { continue };
        let existing = fs::symlink_metadata(&e.final_path).ok();
        let exists = existing.is_some();
        // Only a file or a symlink is exchanged: an exchange would also swap a directory
        // into the temporary's place, where a rename refuses.
        if existing.is_some_and(|m| m.is_file() || m.is_symlink()) {
            match exchange(tmp, &e.final_path) {
                Ok(true) => {
                    // The temporary name (still registered) now holds the old file.
                    done.push((&e.final_path, Some(tmp.clone()), true));
                    continue;
                }
                Ok(false) => {}
                Err(err) => {
                    result = Err(Error::io(
                        format_args!("rename output into place as '{}'", e.final_path.display()),
                        err,
                    ));
                    break;
                }
            }
        }
        let backup = if exists {
            let b = temp_path_for(&e.final_path, "old");
            let _ = fs::remove_file(&b);
            match fs::hard_link(&e.final_path, &b) {
                Ok(()) => {
                    register_temp(&b);
                    Some(b)
                }
                // Not linkable (a symlink's target elsewhere, an immutable file, a
                // filesystem without links): the rename below decides.
                Err(_) => None,
            }
        } else {
            None
        };
        match fs::rename(tmp, &e.final_path) {
            Ok(()) => {
                unregister_temp(tmp);
                done.push((&e.final_path, backup, false));
            }
            Err(err) => {
                if let Some(b) = backup {
                    let _ = fs::remove_file(&b);
                    unregister_temp(&b);
                }
                result = Err(Error::io(
                    format_args!("rename output into place as '{}'", e.final_path.display()),
                    err,
                ));
                break;
            }
        }
    }
    if result.is_err() {
        // Put the old set back, newest first.
        for (fin, backup, exchanged) in done.iter().rev() {
            match backup {
                Some(b) if *exchanged => {
                    // Swap back: the old file under its name, the new one under the
                    // temporary name, which is then removed.
                    if exchange(b, fin).is_ok_and(|x| x) {
                        let _ = fs::remove_file(b);
                        unregister_temp(b);
                    }
                }
                Some(b) => {
                    let _ = fs::rename(b, fin);
                    unregister_temp(b);
                }
                None => {
                    let _ = fs::remove_file(fin);
                }
            }
        }
        return result;
    }
    for (_, backup, _) in done {
        if let Some(b) = backup {
            let _ = fs::remove_file(&b);
            unregister_temp(&b);
        }
    }
    Ok(())
}

/// Swaps the names `a` and `b` in one step (`renameat2` with `RENAME_EXCHANGE`, Linux 3.15+).
/// `Ok(false)` when the kernel or the filesystem cannot (the caller renames instead); other
/// errors are the rename's own (permissions, a read-only folder).
fn exchange(a: &Path, b: &Path) -> io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let (Ok(ca), Ok(cb)) = (
        std::ffi::CString::new(a.as_os_str().as_bytes()),
        std::ffi::CString::new(b.as_os_str().as_bytes()),
    ) else {
        return Ok(false);
    };
    // SAFETY: two NUL-terminated paths that live across the call; no memory is kept.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // No such call, flag or support in this filesystem; or the destination vanished
        // in between (a plain rename then creates it).
        Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(libc::ENOENT) => {
            Ok(false)
        }
        _ => Err(e),
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        if let Ok(entries) = self.entries.lock() {
            for e in entries.iter() {
                if let Some(tmp) = &e.temp_path {
                    let _ = fs::remove_file(tmp);
                    unregister_temp(tmp);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_renames_and_drop_removes() {
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("out.img");
        fs::write(&dst, b"old").unwrap();
        {
            let out = Output::new(&dst);
            let f = out.create_main().unwrap();
            f.write_all_at(b"new", 0).unwrap();
            // Dropped without commit: the old file stays, no temporaries remain.
        }
        assert_eq!(fs::read(&dst).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        let out = Output::new(&dst);
        let f = out.create_main().unwrap();
        let g = out.create_sibling("out-s001.img").unwrap();
        f.write_all_at(b"new", 0).unwrap();
        g.write_all_at(b"ext", 0).unwrap();
        out.commit().unwrap();
        assert_eq!(fs::read(&dst).unwrap(), b"new");
        assert_eq!(fs::read(dir.path().join("out-s001.img")).unwrap(), b"ext");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    /// A cancel that arrives before the renames (during the final fsync, say) leaves the old
    /// destination and no temporaries, for one file and for a set.
    #[test]
    fn commit_unless_cancelled_keeps_the_old_destination() {
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("out.vmdk");
        fs::write(&dst, b"old").unwrap();
        let out = Output::new(&dst);
        out.create_main().unwrap().write_all_at(b"new", 0).unwrap();
        out.create_sibling("out-flat.vmdk")
            .unwrap()
            .write_all_at(b"data", 0)
            .unwrap();
        let cancel = AtomicBool::new(true);
        let e = out.commit_unless(Some(&cancel)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Cancelled);
        assert_eq!(fs::read(&dst).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        // Not cancelled: committed.
        let out = Output::new(&dst);
        out.create_main().unwrap().write_all_at(b"new", 0).unwrap();
        out.commit_unless(Some(&AtomicBool::new(false))).unwrap();
        assert_eq!(fs::read(&dst).unwrap(), b"new");
    }

    /// Every destination name that fits NAME_MAX gets temporary and backup names that fit
    /// too, still recognisable as this destination's.
    #[test]
    fn temporary_names_fit_name_max() {
        use std::os::unix::ffi::OsStrExt;
        for len in [1, 100, 200, 211, 212, 213, 244, 255] {
            let base = "b".repeat(len);
            for tag in ["0", "999", "old"] {
                let t = temp_path_for(Path::new(&format!("/x/{base}")), tag);
                let n = t.file_name().unwrap().as_bytes();
                assert!(n.len() <= NAME_MAX, "{len}: {} bytes", n.len());
                assert!(n.starts_with(&temp_prefix(base.as_bytes())));
            }
        }
        // Two long names that share their first 200 bytes get different prefixes.
        let a = format!("{}a", "x".repeat(250));
        let b = format!("{}b", "x".repeat(250));
        assert_ne!(temp_prefix(a.as_bytes()), temp_prefix(b.as_bytes()));
    }

    /// A temporary whose process is gone is removed; one of a live process (this one) is
    /// not, nor are files that only look similar.
    #[test]
    fn stale_temporaries_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("d.raw");
        let live = temp_path_for(&dst, "0");
        fs::write(&live, b"").unwrap();
        // pid_max is at most 2^22: this pid does not exist.
        let dead = dir.path().join(".d.raw.vimg-4194305-12345-0.tmp");
        fs::write(&dead, b"").unwrap();
        let reused = dir
            .path()
            .join(format!(".d.raw.vimg-{}-1-0.tmp", std::process::id()));
        fs::write(&reused, b"").unwrap();
        let other = dir.path().join(".e.raw.vimg-4194305-12345-0.tmp");
        fs::write(&other, b"").unwrap();
        let odd = dir.path().join(".d.raw.vimg-notes.txt");
        fs::write(&odd, b"").unwrap();
        assert_eq!(remove_stale_temporaries(&dst), 2);
        assert!(live.exists() && other.exists() && odd.exists());
        assert!(!dead.exists() && !reused.exists());
    }

    /// O_DIRECT writes that start and end inside 4 KiB blocks: the partial blocks are
    /// read, patched and written whole; the neighbours' bytes stay.
    #[test]
    fn direct_write_read_modify_writes_partial_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dev");
        fs::write(&p, vec![0xEEu8; 64 << 10]).unwrap();
        let f = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&p)
        {
            Ok(f) => f,
            Err(e) => {
                eprintln!("SKIPPED direct_write_read_modify_writes_partial_blocks: {e}");
                return;
            }
        };
        let d = Device {
            size: 64 << 10,
            block: 4096,
            direct: true,
            image_len: AtomicU64::new(64 << 10),
            rmw: Mutex::new(()),
            no_punch: AtomicBool::new(false),
            no_zero_range: AtomicBool::new(false),
            no_zeroout: AtomicBool::new(false),
        };
        let mut want = vec![0xEEu8; 64 << 10];
        for (off, len, byte) in [
            (512u64, 100usize, 1u8),
            (4000, 200, 2),
            (8192, 4096, 3),
            (12288 + 7, 20000, 4),
            (65536 - 3, 3, 5),
            (0, 1, 6),
        ] {
            let data = vec![byte; len];
            direct_write(&f, &d, &data, off).unwrap();
            want[off as usize..off as usize + len].copy_from_slice(&data);
        }
        drop(f);
        assert!(fs::read(&p).unwrap() == want);
    }

    /// Zeroing on a device takes each way in turn when the ones before it are unsupported
    /// (PUNCH_HOLE, ZERO_RANGE, BLKZEROOUT, writes); every way leaves exactly the range
    /// zero, partial blocks at the edges included, and the neighbours untouched. (A regular
    /// file stands in for the device: BLKZEROOUT on it fails with ENOTTY, as on a device
    /// without it, and the writes take over.)
    #[test]
    fn device_zeroing_falls_back_and_is_exact() {
        for skip in 0..4 {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("dev");
            fs::write(&p, vec![0xEEu8; 256 << 10]).unwrap();
            let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
            let mut out = OutFile::from_file(f, "dev");
            out.dev = Some(Arc::new(Device {
                size: 256 << 10,
                block: 4096,
                direct: false,
                image_len: AtomicU64::new(256 << 10),
                rmw: Mutex::new(()),
                no_punch: AtomicBool::new(skip > 0),
                no_zero_range: AtomicBool::new(skip > 1),
                no_zeroout: AtomicBool::new(skip > 2),
            }));
            let (off, len) = (1000u64, 150_000u64);
            out.zero_range(off, len).unwrap();
            let got = fs::read(&p).unwrap();
            for (i, b) in got.iter().enumerate() {
                let want = if (off..off + len).contains(&(i as u64)) {
                    0
                } else {
                    0xEE
                };
                assert_eq!(*b, want, "way {skip}, byte {i}");
            }
            assert!(
                out.zero_range(200 << 10, 100 << 10).is_err(),
                "past the end"
            );
        }
    }

    /// A multi-file set is renamed extents first, descriptor last; when a rename fails the
    /// files already replaced are put back.
    #[test]
    fn failed_rename_restores_the_old_set() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("a.vmdk");
        fs::write(&main, b"old descriptor").unwrap();
        fs::write(dir.path().join("a-s001.vmdk"), b"old one").unwrap();
        // The second extent's final name becomes a non-empty directory after its create,
        // so its rename fails.
        let out = Output::new(&main);
        out.create_main().unwrap().write_all_at(b"new", 0).unwrap();
        out.create_sibling("a-s001.vmdk")
            .unwrap()
            .write_all_at(b"new one", 0)
            .unwrap();
        out.create_sibling("a-s002.vmdk")
            .unwrap()
            .write_all_at(b"new two", 0)
            .unwrap();
        fs::create_dir(dir.path().join("a-s002.vmdk")).unwrap();
        fs::write(dir.path().join("a-s002.vmdk").join("x"), b"").unwrap();
        assert!(out.commit().is_err());
        assert_eq!(fs::read(&main).unwrap(), b"old descriptor");
        assert_eq!(
            fs::read(dir.path().join("a-s001.vmdk")).unwrap(),
            b"old one"
        );
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["a-s001.vmdk", "a-s002.vmdk", "a.vmdk"]);
    }

    #[test]
    fn symlink_destination_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("victim");
        fs::write(&target, b"keep").unwrap();
        let dst = dir.path().join("link.img");
        std::os::unix::fs::symlink(&target, &dst).unwrap();
        let out = Output::new(&dst);
        out.create_main().unwrap().write_all_at(b"data", 0).unwrap();
        out.commit().unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"keep");
        assert!(!fs::symlink_metadata(&dst).unwrap().file_type().is_symlink());
        assert_eq!(fs::read(&dst).unwrap(), b"data");
    }

    #[test]
    fn stdout_holds_bytes_until_released() {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl Write for Buf {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        // Refused after the writer wrote its header: nothing reaches the stream.
        let buf = Buf::default();
        {
            let out = Output::with_mode("-", OutputMode::Stdout).with_stream(Box::new(buf.clone()));
            let f = out.create_main().unwrap();
            f.write_all_at(b"header", 0).unwrap();
            f.sync().unwrap();
        }
        assert!(buf.0.lock().unwrap().is_empty());
        let out = Output::with_mode("-", OutputMode::Stdout)
            .with_stream(Box::new(buf.clone()))
            .with_checksum(Some(HashAlg::Md5));
        let f = out.create_main().unwrap();
        f.write_all_at(b"header", 0).unwrap();
        out.release_stream().unwrap();
        f.write_all_at(b"data", 8).unwrap();
        f.set_len(16).unwrap();
        let sum = out.commit_and_hash().unwrap().unwrap();
        assert_eq!(&*buf.0.lock().unwrap(), b"header\0\0data\0\0\0\0");
        let want = crate::checksum::hash_storage(
            &crate::storage::MemStorage::new(b"header\0\0data\0\0\0\0".to_vec()),
            HashAlg::Md5,
        )
        .unwrap();
        assert_eq!(sum, want);
    }

    #[test]
    fn stream_fills_gaps_and_refuses_seeking_back() {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl Write for Buf {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let s = OutFile::stream(Box::new(buf.clone()), "-");
        s.write_all_at(b"ab", 0).unwrap();
        s.write_all_at(b"cd", 4).unwrap();
        assert_eq!(
            s.write_all_at(b"x", 1).unwrap_err().kind(),
            ErrorKind::Unsupported
        );
        s.set_len(8).unwrap();
        s.sync().unwrap();
        assert_eq!(&*buf.0.lock().unwrap(), b"ab\0\0cd\0\0");
    }
}
