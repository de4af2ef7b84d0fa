//! qcow2 with the legacy AES encryption (header `crypt_method` 1, `encrypt.format=aes`;
//! QEMU's docs/interop/qcow2.txt "crypt_method"): read through the qcow2 reader behind the
//! one decrypting reader ([`crate::formats::cluster_crypt::DecryptingReader`]), with the
//! guest sector as IV. Written by the qcow2 writer with [`super::encrypt_write::Crypt`]'s
//! AES cipher, and in place by the updater with the same cipher.

use std::sync::Arc;

use super::header::Header;
use super::Qcow2Reader;
use crate::error::{Error, Result};
use crate::formats::qcow::aes::{reader, CRYPT_AES};
use crate::formats::OpenContext;
use crate::mapping::ImageReader;
use crate::storage::Storage;

/// True when `storage` holds a qcow2 header whose `crypt_method` is AES.
pub fn is_aes(storage: &dyn Storage) -> Result<bool> {
    let mut head = vec![0u8; storage.len().min(4096) as usize];
    storage
        .read_exact_at(&mut head, 0)
        .map_err(|e| Error::io("read the qcow2 header", e))?;
    Ok(Header::parse(&head).is_ok_and(|h| h.crypt_method == CRYPT_AES))
}

/// Opens an AES-encrypted qcow2 image (see [`is_aes`]): the key is required unless the
/// context opens for metadata only (`info`).
pub fn open(storage: Arc<dyn Storage>, ctx: &OpenContext) -> Result<Box<dyn ImageReader>> {
    let mut inner_ctx = ctx.clone();
    inner_ctx.legacy_aes = true;
    let inner = Qcow2Reader::open(storage, &inner_ctx)?;
    let mut info = serde_json::Map::new();
    info.insert("format".into(), serde_json::json!("aes"));
    Ok(Box::new(reader(
        Box::new(inner),
        ctx.key_secret.as_deref(),
        ctx.metadata_only,
        Some(info),
    )?))
}
