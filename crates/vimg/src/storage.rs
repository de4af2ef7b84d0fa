//! Read-only byte sources an image lives in: a file with positional reads and hole queries,
//! a byte buffer (tests and fuzzing), or a window into another source (a disk inside an OVA).
//!
//! Every read is positional (`pread`) through `&self`, so many threads can read one source
//! without a shared seek position.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A read-only byte source.
pub trait Storage: Send + Sync + fmt::Debug {
    /// Length in bytes.
    fn len(&self) -> u64;

    /// True when the source holds no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads up to `buf.len()` bytes at `offset`; returns how many were read (short only at
    /// the end of the source).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;

    /// Reads exactly `buf.len()` bytes at `offset`, or fails with `UnexpectedEof`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let off = offset
                .checked_add(done as u64)
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            match self.read_at(&mut buf[done..], off) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The first range of possibly non-hole data at or after `offset`, as `(start, end)`;
    /// `None` when only holes remain. Sources without hole information report everything
    /// from `offset` to the end as data.
    fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        let len = self.len();
        Ok((offset < len).then_some((offset, len)))
    }

    /// The path this source was opened from, if it is a file.
    fn path(&self) -> Option<&Path> {
        None
    }

    /// The name of the quorum node this source is (a `quorum` node the user named): it
    /// has no folder to resolve relative names against.
    fn quorum_node(&self) -> Option<&str> {
        None
    }

    /// The source as `Any`, for the few that `info` describes as nodes of their own (a
    /// quorum node).
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }

    /// Bytes the source occupies on disk (`st_blocks * 512`), for `info`'s `actual-size`.
    fn disk_usage(&self) -> Option<u64> {
        None
    }

    /// `(device, inode)` when the source is a file, to recognise the same file twice.
    fn identity(&self) -> Option<(u64, u64)> {
        None
    }

    /// The raw file descriptor, for zero-copy transfers; only when the whole file is the
    /// source (not a window).
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }

    /// `Some(window)` for a source read as a stream (a decompressed container, a pipe):
    /// reads must come in ascending order, except that bytes up to `window` behind the
    /// furthest read are still served. The copy engine sizes its read-ahead to fit.
    fn sequential_window(&self) -> Option<u64> {
        None
    }

    /// Runs the checks on this source that were deferred at open (the whole-image probe of
    /// a decoded container, see [`crate::source::SourceOptions::defer_whole_probe`]): it
    /// decodes to the end if need be. A caller that opened with deferral calls it before
    /// anything it wrote becomes visible; an error means the source must be refused.
    fn settle(&self) -> crate::error::Result<()> {
        Ok(())
    }

    /// A driver reached a point QEMU's blkdebug rules can wait for (`read_aio`,
    /// `l1_update`, ...). Only a [`crate::blkdebug`] layer acts on it; layers that wrap
    /// another source pass it on.
    fn debug_event(&self, _event: crate::blkdebug::Event) {}
}

/// Reads exactly `buf.len()` bytes, with an error that says what was being read.
pub fn read_exact(
    storage: &dyn Storage,
    buf: &mut [u8],
    offset: u64,
    what: impl fmt::Display,
) -> crate::Result<()> {
    storage
        .read_exact_at(buf, offset)
        .map_err(|e| crate::Error::io(format_args!("read {what} at {offset:#x}"), e))
}

/// A file read with `pread` and probed for holes with `SEEK_DATA`/`SEEK_HOLE`.
pub struct FileStorage {
    file: File,
    path: PathBuf,
    len: u64,
    identity: (u64, u64),
}

impl fmt::Debug for FileStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileStorage")
            .field("path", &self.path)
            .field("len", &self.len)
            .finish()
    }
}

impl FileStorage {
    /// Opens `path` read-only. The source is never opened for writing.
    pub fn open(path: impl AsRef<Path>) -> io::Result<FileStorage> {
        let path = path.as_ref();
        let file = File::open(path)?;
        FileStorage::from_file(file, path)
    }

    /// Wraps an already opened file.
    pub fn from_file(file: File, path: impl AsRef<Path>) -> io::Result<FileStorage> {
        let meta = file.metadata()?;
        let len = if meta.file_type().is_file() {
            meta.len()
        } else {
            // Block devices report 0 in st_size; ask the device.
            device_len(&file)?
        };
        Ok(FileStorage {
            file,
            path: path.as_ref().to_path_buf(),
            len,
            identity: (meta.dev(), meta.ino()),
        })
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

fn device_len(file: &File) -> io::Result<u64> {
    // SEEK_END works on block devices; it does not move any shared state we rely on because
    // every read is positional.
    let r = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as u64)
}

impl Storage for FileStorage {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.len {
            return Ok(0);
        }
        let max = (self.len - offset).min(buf.len() as u64) as usize;
        self.file.read_at(&mut buf[..max], offset)
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        if offset >= self.len {
            return Ok(None);
        }
        let fd = self.file.as_raw_fd();
        let Ok(off) = libc::off_t::try_from(offset) else {
            return Ok(None);
        };
        let start = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if start < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ENXIO) => Ok(None),
                // No hole support: everything is data.
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(Some((offset, self.len))),
                _ => Err(err),
            };
        }
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        if end < 0 {
            return Ok(Some((start as u64, self.len)));
        }
        let (start, end) = (start as u64, (end as u64).min(self.len));
        if start >= end {
            return Ok(None);
        }
        Ok(Some((start, end)))
    }

    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }

    fn disk_usage(&self) -> Option<u64> {
        self.file.metadata().ok().map(|m| m.blocks() * 512)
    }

    fn identity(&self) -> Option<(u64, u64)> {
        Some(self.identity)
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }
}

/// Bytes in memory: for tests, fuzzing and small decoded inputs.
#[derive(Clone)]
pub struct MemStorage {
    data: Arc<[u8]>,
}

impl fmt::Debug for MemStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemStorage")
            .field("len", &self.data.len())
            .finish()
    }
}

impl MemStorage {
    /// A source holding `data`.
    pub fn new(data: impl Into<Arc<[u8]>>) -> MemStorage {
        MemStorage { data: data.into() }
    }
}

impl Storage for MemStorage {
    fn len(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let len = self.data.len() as u64;
        if offset >= len {
            return Ok(0);
        }
        let start = offset as usize;
        let n = buf.len().min(self.data.len() - start);
        buf[..n].copy_from_slice(&self.data[start..start + n]);
        Ok(n)
    }
}

/// A window `[offset, offset + len)` of another source, e.g. one member of a tar archive.
#[derive(Debug)]
pub struct SliceStorage {
    inner: Arc<dyn Storage>,
    offset: u64,
    len: u64,
    name: PathBuf,
}

impl SliceStorage {
    /// A window of `inner`; fails if it does not lie inside `inner`.
    pub fn new(
        inner: Arc<dyn Storage>,
        offset: u64,
        len: u64,
        name: impl AsRef<Path>,
    ) -> io::Result<SliceStorage> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "window overflows"))?;
        if end > inner.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "window extends past the end of the file",
            ));
        }
        Ok(SliceStorage {
            inner,
            offset,
            len,
            name: name.as_ref().to_path_buf(),
        })
    }
}

impl Storage for SliceStorage {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.len {
            return Ok(0);
        }
        let n = (self.len - offset).min(buf.len() as u64) as usize;
        self.inner.read_at(&mut buf[..n], self.offset + offset)
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        if offset >= self.len {
            return Ok(None);
        }
        match self.inner.next_data(self.offset + offset)? {
            Some((s, e)) if s < self.offset + self.len => {
                let s = s.max(self.offset) - self.offset;
                let e = e.min(self.offset + self.len) - self.offset;
                Ok(Some((s, e)))
            }
            _ => Ok(None),
        }
    }

    fn path(&self) -> Option<&Path> {
        Some(&self.name)
    }

    fn identity(&self) -> Option<(u64, u64)> {
        self.inner.identity()
    }

    fn disk_usage(&self) -> Option<u64> {
        self.inner.disk_usage().map(|u| u.min(self.len))
    }

    fn sequential_window(&self) -> Option<u64> {
        self.inner.sequential_window()
    }

    fn debug_event(&self, event: crate::blkdebug::Event) {
        self.inner.debug_event(event)
    }
}

/// Another source seen as QEMU's file layer sees every file: as whole 512-byte sectors, the
/// length rounded up and the bytes between the end of the file and the end of its last
/// sector reading as zeros. Formats whose files qemu-img itself ends inside a structure
/// (a qcow2 snapshot table whose zero padding was never written) read through this; formats
/// that must refuse a table running past the real end of the file do not.
#[derive(Debug)]
pub struct SectorPadded {
    inner: Arc<dyn Storage>,
    len: u64,
}

impl SectorPadded {
    /// `inner` with its length rounded up to a sector.
    pub fn new(inner: Arc<dyn Storage>) -> SectorPadded {
        let len = inner.len().div_ceil(512).saturating_mul(512);
        SectorPadded { inner, len }
    }
}

impl Storage for SectorPadded {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let real = self.inner.len();
        if offset >= self.len {
            return Ok(0);
        }
        if offset >= real {
            let n = (self.len - offset).min(buf.len() as u64) as usize;
            buf[..n].fill(0);
            return Ok(n);
        }
        self.inner.read_at(buf, offset)
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        self.inner.next_data(offset)
    }

    fn path(&self) -> Option<&Path> {
        self.inner.path()
    }

    fn disk_usage(&self) -> Option<u64> {
        self.inner.disk_usage()
    }

    fn identity(&self) -> Option<(u64, u64)> {
        self.inner.identity()
    }

    /// The file's own descriptor: the padding is less than a sector past its end, so inside
    /// the file's last page, which a mapping of the file reads as zeros, as `read_at` does.
    fn raw_fd(&self) -> Option<RawFd> {
        self.inner.raw_fd()
    }

    fn debug_event(&self, event: crate::blkdebug::Event) {
        self.inner.debug_event(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn mem_reads_and_short_reads() {
        let m = MemStorage::new(vec![1u8, 2, 3, 4]);
        let mut b = [0u8; 3];
        assert_eq!(m.read_at(&mut b, 2).unwrap(), 2);
        assert_eq!(&b[..2], &[3, 4]);
        assert_eq!(m.read_at(&mut b, 9).unwrap(), 0);
        let err = m.read_exact_at(&mut b, 2).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(
            m.read_exact_at(&mut b, u64::MAX).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn file_holes_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sparse");
        let mut f = File::create(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[7u8; 4096], 32 << 20).unwrap();
        f.flush().unwrap();
        let s = FileStorage::open(&p).unwrap();
        let (start, end) = s.next_data(0).unwrap().unwrap();
        // Filesystems without hole support report everything as data; both are correct.
        assert!(start <= 32 << 20 && end > 32 << 20);
        if start == 32 << 20 {
            assert_eq!(s.next_data(end).unwrap(), None);
        }
    }

    #[test]
    fn sector_padded_counts_whole_sectors() {
        let s = SectorPadded::new(Arc::new(MemStorage::new(vec![7u8; 1000])));
        assert_eq!(s.len(), 1024);
        let mut b = [1u8; 34];
        s.read_exact_at(&mut b, 990).unwrap();
        assert_eq!(&b[..10], &[7u8; 10]);
        assert_eq!(&b[10..34], &[0u8; 24]);
        let mut b = [1u8; 40];
        assert!(
            s.read_exact_at(&mut b, 1000).is_err(),
            "past the rounded length"
        );
        let mut tail = [1u8; 24];
        s.read_exact_at(&mut tail, 1000).unwrap();
        assert_eq!(tail, [0u8; 24]);
    }

    #[test]
    fn slice_window() {
        let m: Arc<dyn Storage> = Arc::new(MemStorage::new((0u8..100).collect::<Vec<_>>()));
        let s = SliceStorage::new(m.clone(), 10, 20, "x").unwrap();
        let mut b = [0u8; 5];
        s.read_exact_at(&mut b, 18).unwrap_err();
        s.read_exact_at(&mut b, 15).unwrap();
        assert_eq!(b, [25, 26, 27, 28, 29]);
        assert!(SliceStorage::new(m, 90, 20, "x").is_err());
    }
}
