//! The key of an encrypted qcow2 image opened for writing, and what vimg refuses to change
//! in one (the updater and the table rebuild ask here; `crypt.rs` reads and writes the
//! clusters with the key). Zeros written unencrypted into an encrypted image decrypt to
//! noise: a wrong result, so a refusal.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::formats::cluster_crypt::ClusterCipher;
use crate::formats::luks::qcow2::{luks_header_location, unlock_cipher};
use crate::formats::qcow::aes::AesKey;
use crate::formats::qcow2::aes::is_aes;
use crate::formats::OpenContext;
use crate::storage::Storage;

/// The cipher of the image in `storage` (`None` when it is not encrypted), unlocked with
/// the key the user bound to the file; sets `ctx` so that the qcow2 reader opens it.
pub(super) fn unlock(
    storage: &Arc<dyn Storage>,
    ctx: &mut OpenContext,
) -> Result<Option<Arc<ClusterCipher>>> {
    let key = ctx
        .key_secret
        .clone()
        .or_else(|| storage.identity().and_then(crate::secret::file_key));
    if let Some(loc) = luks_header_location(&**storage)? {
        ctx.qcow2_luks = true;
        let c = unlock_cipher(storage, loc, key.as_deref())?;
        return Ok(Some(Arc::new(c)));
    }
    if is_aes(&**storage)? {
        ctx.legacy_aes = true;
        let c = ClusterCipher::Guest(AesKey::from_secret(key.as_deref())?);
        return Ok(Some(Arc::new(c)));
    }
    Ok(None)
}

/// The payload of the LUKS header pointer extension kept in a rewritten header.
pub(super) fn extension(crypto: Option<(u64, u64)>) -> Option<[u8; 16]> {
    let (off, len) = crypto?;
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&off.to_be_bytes());
    b[8..].copy_from_slice(&len.to_be_bytes());
    Some(b)
}

/// `amend -o compat=0.10` over zero clusters of an encrypted image: QEMU expands them into
/// clusters of plain zeros, which decrypt to noise; vimg refuses (a wrong result is worse
/// than a refusal).
pub(super) fn refuse_expand(encrypted: bool) -> Result<()> {
    if encrypted {
        return Err(Error::unsupported(
            "vimg does not downgrade an encrypted qcow2 image with zero clusters: version 2 \
             has none, and clusters of plain zeros would decrypt to noise",
        ));
    }
    Ok(())
}

/// `resize` over a longer backing file with an old size inside a cluster: the fresh last
/// cluster is written by the table switch, unencrypted; refused for encrypted images.
pub(super) fn refuse_partial_zeroing(encrypted: bool) -> Result<()> {
    if encrypted {
        return Err(Error::unsupported(
            "vimg does not grow an encrypted qcow2 image over a longer backing file when its \
             old size ends inside a cluster",
        ));
    }
    Ok(())
}
