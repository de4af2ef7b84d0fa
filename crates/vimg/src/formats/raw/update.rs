//! Changing a raw image in place: `resize` (the file's length is the virtual size).
//! A grow or shrink is one truncate(2), which the file system applies as a whole;
//! `full` preallocation writes zeros over the new area after it, `falloc` asks the file
//! system to reserve it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::error::{Error, Result};
use crate::formats::inplace_file::UpdateFile;
use crate::formats::qcow2::update::Prealloc;

fn io_err(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::io(format_args!("{what} '{}'", path.display()), e)
}

/// Resizes the raw image at `path` to `size` bytes. The caller has decided that a shrink
/// is wanted. Block devices are not resized (qemu-img cannot either).
pub fn resize(path: &Path, size: u64, prealloc: Prealloc) -> Result<()> {
    let mut hook = crate::formats::qcow2::update::CrashHook::from_env();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| io_err(path, "open for writing", e))?;
    let meta = file.metadata().map_err(|e| io_err(path, "stat", e))?;
    if !meta.file_type().is_file() {
        return Err(Error::unsupported(format!(
            "'{}' is not a regular file; vimg resizes only regular files",
            path.display()
        )));
    }
    let old = meta.len();
    hook.point();
    file.set_len(size)
        .map_err(|e| io_err(path, "truncate", e))?;
    if size > old {
        match prealloc {
            Prealloc::Off | Prealloc::Metadata => {}
            Prealloc::Falloc => {
                falloc(&file, old, size - old).map_err(|e| io_err(path, "fallocate", e))?
            }
            Prealloc::Full => zero_fill(&file, old, size, &mut hook)
                .map_err(|e| io_err(path, "write zeros to", e))?,
        }
    }
    hook.point();
    file.sync_all().map_err(|e| io_err(path, "fsync", e))?;
    Ok(())
}

fn falloc(file: &File, off: u64, len: u64) -> std::io::Result<()> {
    let (Ok(o), Ok(l)) = (i64::try_from(off), i64::try_from(len)) else {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    };
    // SAFETY: fallocate on a descriptor we own, with checked arguments.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, o, l) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn zero_fill(
    file: &File,
    from: u64,
    to: u64,
    hook: &mut crate::formats::qcow2::update::CrashHook,
) -> std::io::Result<()> {
    let buf = vec![0u8; 1 << 20];
    let mut at = from;
    while at < to {
        let n = (to - at).min(buf.len() as u64) as usize;
        hook.point();
        file.write_all_at(&buf[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// A raw image open for guest-data writes (`commit` into a raw backing file): bytes go
/// in place, each write one pwrite(2), flushed at the end (raw has no metadata to order).
#[derive(Debug)]
pub struct RawUpdate {
    f: UpdateFile,
}

impl RawUpdate {
    /// Opens the raw image at `path` read-write (regular files only).
    pub fn open(path: &Path) -> Result<RawUpdate> {
        Ok(RawUpdate {
            f: UpdateFile::open(path)?.0,
        })
    }

    /// The path.
    pub fn path(&self) -> &Path {
        self.f.path()
    }

    /// The (device, inode) of the file open for writing.
    pub fn identity(&self) -> Result<(u64, u64)> {
        self.f.identity()
    }

    /// The virtual size (the file's length).
    pub fn virtual_size(&self) -> Result<u64> {
        self.f.len()
    }

    /// Writes `data` at `off`.
    pub fn write_at(&mut self, off: u64, data: &[u8]) -> Result<()> {
        self.f.write_at(data, off)
    }

    /// Flushes the writes.
    pub fn sync(&mut self) -> Result<()> {
        self.f.sync()
    }
}
