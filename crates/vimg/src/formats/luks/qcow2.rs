//! qcow2 with `encrypt.format=luks` (QEMU's docs/interop/qcow2.txt, "Full disk encryption
//! header pointer" extension 0x0537be77 and crypt_method 2): a LUKS1 header with its key
//! slots stored in clusters of the qcow2 file, and every data cluster encrypted in
//! 512-byte sectors whose IV counts sectors of the *host file* (QEMU's
//! `crypt_physical_offset`), not of the guest.
//!
//! The qcow2 reader does the tables as for any qcow2 image; this wrapper unlocks the LUKS
//! header (`encrypt.key-secret`) and hands out, as the image's file 0, a view of the qcow2
//! file that decrypts what it reads. Metadata reads of the qcow2 reader go to the plain
//! file. Read only: vimg refuses to create encrypted qcow2 images.

use std::sync::Arc;

use serde_json::{json, Value};

use super::error::LuksError;
use super::read::{DecryptedPayload, Parsed};
use crate::error::{Error, Result};
use crate::formats::qcow2::header::{parse_extensions, Header};
use crate::formats::qcow2::Qcow2Reader;
use crate::formats::{Format, OpenContext};
use crate::mapping::{
    BackingRef, ChildNode, Extent, ExternalRef, FileId, FormatSpecific, GuestOffset, HostOffset,
    ImageReader, SnapshotInfo,
};
use crate::storage::{SliceStorage, Storage};

/// qcow2 `crypt_method` of LUKS encryption.
pub const CRYPT_LUKS: u32 = 2;

/// The LUKS header location of a qcow2 image with crypt_method 2, or `None` for any other
/// qcow2 image (which the qcow2 reader then handles, or refuses, alone).
pub fn luks_header_location(storage: &dyn Storage) -> Result<Option<(u64, u64)>> {
    let mut head = vec![0u8; storage.len().min(4096) as usize];
    storage
        .read_exact_at(&mut head, 0)
        .map_err(|e| Error::io("read the qcow2 header", e))?;
    let Ok(h) = Header::parse(&head) else {
        return Ok(None);
    };
    if h.crypt_method != CRYPT_LUKS {
        return Ok(None);
    }
    let cs = h.cluster_size();
    let end = if h.backing_file_offset != 0 {
        h.backing_file_offset
    } else {
        cs
    };
    let end = end.min(storage.len()).max(head.len() as u64);
    let mut first = vec![0u8; end as usize];
    let n = storage.len().min(end) as usize;
    storage
        .read_exact_at(&mut first[..n], 0)
        .map_err(|e| Error::io("read the qcow2 header extensions", e))?;
    let exts = parse_extensions(&first, h.len(), end as usize, cs)?;
    match exts.crypto {
        Some(loc) => Ok(Some(loc)),
        None => Err(Error::invalid(
            "Missing CRYPTO header for crypt method 2 (header crypt_method is 2, LUKS, but there is no full disk encryption header extension 0x0537be77)",
        )),
    }
}

/// An encrypted qcow2 image.
pub struct EncryptedQcow2 {
    inner: Qcow2Reader,
    parsed: Parsed,
    /// The qcow2 file decrypting; `None` when opened for metadata only.
    plain: Option<Arc<dyn Storage>>,
}

impl EncryptedQcow2 {
    /// Opens `storage`, whose LUKS header lies at `loc` (from [`luks_header_location`]).
    pub fn open(storage: Arc<dyn Storage>, ctx: &OpenContext, loc: (u64, u64)) -> Result<Self> {
        let (offset, len) = loc;
        let window = SliceStorage::new(storage.clone(), offset, len, "LUKS header").map_err(|_| {
            Error::corrupt(format!(
                "qcow2 encryption header {offset:#x}+{len:#x} lies past the end of the file ({:#x} bytes)",
                storage.len()
            ))
        })?;
        let parsed = Parsed::read(&window)?;
        // `info` never unlocks (qemu-img opens without I/O).
        let plain = match ctx.metadata_only {
            true => None,
            false => {
                let id = &ctx.key_secret;
                let (id, secret) = super::open::secret_passphrase(id.as_deref(), "encrypt.")?;
                let pw = super::open::passphrase(&id, &secret)?;
                let key =
                    super::open::unlock(&parsed.header, parsed.spec, parsed.hash, &window, pw)?;
                let p: Arc<dyn Storage> = Arc::new(DecryptedPayload::new(
                    storage.clone(),
                    0,
                    storage.len(),
                    parsed.spec,
                    &key,
                ));
                Some(p)
            }
        };
        let mut inner_ctx = ctx.clone();
        inner_ctx.qcow2_luks = true;
        let inner = Qcow2Reader::open(storage, &inner_ctx)?;
        Ok(EncryptedQcow2 {
            inner,
            parsed,
            plain,
        })
    }
}

impl ImageReader for EncryptedQcow2 {
    fn format(&self) -> Format {
        Format::Qcow2
    }
    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }
    fn cluster_size(&self) -> Option<u64> {
        self.inner.cluster_size()
    }
    fn map(&self, offset: GuestOffset, max_len: u64) -> Result<Extent> {
        if self.plain.is_none() {
            return Err(LuksError::NoSecret { prefix: "encrypt." }.into());
        }
        self.inner.map(offset, max_len)
    }
    fn file(&self, id: FileId) -> Option<&Arc<dyn Storage>> {
        match id.0 {
            0 => self.plain.as_ref(),
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
        self.inner.load_snapshot(id, name)
    }
    fn format_specific(&self) -> Option<FormatSpecific> {
        let mut fs = self.inner.format_specific()?;
        // qemu-img's order: the LUKS block with `format` after `uuid`, placed after
        // `refcount-bits`.
        let mut enc = serde_json::Map::new();
        for (k, v) in self.parsed.info(Some(false)) {
            let uuid = k == "uuid";
            enc.insert(k, v);
            if uuid {
                enc.insert("format".into(), json!("luks"));
            }
        }
        let mut data = serde_json::Map::new();
        let mut placed = false;
        for (k, v) in std::mem::take(&mut fs.data) {
            let after = k == "refcount-bits";
            data.insert(k, v);
            if after {
                data.insert("encrypt".into(), Value::Object(enc.clone()));
                placed = true;
            }
        }
        if !placed {
            data.insert("encrypt".into(), Value::Object(enc));
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
    fn warnings(&self) -> Vec<String> {
        self.inner.warnings()
    }
    fn check(&self) -> Result<crate::check::CheckReport> {
        self.inner.check()
    }
}
