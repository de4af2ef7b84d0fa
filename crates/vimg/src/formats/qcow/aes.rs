//! The legacy AES encryption of qcow and qcow2 images (header `crypt_method` 1; QEMU's
//! docs/interop/qcow2.txt "crypt_method", its crypto/block-qcow.c, block/qcow.c and
//! block/qcow2.c):
//!
//! - the key is the secret's text (`encrypt.key-secret`, up to its first NUL, UTF-8)
//!   cut or zero-padded to 16 bytes, used as an AES-128 key as it is (no KDF, no salt);
//! - every data cluster is encrypted with AES-128-CBC in 512-byte sectors, each with the
//!   IV "plain64" of its **guest** sector number (the little-endian sector number in the
//!   first 8 bytes of the IV, the rest zero): unlike qcow2's LUKS encryption the IV does
//!   not count host sectors, so the same data at the same guest offset always encrypts
//!   to the same bytes;
//! - compressed clusters, zero clusters and unallocated clusters are not encrypted (QEMU
//!   reads a compressed cluster without decrypting it);
//! - nothing in the image checks the key: a wrong key reads as noise, as with qemu-img.
//!
//! The format's readers map the image as for a plain one; [`AesReader`] wraps them and
//! hands out data extents in a view (`GuestView`) that reads a guest range through the
//! inner reader's map and decrypts it. Compressed extents pass through unchanged.
//!
//! QEMU keeps this method only to get data out of old images ("broken by design"); vimg
//! reads and writes it for compatibility with qemu-img, which still does.

use std::io;
use std::sync::{Arc, OnceLock};

use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::formats::luks::crypto::{CipherSpec, IvGen, Mode, SectorCipher, SECTOR};
use crate::formats::luks::error::LuksError;
use crate::formats::Format;
use crate::mapping::{
    BackingRef, ChildNode, Extent, ExternalRef, FileId, FormatSpecific, GuestOffset, HostOffset,
    ImageReader, MapKind, SnapshotInfo,
};
use crate::storage::Storage;

/// Header `crypt_method` of the legacy AES encryption (qcow and qcow2).
pub const CRYPT_AES: u32 = 1;

/// Bytes of a sector (the unit of encryption and of the IV count), as u64.
const SECTOR64: u64 = SECTOR as u64;

/// The file id under which [`AesReader`] hands out its decrypting view.
const VIEW: FileId = FileId(u16::MAX);

/// The keyed AES-128-CBC cipher of a legacy encrypted image.
pub struct AesKey {
    cipher: SectorCipher,
}

impl AesKey {
    /// The key of the secret named by `id` (the image's `encrypt.key-secret`), as QEMU
    /// derives it: the secret's text, cut or zero-padded to 16 bytes. Without `id`,
    /// qemu's "Parameter 'encrypt.key-secret' is required for cipher".
    pub fn from_secret(id: Option<&str>) -> Result<AesKey> {
        let (id, secret) = crate::formats::luks::open::secret_passphrase(id, "encrypt.")?;
        let pw = crate::formats::luks::open::passphrase(&id, &secret)?;
        Ok(AesKey::from_passphrase(pw))
    }

    /// The key from passphrase bytes (already cut at the first NUL).
    pub fn from_passphrase(pw: &[u8]) -> AesKey {
        let mut key = Zeroizing::new([0u8; 16]);
        let n = pw.len().min(16);
        key[..n].copy_from_slice(&pw[..n]);
        // AES with a 16-byte key, CBC and plain64 is a spec CipherSpec::new admits.
        let spec = CipherSpec {
            key_bytes: 16,
            mode: Mode::Cbc,
            ivgen: IvGen::Plain64,
        };
        AesKey {
            cipher: SectorCipher::new(spec, &key[..]),
        }
    }

    /// Encrypts (`enc`) or decrypts `buf` (whole sectors) in place, its first byte being
    /// at guest offset `guest` (sector aligned).
    pub fn apply(&self, guest: u64, buf: &mut [u8], enc: bool) -> Result<()> {
        if !guest.is_multiple_of(SECTOR64) || !buf.len().is_multiple_of(SECTOR) {
            return Err(Error::invalid_argument(format!(
                "AES-encrypted I/O of {} bytes at guest offset {guest:#x} is not whole sectors",
                buf.len()
            )));
        }
        self.cipher.apply(guest / SECTOR64, buf, enc);
        Ok(())
    }
}

impl std::fmt::Debug for AesKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.write_str("AesKey")
    }
}

/// The key a new qcow image is encrypted with, from `-o` as qemu-img reads it:
/// `encryption=on` or `encrypt.format=aes` (not both), with `encrypt.key-secret`; `None`
/// for an unencrypted image.
pub fn create_key(opts: &crate::options::CreateOptions) -> Result<Option<AesKey>> {
    let format = opts.get_str("encrypt.format");
    let on = opts.get_bool("encryption", false)?;
    if on && format.is_some() {
        return Err(Error::invalid_argument(
            "'encrypt.format' and its alias 'encryption' can't be used at the same time",
        ));
    }
    match format {
        Some("aes") => {}
        Some(_) => return Err(Error::invalid_argument("Unsupported encryption format")),
        None if on => {}
        None => {
            if opts.keys().any(|k| k.starts_with("encrypt.")) {
                return Err(Error::invalid_argument(
                    "Parameter 'encrypt.format' is missing",
                ));
            }
            return Ok(None);
        }
    }
    AesKey::from_secret(opts.get_str("encrypt.key-secret")).map(Some)
}

/// A legacy AES-encrypted qcow or qcow2 image: the format's reader, decrypting.
pub struct AesReader {
    inner: Arc<dyn ImageReader>,
    /// `None` when opened for metadata only (`info` needs no key, as with qemu-img).
    key: Option<Arc<AesKey>>,
    view: OnceLock<Arc<dyn Storage>>,
}

impl AesReader {
    /// Wraps `inner` (a reader that maps the encrypted image as a plain one). Without
    /// `metadata_only`, the key is required now, as qemu-img requires it at open.
    pub fn new(
        inner: Box<dyn ImageReader>,
        key_secret: Option<&str>,
        metadata_only: bool,
    ) -> Result<AesReader> {
        let key = match metadata_only {
            true => None,
            false => Some(Arc::new(AesKey::from_secret(key_secret)?)),
        };
        Ok(AesReader {
            inner: Arc::from(inner),
            key,
            view: OnceLock::new(),
        })
    }

    fn view(&self) -> Option<&Arc<dyn Storage>> {
        let key = self.key.as_ref()?;
        Some(self.view.get_or_init(|| {
            Arc::new(GuestView {
                inner: self.inner.clone(),
                key: key.clone(),
            })
        }))
    }
}

impl ImageReader for AesReader {
    fn format(&self) -> Format {
        self.inner.format()
    }
    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }
    fn cluster_size(&self) -> Option<u64> {
        self.inner.cluster_size()
    }
    fn map(&self, offset: GuestOffset, max_len: u64) -> Result<Extent> {
        if self.key.is_none() {
            return Err(LuksError::NoSecret { prefix: "encrypt." }.into());
        }
        let e = self.inner.map(offset, max_len)?;
        Ok(match e.kind {
            // The view addresses guest bytes: guest start + i is view offset start + i.
            MapKind::Data { .. } => Extent {
                kind: MapKind::Data {
                    file: VIEW,
                    offset: HostOffset(e.start.0),
                },
                ..e
            },
            _ => e,
        })
    }
    fn file(&self, id: FileId) -> Option<&Arc<dyn Storage>> {
        match id {
            VIEW => self.view(),
            _ => self.inner.file(id),
        }
    }
    fn files(&self) -> Vec<Arc<dyn Storage>> {
        self.inner.files()
    }
    fn allocated_size(&self) -> Option<u64> {
        self.inner.allocated_size()
    }
    fn backing(&self) -> Option<&BackingRef> {
        self.inner.backing()
    }
    fn link_identity(&self, what: &str) -> Option<String> {
        self.inner.link_identity(what)
    }
    fn external_refs(&self) -> Vec<ExternalRef> {
        self.inner.external_refs()
    }
    fn encrypted(&self) -> bool {
        true
    }
    fn dirty(&self) -> bool {
        self.inner.dirty()
    }
    fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.inner.snapshots()
    }
    fn load_snapshot(&mut self, id: Option<&str>, name: Option<&str>) -> Result<()> {
        // The view shares the inner reader once it exists; snapshots are loaded before.
        self.view = OnceLock::new();
        match Arc::get_mut(&mut self.inner) {
            Some(r) => r.load_snapshot(id, name),
            None => Err(Error::unsupported(
                "cannot load a snapshot of an AES-encrypted image that is being read",
            )),
        }
    }
    fn format_specific(&self) -> Option<FormatSpecific> {
        let mut fs = self.inner.format_specific()?;
        if fs.kind != "qcow2" {
            return Some(fs);
        }
        // qemu-img's place for the block: after `refcount-bits`.
        let mut enc = serde_json::Map::new();
        enc.insert("format".into(), serde_json::json!("aes"));
        let mut data = serde_json::Map::new();
        let mut placed = false;
        for (k, v) in std::mem::take(&mut fs.data) {
            let after = k == "refcount-bits";
            data.insert(k, v);
            if after {
                data.insert("encrypt".into(), serde_json::Value::Object(enc.clone()));
                placed = true;
            }
        }
        if !placed {
            data.insert("encrypt".into(), serde_json::Value::Object(enc));
        }
        fs.data = data;
        Some(fs)
    }
    fn zero_location(&self, e: &Extent) -> Option<(FileId, HostOffset)> {
        self.inner.zero_location(e)
    }
    fn persistent_bitmaps(&self) -> Option<Vec<(String, u64)>> {
        self.inner.persistent_bitmaps()
    }
    fn child_nodes(&self) -> Vec<ChildNode> {
        self.inner.child_nodes()
    }
    fn reports_allocation(&self) -> bool {
        self.inner.reports_allocation()
    }
    fn map_probes_host_holes(&self) -> bool {
        // Block status of an encrypted image carries no host offset, so qemu never looks
        // at the host file under it.
        false
    }
    fn warnings(&self) -> Vec<String> {
        self.inner.warnings()
    }
    fn check(&self) -> Result<crate::check::CheckReport> {
        self.inner.check()
    }
}

/// The decrypted data clusters of an AES image, addressed by guest offset: a read maps
/// its range through the inner reader, reads the ciphertext where the map says and
/// decrypts it with the guest sector numbers. Asked only for ranges [`AesReader::map`]
/// reported as data.
struct GuestView {
    inner: Arc<dyn ImageReader>,
    key: Arc<AesKey>,
}

impl std::fmt::Debug for GuestView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AES-decrypted guest view")
    }
}

fn io_err(e: Error) -> io::Error {
    io::Error::other(e.to_string())
}

impl GuestView {
    /// Reads and decrypts the whole sectors `[first, first + tmp.len())` (guest offsets).
    fn read_sectors(&self, tmp: &mut [u8], first: u64) -> io::Result<()> {
        let mut pos = 0usize;
        while pos < tmp.len() {
            let g = first + pos as u64;
            let e = self
                .inner
                .map(GuestOffset(g), (tmp.len() - pos) as u64)
                .map_err(io_err)?;
            // Whole sectors of this extent (the image ends on a sector; extents of the
            // cluster formats start and end on sectors).
            let n = (e.len.div_ceil(SECTOR64) * SECTOR64).min((tmp.len() - pos) as u64) as usize;
            let part = &mut tmp[pos..pos + n];
            match e.kind {
                MapKind::Data { file, offset } => {
                    let f = self.inner.file(file).ok_or_else(|| {
                        io::Error::other(format!("AES image: no file {} for guest {g:#x}", file.0))
                    })?;
                    // A cluster that runs past the end of the file reads as zeros there,
                    // as qemu's file layer pads.
                    let mut got = 0;
                    while got < n {
                        let k = f.read_at(&mut part[got..], offset.0 + got as u64)?;
                        if k == 0 {
                            break;
                        }
                        got += k;
                    }
                    part[got..].fill(0);
                    self.key.apply(g, part, false).map_err(io_err)?;
                }
                _ => {
                    return Err(io::Error::other(format!(
                        "AES image: guest offset {g:#x} is not a data cluster"
                    )))
                }
            }
            pos += n;
        }
        Ok(())
    }
}

impl Storage for GuestView {
    fn len(&self) -> u64 {
        self.inner.virtual_size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let len = self.len();
        if offset >= len || buf.is_empty() {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(len - offset) as usize;
        let first = offset / SECTOR64 * SECTOR64;
        let skip = (offset - first) as usize;
        let span = (skip + want).div_ceil(SECTOR) * SECTOR;
        let mut tmp = Zeroizing::new(vec![0u8; span]);
        self.read_sectors(&mut tmp, first)?;
        buf[..want].copy_from_slice(&tmp[skip..skip + want]);
        Ok(want)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_the_passphrase_padded_or_cut_to_16_bytes() {
        let mut a = [0u8; 512];
        let mut b = [0u8; 512];
        AesKey::from_passphrase(b"secret")
            .apply(512, &mut a, true)
            .unwrap();
        AesKey::from_passphrase(b"secret\0\0\0")
            .apply(512, &mut b, true)
            .unwrap();
        assert_eq!(a, b);
        let mut c = [0u8; 512];
        let mut d = [0u8; 512];
        AesKey::from_passphrase(b"0123456789abcdefXX")
            .apply(0, &mut c, true)
            .unwrap();
        AesKey::from_passphrase(b"0123456789abcdef")
            .apply(0, &mut d, true)
            .unwrap();
        assert_eq!(c, d);
        // The IV is the sector number: another sector, other bytes; decrypts back.
        let mut e = [0u8; 512];
        let k = AesKey::from_passphrase(b"secret");
        k.apply(0, &mut e, true).unwrap();
        assert_ne!(a, e);
        k.apply(0, &mut e, false).unwrap();
        assert_eq!(e, [0u8; 512]);
        assert!(k.apply(100, &mut e, true).is_err());
    }
}
