//! [`SpoolStorage`]: decoded bytes in a sparse, unlinked temporary file, decoded as far as
//! the reads need.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::decode::Decoder;
use super::error::ContainerError;
use super::stream::OuterFile;
use crate::storage::Storage;

/// Zero runs at least this long (and aligned to it) are left as holes in the temporary file.
const HOLE_BLOCK: usize = 4096;

/// Bytes decoded per step.
const STEP: usize = 1 << 20;

/// Free space is checked after this many bytes of data have been written.
const SPACE_CHECK_EVERY: u64 = 256 << 20;

/// Limits on the temporary file.
#[derive(Clone, Debug, Default)]
pub struct SpoolLimits {
    /// Folder for the temporary file (`$TMPDIR` when `None`).
    pub dir: Option<PathBuf>,
    /// Most data bytes (holes not counted) the temporary file may hold; `None`: bounded only
    /// by the free space, of which 2% of the filesystem (at least 256 MiB) is always left.
    pub max_bytes: Option<u64>,
}

impl SpoolLimits {
    /// The folder the temporary file goes into.
    pub fn folder(&self) -> PathBuf {
        self.dir.clone().unwrap_or_else(std::env::temp_dir)
    }
}

struct State {
    dec: Option<Decoder>,
    buf: Vec<u8>,
    data_bytes: u64,
    since_check: u64,
}

/// A check of the whole decoded image, deferred from open to [`Storage::settle`].
pub type DeferredCheck = Box<dyn Fn(&dyn Storage) -> crate::error::Result<()> + Send + Sync>;

/// A decoded container backed by a sparse temporary file that is unlinked from the start,
/// so nothing is left behind whatever happens to the process.
pub struct SpoolStorage {
    file: File,
    len: u64,
    /// Bytes `[0, decoded)` of the file hold their final content.
    decoded: AtomicU64,
    why_len: String,
    limits: SpoolLimits,
    outer: OuterFile,
    state: Mutex<State>,
    /// A check deferred to [`Storage::settle`]; cleared once it has passed.
    deferred: Mutex<Option<DeferredCheck>>,
}

impl fmt::Debug for SpoolStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpoolStorage")
            .field("len", &self.len)
            .field("decoded", &self.decoded.load(Ordering::Relaxed))
            .field("outer", &self.outer)
            .finish()
    }
}

/// Creates an unlinked temporary file in `dir` (`O_TMPFILE`, or create-then-unlink where
/// the filesystem lacks it).
fn temp_file(dir: &Path) -> io::Result<File> {
    let r = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o600)
        .open(dir);
    match r {
        Ok(f) => Ok(f),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::EISDIR) | Some(libc::EINVAL)
            ) =>
        {
            for attempt in 0..1000u32 {
                let p = dir.join(format!(".vimg-spool-{}-{attempt}", std::process::id()));
                match OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&p)
                {
                    Ok(f) => {
                        std::fs::remove_file(&p)?;
                        return Ok(f);
                    }
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e),
                }
            }
            Err(io::Error::other("cannot create a temporary file"))
        }
        Err(e) => Err(e),
    }
}

fn free_space(f: &File) -> Option<(u64, u64)> {
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatvfs only writes into `st`.
    let r = unsafe { libc::fstatvfs(f.as_raw_fd(), &mut st) };
    if r != 0 {
        return None;
    }
    let frsize = st.f_frsize as u64;
    Some((
        (st.f_bavail as u64).saturating_mul(frsize),
        (st.f_blocks as u64).saturating_mul(frsize),
    ))
}

impl SpoolStorage {
    /// A spool for `dec`, whose first `head.len()` decoded bytes are `head`. With `len`
    /// known, bytes are decoded as reads need them; without, the whole stream is decoded now
    /// and its length becomes the storage's length.
    pub fn new(
        dec: Decoder,
        head: &[u8],
        len: Option<u64>,
        why_len: &str,
        limits: SpoolLimits,
        outer: OuterFile,
    ) -> io::Result<SpoolStorage> {
        let dir = limits.folder();
        let file = temp_file(&dir).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "create a temporary file in '{}' to decode into: {e}",
                    dir.display()
                ),
            )
        })?;
        let mut s = SpoolStorage {
            file,
            len: len.unwrap_or(u64::MAX),
            decoded: AtomicU64::new(0),
            why_len: why_len.to_string(),
            limits,
            outer,
            state: Mutex::new(State {
                dec: None,
                buf: vec![0u8; STEP],
                data_bytes: 0,
                since_check: 0,
            }),
            deferred: Mutex::new(None),
        };
        {
            if let Some(l) = len {
                if head.len() as u64 > l {
                    return Err(dec.short(l, why_len));
                }
            }
            let mut st = s
                .state
                .lock()
                .map_err(|_| io::Error::other("spool lock poisoned"))?;
            s.write_sparse(&mut st, head, 0)?;
            st.dec = Some(dec);
        }
        s.decoded.store(head.len() as u64, Ordering::Release);
        match len {
            Some(l) => s
                .file
                .set_len(l)
                .map_err(|e| io::Error::new(e.kind(), format!("size the temporary file: {e}")))?,
            None => {
                // Decode everything to learn the length.
                let mut st = s
                    .state
                    .lock()
                    .map_err(|_| io::Error::other("spool lock poisoned"))?;
                let total = s.decode_until(&mut st, u64::MAX)?;
                drop(st);
                s.len = total;
                s.file.set_len(total).map_err(|e| {
                    io::Error::new(e.kind(), format!("size the temporary file: {e}"))
                })?;
            }
        }
        Ok(s)
    }

    /// Defers `check` (of the whole decoded image) to [`Storage::settle`], so reads of the
    /// start can be served before the rest is decoded.
    pub fn defer(&self, check: DeferredCheck) {
        if let Ok(mut d) = self.deferred.lock() {
            *d = Some(check);
        }
    }

    /// Writes `data` at `offset`, leaving aligned all-zero blocks as holes.
    fn write_sparse(&self, st: &mut State, data: &[u8], offset: u64) -> io::Result<()> {
        let mut i = 0usize;
        while i < data.len() {
            // Blocks are aligned to the file offset so that holes line up with the
            // filesystem's blocks.
            let block_end = ((offset + i as u64) / HOLE_BLOCK as u64 + 1) * HOLE_BLOCK as u64;
            let end = ((block_end - offset) as usize).min(data.len());
            let piece = &data[i..end];
            let zero = piece.len() == HOLE_BLOCK && piece.iter().all(|b| *b == 0);
            if !zero {
                // Coalesce runs of non-zero blocks into one write.
                let mut j = end;
                while j < data.len() {
                    let e = (j + HOLE_BLOCK).min(data.len());
                    let p = &data[j..e];
                    if p.len() == HOLE_BLOCK && p.iter().all(|b| *b == 0) {
                        break;
                    }
                    j = e;
                }
                self.file
                    .write_all_at(&data[i..j], offset + i as u64)
                    .map_err(|e| {
                        io::Error::new(e.kind(), format!("write the temporary file: {e}"))
                    })?;
                let n = (j - i) as u64;
                st.data_bytes += n;
                st.since_check += n;
                i = j;
            } else {
                i = end;
            }
        }
        self.check_space(st)
    }

    fn check_space(&self, st: &mut State) -> io::Result<()> {
        if let Some(max) = self.limits.max_bytes {
            if st.data_bytes > max {
                return Err(io::Error::other(format!(
                    "decoding '{}' needs more than the {max} bytes allowed for its temporary file",
                    self.name()
                )));
            }
        }
        if st.since_check < SPACE_CHECK_EVERY {
            return Ok(());
        }
        st.since_check = 0;
        if let Some((avail, total)) = free_space(&self.file) {
            let reserve = (total / 50).max(256 << 20);
            if avail < reserve {
                return Err(io::Error::other(format!(
                    "decoding '{}' into a temporary file in '{}' would fill that filesystem ({avail} bytes left); set TMPDIR to a folder with more room",
                    self.name(),
                    self.limits.folder().display()
                )));
            }
        }
        Ok(())
    }

    fn name(&self) -> String {
        self.outer
            .path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "-".to_string())
    }

    /// Decodes until at least `target` bytes are final (or the end); returns the decoded
    /// length.
    fn decode_until(&self, st: &mut State, target: u64) -> io::Result<u64> {
        let mut buf = std::mem::take(&mut st.buf);
        let r = (|| loop {
            let done = self.decoded.load(Ordering::Acquire);
            if done >= target || done >= self.len {
                return Ok(done);
            }
            let Some(dec) = st.dec.as_mut() else {
                return Ok(done);
            };
            let want = ((self.len - done) as usize).min(buf.len());
            let got = dec.read_full(&mut buf[..want])?;
            if got == 0 {
                if self.len == u64::MAX {
                    st.dec = None;
                    return Ok(done);
                }
                return Err(dec.short(self.len, &self.why_len));
            }
            let end = done + got as u64;
            let finished = end == self.len;
            if finished {
                dec.expect_end(&self.why_len)?;
            }
            self.write_sparse(st, &buf[..got], done)?;
            self.decoded.store(end, Ordering::Release);
            if finished {
                st.dec = None;
            }
        })();
        st.buf = buf;
        r
    }

    fn ensure(&self, end: u64) -> io::Result<()> {
        if self.decoded.load(Ordering::Acquire) >= end {
            return Ok(());
        }
        let mut st = self
            .state
            .lock()
            .map_err(|_| io::Error::other("spool lock poisoned"))?;
        self.decode_until(&mut st, end)?;
        Ok(())
    }
}

impl Storage for SpoolStorage {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.len {
            return Ok(0);
        }
        let n = (self.len - offset).min(buf.len() as u64) as usize;
        self.ensure(offset + n as u64)?;
        let mut done = 0;
        while done < n {
            // Past the file's written data the temporary file reads as zeros (a hole).
            let k = self.file.read_at(&mut buf[done..n], offset + done as u64)?;
            if k == 0 {
                buf[done..n].fill(0);
                break;
            }
            done += k;
        }
        Ok(n)
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        if offset >= self.len {
            return Ok(None);
        }
        let decoded = self.decoded.load(Ordering::Acquire);
        if offset >= decoded {
            // Not decoded yet: it may hold anything.
            return Ok(Some((offset, self.len)));
        }
        let fd = self.file.as_raw_fd();
        let Ok(off) = libc::off_t::try_from(offset) else {
            return Ok(Some((offset, self.len)));
        };
        // SAFETY: lseek on our own descriptor; every read is positional.
        let start = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if start < 0 {
            return match io::Error::last_os_error().raw_os_error() {
                Some(libc::ENXIO) => Ok((decoded < self.len).then_some((decoded, self.len))),
                _ => Ok(Some((offset, self.len))),
            };
        }
        let start = start as u64;
        if start >= decoded {
            return Ok((decoded < self.len).then_some((decoded, self.len)));
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(fd, start as libc::off_t, libc::SEEK_HOLE) };
        let end = if end < 0 { self.len } else { end as u64 };
        // Data up to the decoded mark is final; past it, treat everything as data.
        let end = if end >= decoded { self.len } else { end };
        Ok(Some((start, end.min(self.len))))
    }

    fn path(&self) -> Option<&Path> {
        self.outer.path.as_deref()
    }

    fn disk_usage(&self) -> Option<u64> {
        self.outer.disk_usage
    }

    fn identity(&self) -> Option<(u64, u64)> {
        self.outer.identity
    }

    fn settle(&self) -> crate::error::Result<()> {
        let mut d = self.deferred.lock().map_err(|_| {
            crate::error::Error::io("settle", io::Error::other("spool lock poisoned"))
        })?;
        if let Some(check) = d.as_ref() {
            // Decodes to the end, which also checks the stream's length and trailing bytes.
            self.ensure(self.len).map_err(|e| {
                let kind = match e.get_ref().and_then(|i| i.downcast_ref::<ContainerError>()) {
                    Some(c) => crate::error::FormatError::kind(c),
                    None => crate::error::ErrorKind::Io,
                };
                crate::error::Error::new(kind, e)
            })?;
            check(self)?;
            *d = None;
        }
        Ok(())
    }
}
