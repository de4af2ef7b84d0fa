//! Reading a LUKS1 volume: the header checked at open, the payload decrypted on the fly.
//!
//! The reader maps every guest byte to data in one file: a [`DecryptedPayload`] storage
//! that reads the payload's ciphertext and decrypts whole sectors, so the generic read
//! layer and the copy engine need no knowledge of encryption. Like qemu's crypto driver,
//! it reports no holes: a sector that was never written decrypts to whatever its
//! ciphertext (zeros on disk) decrypts to, which is what qemu-img shows.

use std::io;
use std::sync::Arc;

use serde_json::{json, Map, Value};
use zeroize::Zeroizing;

use super::crypto::{CipherSpec, Hash, IvGen, Mode, SectorCipher, SECTOR};
use super::error::LuksError;
use super::header::{Header, HEADER_LEN, SECTOR as SECTOR64};
use crate::error::{Error, Result};
use crate::formats::Format;
use crate::mapping::{
    Extent, FileId, FormatSpecific, GuestOffset, HostOffset, ImageReader, MapKind,
};
use crate::storage::Storage;

/// The header and the algorithms it names, checked.
pub struct Parsed {
    /// The header.
    pub header: Header,
    /// The payload cipher.
    pub spec: CipherSpec,
    /// The `hash-spec`.
    pub hash: Hash,
}

impl Parsed {
    /// Reads and checks the header of `storage`, and the algorithms it names.
    pub fn read(storage: &dyn Storage) -> Result<Parsed> {
        let len = storage.len();
        if len < HEADER_LEN as u64 {
            return Err(LuksError::TooShort {
                len,
                need: HEADER_LEN as u64,
            }
            .into());
        }
        let mut b = [0u8; HEADER_LEN];
        storage
            .read_exact_at(&mut b, 0)
            .map_err(|e| Error::io("read the LUKS header", e))?;
        Parsed::from_bytes(&b, len)
    }

    /// Parses and checks header bytes for a file of `len` bytes.
    pub fn from_bytes(b: &[u8], len: u64) -> Result<Parsed> {
        let header = Header::parse(b)?;
        header.validate(len)?;
        let (mode, ivgen) = match header.cipher_mode.split_once('-') {
            Some((m, g)) => (Mode::from_name(m)?, IvGen::from_spec(g)?),
            None => {
                return Err(LuksError::Algorithm {
                    what: "Cipher mode",
                    name: crate::escape::escape_control(&header.cipher_mode).into_owned(),
                }
                .into())
            }
        };
        let spec = CipherSpec::new(&header.cipher_name, header.key_bytes as usize, mode, ivgen)?;
        let hash = Hash::from_name(&header.hash_spec)?;
        Ok(Parsed { header, spec, hash })
    }

    /// qemu-img's `format-specific` data for this header, in qemu-img's key order.
    /// `detached_header` is `None` where qemu prints no such key (qcow2's encrypt block).
    pub fn info(&self, detached_header: Option<bool>) -> Map<String, Value> {
        let h = &self.header;
        let mut m = Map::new();
        m.insert("ivgen-alg".into(), json!(self.spec.ivgen.name()));
        if let Some(d) = detached_header {
            m.insert("detached-header".into(), json!(d));
        }
        m.insert("hash-alg".into(), json!(self.hash.name()));
        m.insert("cipher-alg".into(), json!(self.spec.alg_name()));
        m.insert("uuid".into(), json!(h.uuid_text()));
        if let IvGen::Essiv(hh) = self.spec.ivgen {
            m.insert("ivgen-hash-alg".into(), json!(hh.name()));
        }
        m.insert("cipher-mode".into(), json!(self.spec.mode.name()));
        let slots: Vec<Value> = h
            .slots
            .iter()
            .map(|s| {
                let key_offset = u64::from(s.key_offset) * SECTOR64;
                if s.is_active() {
                    json!({"active": true, "iters": s.iterations, "key-offset": key_offset, "stripes": s.stripes})
                } else {
                    json!({"active": false, "key-offset": key_offset})
                }
            })
            .collect();
        m.insert("slots".into(), Value::Array(slots));
        m.insert("payload-offset".into(), json!(h.payload_bytes()));
        m.insert("master-key-iters".into(), json!(h.mk_digest_iter));
        m
    }
}

/// The decrypted payload of a LUKS volume (or of an encrypted qcow2 cluster range) as a
/// [`Storage`]: offset 0 is the first payload byte; reads decrypt whole sectors, the IV of
/// sector `n` counting from `iv_base`.
pub struct DecryptedPayload {
    inner: Arc<dyn Storage>,
    start: u64,
    len: u64,
    cipher: SectorCipher,
}

impl DecryptedPayload {
    /// The payload of `inner` from `start`, `len` bytes long, decrypted with `key`.
    pub fn new(
        inner: Arc<dyn Storage>,
        start: u64,
        len: u64,
        spec: CipherSpec,
        key: &[u8],
    ) -> Self {
        DecryptedPayload {
            inner,
            start,
            len,
            cipher: SectorCipher::new(spec, key),
        }
    }

    /// The keyed cipher (for writers and qcow2).
    pub fn cipher(&self) -> &SectorCipher {
        &self.cipher
    }
}

impl std::fmt::Debug for DecryptedPayload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("DecryptedPayload")
            .field("start", &self.start)
            .field("len", &self.len)
            .finish()
    }
}

impl Storage for DecryptedPayload {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.len || buf.is_empty() {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(self.len - offset) as usize;
        let first = offset / SECTOR64;
        let skip = (offset % SECTOR64) as usize;
        let span = (skip + want).div_ceil(SECTOR) * SECTOR;
        let mut tmp = Zeroizing::new(vec![0u8; span]);
        let host = self.start + first * SECTOR64;
        // A partial last sector of the file reads as zeros past its end, as qemu's file
        // layer pads an aligned read.
        let mut got = 0;
        while got < span {
            let n = self.inner.read_at(&mut tmp[got..], host + got as u64)?;
            if n == 0 {
                break;
            }
            got += n;
        }
        self.cipher.apply(first, &mut tmp, false);
        buf[..want].copy_from_slice(&tmp[skip..skip + want]);
        Ok(want)
    }

    fn sequential_window(&self) -> Option<u64> {
        self.inner.sequential_window()
    }
}

/// An open LUKS1 volume.
pub struct LuksReader {
    storage: Arc<dyn Storage>,
    parsed: Parsed,
    size: u64,
    /// `None` when opened for metadata only (`info` without a key-secret).
    plain: Option<Arc<dyn Storage>>,
}

impl LuksReader {
    /// Opens `storage`; with `password`, unlocks it (else only `info` works).
    pub fn open(storage: Arc<dyn Storage>, password: Option<&[u8]>) -> Result<LuksReader> {
        let parsed = Parsed::read(&*storage)?;
        let start = parsed.header.payload_bytes();
        let size = storage.len() - start;
        let plain = match password {
            Some(pw) => {
                let key =
                    super::open::unlock(&parsed.header, parsed.spec, parsed.hash, &*storage, pw)?;
                let p: Arc<dyn Storage> = Arc::new(DecryptedPayload::new(
                    storage.clone(),
                    start,
                    size,
                    parsed.spec,
                    &key,
                ));
                Some(p)
            }
            None => None,
        };
        Ok(LuksReader {
            storage,
            parsed,
            size,
            plain,
        })
    }
}

impl ImageReader for LuksReader {
    fn reports_allocation(&self) -> bool {
        // qemu's driver has no block status: qemu-img maps everything as data.
        false
    }

    fn format(&self) -> Format {
        Format::Luks
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn map(&self, offset: GuestOffset, max_len: u64) -> Result<Extent> {
        if self.plain.is_none() {
            return Err(LuksError::NoSecret { prefix: "" }.into());
        }
        let len = max_len.min(self.size.saturating_sub(offset.0));
        Ok(Extent {
            start: offset,
            len,
            kind: MapKind::Data {
                file: FileId(1),
                offset: HostOffset(offset.0),
            },
        })
    }

    fn file(&self, id: FileId) -> Option<&Arc<dyn Storage>> {
        match id.0 {
            0 => Some(&self.storage),
            1 => self.plain.as_ref(),
            _ => None,
        }
    }

    fn files(&self) -> Vec<Arc<dyn Storage>> {
        vec![self.storage.clone()]
    }

    fn encrypted(&self) -> bool {
        true
    }

    fn format_specific(&self) -> Option<FormatSpecific> {
        Some(FormatSpecific {
            kind: "luks".into(),
            data: self.parsed.info(Some(false)),
        })
    }
}
