//! qcow2 with `encrypt.format=luks` (QEMU's docs/interop/qcow2.txt, "Full disk encryption
//! header pointer" extension 0x0537be77 and crypt_method 2): a LUKS1 header with its key
//! slots stored in clusters of the qcow2 file, and every data cluster encrypted in
//! 512-byte sectors whose IV counts sectors of the *host file* (QEMU's
//! `crypt_physical_offset`), not of the guest.
//!
//! The qcow2 reader does the tables as for any qcow2 image; [`open`] unlocks the LUKS
//! header (`encrypt.key-secret`) and puts the reader behind the one decrypting reader
//! ([`crate::formats::cluster_crypt::DecryptingReader`]), which decrypts data clusters with
//! host sectors as IVs. [`unlock_cipher`] gives the in-place updater the same cipher.

use std::sync::Arc;

use serde_json::json;

use super::crypto::SectorCipher;
use super::read::Parsed;
use crate::error::{Error, Result};
use crate::formats::cluster_crypt::{ClusterCipher, DecryptingReader};
use crate::formats::qcow2::header::{parse_extensions, Header};
use crate::formats::qcow2::Qcow2Reader;
use crate::formats::OpenContext;
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

/// The LUKS header of `storage` at `loc` (from [`luks_header_location`]), parsed.
fn parse_at(storage: &Arc<dyn Storage>, loc: (u64, u64)) -> Result<(Parsed, SliceStorage)> {
    let (offset, len) = loc;
    let window = SliceStorage::new(storage.clone(), offset, len, "LUKS header").map_err(|_| {
        Error::corrupt(format!(
            "qcow2 encryption header {offset:#x}+{len:#x} lies past the end of the file ({:#x} bytes)",
            storage.len()
        ))
    })?;
    let parsed = Parsed::read(&window)?;
    Ok((parsed, window))
}

/// Unlocks the LUKS header at `loc` with the secret `key_secret` names: the image's data
/// cipher (host sectors as IVs).
pub fn unlock_cipher(
    storage: &Arc<dyn Storage>,
    loc: (u64, u64),
    key_secret: Option<&str>,
) -> Result<ClusterCipher> {
    let (parsed, window) = parse_at(storage, loc)?;
    unlock_parsed(&parsed, &window, key_secret)
}

fn unlock_parsed(
    parsed: &Parsed,
    window: &SliceStorage,
    key_secret: Option<&str>,
) -> Result<ClusterCipher> {
    let (id, secret) = super::open::secret_passphrase(key_secret, "encrypt.")?;
    let pw = super::open::passphrase(&id, &secret)?;
    let key = super::open::unlock(&parsed.header, parsed.spec, parsed.hash, window, pw)?;
    Ok(ClusterCipher::Host(SectorCipher::new(parsed.spec, &key)))
}

/// Opens `storage`, whose LUKS header lies at `loc` (from [`luks_header_location`]): the
/// qcow2 reader behind the one decrypting reader. `info` never unlocks (qemu-img opens
/// without I/O).
pub fn open(
    storage: Arc<dyn Storage>,
    ctx: &OpenContext,
    loc: (u64, u64),
) -> Result<DecryptingReader> {
    let (parsed, window) = parse_at(&storage, loc)?;
    let cipher = match ctx.metadata_only {
        true => None,
        false => Some(unlock_parsed(&parsed, &window, ctx.key_secret.as_deref())?),
    };
    // qemu-img's order: the LUKS block with `format` after `uuid`.
    let mut enc = serde_json::Map::new();
    for (k, v) in parsed.info(Some(false)) {
        let uuid = k == "uuid";
        enc.insert(k, v);
        if uuid {
            enc.insert("format".into(), json!("luks"));
        }
    }
    let mut inner_ctx = ctx.clone();
    inner_ctx.qcow2_luks = true;
    let inner = Qcow2Reader::open(storage, &inner_ctx)?;
    Ok(DecryptingReader::new(Box::new(inner), cipher, Some(enc)))
}
