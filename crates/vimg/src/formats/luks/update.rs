//! A LUKS1 volume open for changing in place: `resize` (the payload grows or shrinks, as
//! QEMU's crypto driver truncates the file to payload offset + new size) and guest writes
//! (`convert -n`: each sector encrypted with the volume key at its own IV, as the reader
//! decrypts it).
//!
//! The volume is unlocked with the user's `key-secret` first, as qemu-img opens it: a wrong
//! or missing passphrase changes nothing.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::crypto::{SectorCipher, SECTOR};
use super::open::{passphrase, secret_passphrase, unlock};
use super::read::Parsed;
use crate::error::{Error, Result};
use crate::formats::qcow2::update::CrashHook;
use crate::formats::qcow2::Prealloc;
use crate::storage::{FileStorage, Storage};

/// An unlocked LUKS1 volume open for writing.
pub struct LuksUpdate {
    path: PathBuf,
    file: File,
    payload: u64,
    size: u64,
    cipher: SectorCipher,
    /// The kill tests' hook, before each write and flush.
    hook: std::sync::Mutex<CrashHook>,
}

impl std::fmt::Debug for LuksUpdate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("LuksUpdate")
            .field("path", &self.path)
            .field("payload", &self.payload)
            .field("size", &self.size)
            .finish()
    }
}

impl LuksUpdate {
    /// Opens `path` and unlocks it with the secret `key_secret`.
    pub fn open(path: &Path, key_secret: Option<&str>) -> Result<LuksUpdate> {
        let (id, secret) = secret_passphrase(key_secret, "")?;
        let pw = passphrase(&id, &secret)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io("open for writing", e))?;
        let st = FileStorage::from_file(
            file.try_clone()
                .map_err(|e| Error::io("open for writing", e))?,
            path,
        )
        .map_err(|e| Error::io("open", e))?;
        let storage: Arc<dyn Storage> = Arc::new(st);
        let parsed = Parsed::read(&*storage)?;
        let key = unlock(&parsed.header, parsed.spec, parsed.hash, &*storage, pw)?;
        let payload = parsed.header.payload_bytes();
        Ok(LuksUpdate {
            path: path.to_path_buf(),
            size: storage.len() - payload,
            payload,
            cipher: SectorCipher::new(parsed.spec, &key),
            file,
            hook: std::sync::Mutex::new(CrashHook::from_env()),
        })
    }

    /// The payload size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.size
    }

    /// Resizes the payload to `size` bytes; `prealloc` applies to the new area of the file
    /// (QEMU passes it to the file layer). The new area is not written through the cipher:
    /// as with qemu-img, it reads as whatever its ciphertext (zeros) decrypts to.
    pub fn resize(&mut self, size: u64, prealloc: Prealloc) -> Result<()> {
        if !size.is_multiple_of(SECTOR as u64) {
            return Err(Error::invalid_argument(format!(
                "LUKS volume size {size} is not a multiple of 512 bytes (vimg writes whole encrypted sectors)"
            )));
        }
        let total = self
            .payload
            .checked_add(size)
            .filter(|t| *t <= i64::MAX as u64)
            .ok_or_else(|| Error::invalid_argument("The requested file size is too large"))?;
        crate::formats::raw::update::resize(&self.path, total, prealloc)?;
        self.size = size;
        Ok(())
    }

    /// Writes guest `data` at `offset`, both whole sectors inside the volume, encrypted.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let ok = offset.is_multiple_of(SECTOR as u64)
            && data.len().is_multiple_of(SECTOR)
            && offset
                .checked_add(data.len() as u64)
                .is_some_and(|e| e <= self.size);
        if !ok {
            return Err(Error::invalid_argument(format!(
                "write of {} bytes at {offset:#x} is not whole sectors inside the LUKS volume",
                data.len()
            )));
        }
        let mut buf = zeroize::Zeroizing::new(data.to_vec());
        self.cipher.apply(offset / SECTOR as u64, &mut buf, true);
        self.point();
        self.file
            .write_all_at(&buf, self.payload + offset)
            .map_err(|e| Error::io(format_args!("write at {:#x}", self.payload + offset), e))
    }

    /// The (device, inode) of the file open for writing.
    pub fn identity(&self) -> Result<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let m = self
            .file
            .metadata()
            .map_err(|e| Error::io("stat the LUKS volume", e))?;
        Ok((m.dev(), m.ino()))
    }

    /// Writes guest `data` at `offset` inside the volume, at any alignment: sectors written
    /// in part are read, decrypted, patched and encrypted again (QEMU's block layer does the
    /// same read-modify-write for the crypto driver's 512-byte alignment). Each sector is
    /// written whole, so an interrupted write leaves every sector old or new.
    pub fn write_guest(&self, offset: u64, data: &[u8]) -> Result<()> {
        let sec = SECTOR as u64;
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= self.size)
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "write of {} bytes at {offset:#x} ends past the LUKS volume ({} bytes)",
                    data.len(),
                    self.size
                ))
            })?;
        if data.is_empty() {
            return Ok(());
        }
        let first = offset / sec * sec;
        let last = end.div_ceil(sec) * sec;
        if first == offset && last == end {
            return self.write_at(offset, data);
        }
        // The unaligned head and tail sectors, patched; the aligned middle as given.
        let mut pos = offset;
        let mut rest = data;
        if offset != first || end - first < sec {
            let take = ((first + sec).min(end) - offset) as usize;
            self.patch_sector(first, (offset - first) as usize, &rest[..take])?;
            pos += take as u64;
            rest = &rest[take..];
        }
        let mid = (rest.len() as u64 / sec * sec) as usize;
        if mid > 0 {
            self.write_at(pos, &rest[..mid])?;
            pos += mid as u64;
            rest = &rest[mid..];
        }
        if !rest.is_empty() {
            self.patch_sector(pos, 0, rest)?;
        }
        Ok(())
    }

    /// Rewrites the sector at guest offset `at` with `bytes` at `within` it.
    fn patch_sector(&self, at: u64, within: usize, bytes: &[u8]) -> Result<()> {
        let mut buf = zeroize::Zeroizing::new(vec![0u8; SECTOR]);
        self.file
            .read_exact_at(&mut buf, self.payload + at)
            .map_err(|e| Error::io(format_args!("read at {:#x}", self.payload + at), e))?;
        self.cipher.apply(at / SECTOR as u64, &mut buf, false);
        buf[within..within + bytes.len()].copy_from_slice(bytes);
        self.write_at(at, &buf)
    }

    fn point(&self) {
        if let Ok(mut h) = self.hook.lock() {
            h.point();
        }
    }

    /// Flushes what was written.
    pub fn flush(&self) -> Result<()> {
        self.point();
        self.file
            .sync_data()
            .map_err(|e| Error::io("flush the LUKS volume", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 1 MiB volume as vimg creates it (key slot 0: secret `id`).
    fn volume(dir: &Path, id: &str) -> PathBuf {
        let mut o = crate::options::CreateOptions::new();
        o.parse_into(&format!("key-secret={id},iter-time=1"))
            .unwrap();
        let v = super::super::write::new_volume(&o, "").unwrap();
        let path = dir.join("v.luks");
        let mut bytes = v.head.to_vec();
        bytes.resize(v.payload as usize + (1 << 20), 0);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn plain(up: &LuksUpdate, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        up.file.read_exact_at(&mut b, up.payload + off).unwrap();
        up.cipher.apply(off / SECTOR as u64, &mut b, false);
        b
    }

    #[test]
    fn write_guest_patches_partial_sectors() {
        crate::secret::define("upd-t0", b"pass zero");
        let dir = tempfile::tempdir().unwrap();
        let path = volume(dir.path(), "upd-t0");
        let up = LuksUpdate::open(&path, Some("upd-t0")).unwrap();
        let mut model = plain(&up, 0, 1 << 20);
        let cases: [(u64, usize); 5] = [(100, 10), (1000, 3000), (4096, 700), (8191, 2), (0, 512)];
        for (i, (off, len)) in cases.into_iter().enumerate() {
            let data: Vec<u8> = (0..len).map(|j| (j + i * 31) as u8 | 1).collect();
            up.write_guest(off, &data).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
            assert_eq!(plain(&up, 0, 1 << 20), model, "write {i}");
        }
        // Past the end: refused, nothing written.
        let before = std::fs::read(&path).unwrap();
        assert!(up.write_guest((1 << 20) - 10, &[1; 11]).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }
}
