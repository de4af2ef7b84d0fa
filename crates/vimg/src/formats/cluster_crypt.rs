//! Images whose data clusters are encrypted sector by sector: qcow2 with LUKS
//! (`encrypt.format=luks`, crypt_method 2) and qcow/qcow2 with the legacy AES
//! (crypt_method 1). QEMU's docs/interop/qcow2.txt, "Data encryption", and its
//! block/qcow2-threads.c `qcow2_co_encdec`: every 512-byte sector is encrypted with an IV
//! from a sector number, which counts
//!
//! - sectors of the **host** file (the data file when there is one) for LUKS (QEMU's
//!   `crypt_physical_offset`), with the LUKS header's cipher, mode and IV generator;
//! - sectors of the **guest** for the legacy AES (AES-128-CBC, plain64).
//!
//! Compressed, zero and unallocated clusters are not encrypted: QEMU reads a compressed
//! cluster without decrypting it and a zero cluster as zeros.
//!
//! [`ClusterCipher`] is the keyed cipher with its IV rule, shared by the writers (new
//! images and the in-place updater) and by the one decrypting reader, [`DecryptingReader`]:
//! it wraps the format's reader (which maps the image as a plain one) and hands out data
//! extents in a view addressed by guest offset that reads the ciphertext where the inner
//! map says and decrypts it.

use std::io;
use std::sync::{Arc, OnceLock};

use serde_json::{Map, Value};
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::formats::luks::crypto::{SectorCipher, SECTOR};
use crate::formats::luks::error::LuksError;
use crate::formats::qcow::aes::AesKey;
use crate::formats::Format;
use crate::mapping::{
    BackingRef, ChildNode, Extent, ExternalRef, FileId, FormatSpecific, GuestOffset, HostOffset,
    ImageReader, MapKind, SnapshotInfo,
};
use crate::storage::Storage;

/// Bytes of a sector, as u64.
const SECTOR64: u64 = SECTOR as u64;

/// The file id under which [`DecryptingReader`] hands out its decrypting view.
const VIEW: FileId = FileId(u16::MAX);

/// The keyed cipher of an encrypted image and the sectors its IVs count.
pub enum ClusterCipher {
    /// LUKS: the volume key; IVs count host sectors.
    Host(SectorCipher),
    /// The legacy AES: IVs count guest sectors.
    Guest(AesKey),
}

impl std::fmt::Debug for ClusterCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.write_str(match self {
            ClusterCipher::Host(_) => "ClusterCipher(host sectors)",
            ClusterCipher::Guest(_) => "ClusterCipher(guest sectors)",
        })
    }
}

impl ClusterCipher {
    /// Encrypts (`enc`) or decrypts `buf` (whole sectors) in place: its first byte is
    /// stored at host offset `host` and is guest offset `guest` (both sector aligned).
    pub fn apply(&self, host: u64, guest: u64, buf: &mut [u8], enc: bool) -> Result<()> {
        match self {
            ClusterCipher::Guest(k) => k.apply(guest, buf, enc),
            ClusterCipher::Host(c) => {
                if !host.is_multiple_of(SECTOR64) || !buf.len().is_multiple_of(SECTOR) {
                    return Err(Error::invalid_argument(format!(
                        "encrypted I/O of {} bytes at host offset {host:#x} is not whole sectors",
                        buf.len()
                    )));
                }
                c.apply(host / SECTOR64, buf, enc);
                Ok(())
            }
        }
    }
}

/// An encrypted image: the format's reader, decrypting its data clusters.
pub struct DecryptingReader {
    inner: Arc<dyn ImageReader>,
    /// `None` when opened for metadata only (`info` needs no key, as with qemu-img).
    cipher: Option<Arc<ClusterCipher>>,
    /// The `encrypt` block `info` shows for qcow2 (after `refcount-bits`); `None` shows none.
    info: Option<Map<String, Value>>,
    view: OnceLock<Arc<dyn Storage>>,
}

impl DecryptingReader {
    /// Wraps `inner` (a reader that maps the encrypted image as a plain one). `cipher` is
    /// `None` for a metadata-only open; `info` is the `encrypt` block of qcow2's format
    /// specific information.
    pub fn new(
        inner: Box<dyn ImageReader>,
        cipher: Option<ClusterCipher>,
        info: Option<Map<String, Value>>,
    ) -> DecryptingReader {
        DecryptingReader {
            inner: Arc::from(inner),
            cipher: cipher.map(Arc::new),
            info,
            view: OnceLock::new(),
        }
    }

    /// [`DecryptingReader::new`] with a cipher shared with a writer.
    pub fn shared(inner: Box<dyn ImageReader>, cipher: Arc<ClusterCipher>) -> DecryptingReader {
        DecryptingReader {
            inner: Arc::from(inner),
            cipher: Some(cipher),
            info: None,
            view: OnceLock::new(),
        }
    }

    fn view(&self) -> Option<&Arc<dyn Storage>> {
        let cipher = self.cipher.as_ref()?;
        Some(self.view.get_or_init(|| {
            Arc::new(GuestView {
                inner: self.inner.clone(),
                cipher: cipher.clone(),
            })
        }))
    }
}

impl ImageReader for DecryptingReader {
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
        if self.cipher.is_none() {
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
                "cannot load a snapshot of an encrypted image that is being read",
            )),
        }
    }
    fn format_specific(&self) -> Option<FormatSpecific> {
        let mut fs = self.inner.format_specific()?;
        let Some(enc) = self.info.clone().filter(|_| fs.kind == "qcow2") else {
            return Some(fs);
        };
        // qemu-img's place for the block: after `refcount-bits`.
        let mut data = Map::new();
        let mut enc = Some(enc);
        for (k, v) in std::mem::take(&mut fs.data) {
            let after = k == "refcount-bits";
            data.insert(k, v);
            if after {
                if let Some(e) = enc.take() {
                    data.insert("encrypt".into(), Value::Object(e));
                }
            }
        }
        if let Some(e) = enc {
            data.insert("encrypt".into(), Value::Object(e));
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

/// The decrypted data clusters of an encrypted image, addressed by guest offset: a read
/// maps its range through the inner reader, reads the ciphertext where the map says and
/// decrypts it. Asked only for ranges [`DecryptingReader::map`] reported as data.
struct GuestView {
    inner: Arc<dyn ImageReader>,
    cipher: Arc<ClusterCipher>,
}

impl std::fmt::Debug for GuestView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("decrypted guest view")
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
                        io::Error::other(format!(
                            "encrypted image: no file {} for guest {g:#x}",
                            file.0
                        ))
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
                    self.cipher
                        .apply(offset.0, g, part, false)
                        .map_err(io_err)?;
                }
                _ => {
                    return Err(io::Error::other(format!(
                        "encrypted image: guest offset {g:#x} is not a data cluster"
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
