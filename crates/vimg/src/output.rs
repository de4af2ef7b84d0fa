//! Where writers put their bytes, and the all-or-nothing rule for them.
//!
//! An [`Output`] owns every file a conversion creates. In the default atomic mode each file
//! is written as a hidden temporary in the destination's folder; [`Output::commit`] fsyncs
//! them, renames them over their final names and fsyncs the folder. Dropping an uncommitted
//! `Output` (an error, a cancel) removes the temporaries, so the destination is either
//! absent, unchanged, or complete. A destination that is a symlink is replaced by the rename;
//! the file it pointed to is never written.
//!
//! Durability is paid for during the copy, not after it: large writes are sent to the disk
//! as soon as they are made (`sync_file_range`), and once a bounded window of them is in
//! flight the oldest is waited for and dropped from the page cache. The fsync at commit then
//! finds almost nothing left to write, and a conversion keeps at most [`WRITEBACK_WINDOW`]
//! of each output file in the page cache, not the whole output: it neither evicts the
//! machine's cache nor stalls on reclaiming it.
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

/// One output file: positional writes through `&self`, shareable between threads.
#[derive(Clone)]
pub struct OutFile {
    sink: Arc<Sink>,
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
            name: name.into(),
            hash: None,
            wb: Arc::default(),
        }
    }

    /// A one-pass stream (e.g. stdout).
    pub fn stream(w: Box<dyn Write + Send>, name: &str) -> OutFile {
        OutFile {
            sink: Arc::new(Sink::Stream(Mutex::new(StreamState { w, pos: 0, len: 0 }))),
            name: name.into(),
            hash: None,
            wb: Arc::default(),
        }
    }

    /// True for a one-pass stream.
    pub fn is_stream(&self) -> bool {
        matches!(*self.sink, Sink::Stream(_))
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
        match &*self.sink {
            Sink::File(f) => {
                self.reserve(f, offset, buf.len() as u64);
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
                    s.w.write_all(&ZEROS[..n])
                        .map_err(|e| self.err("write", pos, e))?;
                    self.hash_with(|h| h.write(pos, &ZEROS[..n]));
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
    fn reserve(&self, f: &File, offset: u64, len: u64) {
        if len < WRITEBACK_LARGE || self.wb.no_falloc.load(Ordering::Relaxed) {
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
        let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, offset as i64, len as i64) };
        if r != 0 {
            return Err(self.err("allocate", offset, io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Makes `[offset, offset + len)` read as zeros, freeing blocks where the filesystem can
    /// (hole punch), else writing zeros.
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        if let Sink::File(f) = &*self.sink {
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
                    s.w.write_all(&ZEROS[..n])
                        .map_err(|e| self.err("write", pos, e))?;
                    self.hash_with(|h| h.write(pos, &ZEROS[..n]));
                    s.pos += n as u64;
                }
                s.w.flush().map_err(|e| self.err("flush", 0, e))
            }
        }
    }
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
pub enum OutputMode {
    /// Write temporaries, rename over the destination at commit (the default).
    Atomic,
    /// Write into the existing destination in place (`convert -n`).
    InPlace,
    /// Write the main file to stdout; no other files may be created.
    Stdout,
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
}

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
        }
    }

    /// With `false`, [`Output::commit`] neither fsyncs the files nor their folder, and no
    /// early writeback is started: what qemu-img's `-t unsafe` cache mode (its `convert`
    /// default) does. The output still appears all at once and a failed conversion still
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
        let (file, temp_path) = match self.mode {
            OutputMode::Stdout => {
                if final_path != self.main {
                    return Err(Error::unsupported(
                        "this output format writes several files and cannot be written to stdout",
                    ));
                }
                let w: Box<dyn Write + Send> = match &self.stdout {
                    Some(slot) => slot
                        .lock()
                        .ok()
                        .and_then(|mut g| g.take())
                        .ok_or_else(|| Error::invalid_argument("output stream already taken"))?,
                    None => Box::new(io::stdout()),
                };
                let state = Arc::new(Mutex::new(Held {
                    inner: w,
                    buf: Some(Vec::new()),
                }));
                if let Ok(mut h) = self.held.lock() {
                    *h = Some(state.clone());
                }
                let mut out = OutFile::stream(Box::new(HoldWriter { state }), "-");
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
            OutputMode::InPlace => {
                let f = OpenOptions::new()
                    .write(true)
                    .read(true)
                    .open(&final_path)
                    .map_err(|e| Error::io(format_args!("open '{name}' for writing"), e))?;
                (f, None)
            }
            OutputMode::Atomic => {
                let folder = final_path
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default();
                let base = final_path
                    .file_name()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let mut attempt = 0u32;
                loop {
                    let tmp =
                        folder.join(format!(".{base}.vimg-{}-{attempt}.tmp", std::process::id()));
                    match OpenOptions::new()
                        .write(true)
                        .read(true)
                        .create_new(true)
                        .mode(0o644)
                        .open(&tmp)
                    {
                        Ok(f) => {
                            register_temp(&tmp);
                            break (f, Some(tmp));
                        }
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 1000 => {
                            attempt += 1;
                        }
                        Err(e) => {
                            return Err(Error::io(
                                format_args!("create a temporary file for '{name}'"),
                                e,
                            ))
                        }
                    }
                }
            }
        };
        let out = OutFile::from_file(file, &name);
        if !self.sync {
            out.wb.off.store(true, Ordering::Relaxed);
            out.wb.no_sync.store(true, Ordering::Relaxed);
        }
        let mut out = out;
        if let (Some(alg), true) = (self.checksum, final_path == self.main) {
            // In place the file does not start empty: only a read of the result is right.
            if self.mode != OutputMode::InPlace {
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
            if cancel.is_some_and(|c| c.load(Ordering::SeqCst)) {
                return Err(Error::msg(ErrorKind::Cancelled, "interrupted"));
            }
            for e in &entries {
                if let Some(tmp) = &e.temp_path {
                    fs::rename(tmp, &e.final_path).map_err(|err| {
                        Error::io(
                            format_args!(
                                "rename output into place as '{}'",
                                e.final_path.display()
                            ),
                            err,
                        )
                    })?;
                    unregister_temp(tmp);
                }
            }
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
