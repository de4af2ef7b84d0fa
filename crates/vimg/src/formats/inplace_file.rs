//! The file of an image being changed in place by the block-table updaters (vdi, vpc,
//! parallels): positional writes, flushes and truncations, each counted by the crash hook
//! (`VIMG_TEST_CRASH_AFTER_WRITES`, see `qcow2::update`), so the kill tests can stop an
//! operation before any one of them. Opening goes through the format's reader first (every
//! table checked), on a duplicate of this descriptor, so the file checked is the file written.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::formats::qcow2::update::CrashHook;
use crate::storage::{FileStorage, Storage};

/// A regular file open read-write, with the crash hook.
#[derive(Debug)]
pub struct UpdateFile {
    file: File,
    path: PathBuf,
    hook: CrashHook,
}

fn io_err(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::io(format_args!("{what} '{}'", path.display()), e)
}

impl UpdateFile {
    /// Opens `path` read-write (regular files only) and returns it with a read-only
    /// storage on the same open file, for the format's reader.
    pub fn open(path: &Path) -> Result<(UpdateFile, Arc<dyn Storage>)> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io_err(path, "open for writing", e))?;
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
        Ok((
            UpdateFile {
                file,
                path: path.to_path_buf(),
                hook: CrashHook::from_env(),
            },
            storage,
        ))
    }

    /// Wraps `file`, already open read-write at `path` (a vmdk extent the gate resolved
    /// and the caller checked by inode against the file its reader opened).
    pub fn from_file(file: File, path: &Path) -> UpdateFile {
        UpdateFile {
            file,
            path: path.to_path_buf(),
            hook: CrashHook::from_env(),
        }
    }

    /// The open file, for an updater that orders its writes with its own crash hook (qed).
    pub fn into_file(self) -> File {
        self.file
    }

    /// The path the file was opened by.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The (device, inode) of the file.
    pub fn identity(&self) -> Result<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let m = self
            .file
            .metadata()
            .map_err(|e| io_err(&self.path, "stat", e))?;
        Ok((m.dev(), m.ino()))
    }

    /// The file's length now.
    pub fn len(&self) -> Result<u64> {
        Ok(self
            .file
            .metadata()
            .map_err(|e| io_err(&self.path, "stat", e))?
            .len())
    }

    /// Writes `data` at `off` (one write: a killed process leaves all of it or none).
    pub fn write_at(&mut self, data: &[u8], off: u64) -> Result<()> {
        self.hook.point();
        self.file
            .write_all_at(data, off)
            .map_err(|e| io_err(&self.path, "write to", e))
    }

    /// Reads `buf.len()` bytes at `off`; bytes past the end of the file read as zeros.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        buf.fill(0);
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(&self.path, "read from", e)),
            }
        }
        Ok(())
    }

    /// Writes a newly allocated unit of `unit` bytes at `at`, to read as zeros but for
    /// `piece` at `within`: zeros are written only below `zero_from` (where the file held
    /// bytes before the allocation; past it the file reads as zeros already), and the file
    /// is extended to the unit's end. Work and memory are bounded by the file and the
    /// piece, never by a unit size a header claims (a 2 GiB cluster over a 1 KiB file).
    pub fn write_new_unit(
        &mut self,
        at: u64,
        unit: u64,
        within: u64,
        piece: &[u8],
        zero_from: u64,
    ) -> Result<()> {
        const STEP: u64 = 1 << 20;
        let (p0, end) = match (at.checked_add(within), at.checked_add(unit)) {
            (Some(p0), Some(end)) if within + piece.len() as u64 <= unit => (p0, end),
            _ => {
                return Err(Error::invalid_argument(format!(
                    "a write of {} bytes at {within:#x} of a {unit}-byte unit at {at:#x}",
                    piece.len()
                )))
            }
        };
        let p1 = p0 + piece.len() as u64;
        let zeros = vec![0u8; STEP.min(unit) as usize];
        for (from, to) in [(at, p0), (p1, end)] {
            let to = to.min(zero_from);
            let mut pos = from;
            while pos < to {
                let n = (to - pos).min(STEP);
                self.write_at(&zeros[..n as usize], pos)?;
                pos += n;
            }
        }
        self.write_at(piece, p0)?;
        if self.len()? < end {
            self.set_len(end)?;
        }
        Ok(())
    }

    /// Flushes everything written so far to stable storage.
    pub fn sync(&mut self) -> Result<()> {
        self.hook.point();
        self.file
            .sync_all()
            .map_err(|e| io_err(&self.path, "fsync", e))
    }

    /// Sets the file's length.
    pub fn set_len(&mut self, len: u64) -> Result<()> {
        self.hook.point();
        self.file
            .set_len(len)
            .map_err(|e| io_err(&self.path, "truncate", e))
    }

    /// Gives `[off, off + len)` back to the file system (it reads as zeros after); a file
    /// system that cannot punch holes keeps the bytes, which nothing references any more.
    pub fn punch_hole(&mut self, off: u64, len: u64) -> Result<()> {
        use std::os::unix::io::AsRawFd;
        let (Ok(o), Ok(l)) = (i64::try_from(off), i64::try_from(len)) else {
            return Ok(());
        };
        self.hook.point();
        // SAFETY: fallocate on a descriptor we own, with checked arguments.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                o,
                l,
            )
        };
        let _ = r;
        Ok(())
    }
}
