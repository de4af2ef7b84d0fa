//! Unlocking a LUKS1 volume (LUKS1 spec section 2.5, "Recovering the master key"): for each
//! active key slot, derive a key from the passphrase with PBKDF2, decrypt the slot's key
//! material with it, merge the stripes (AFmerge) and keep the candidate whose PBKDF2 digest
//! matches the header's `mk-digest`.
//!
//! The work is bounded before it starts: [`super::header::Header::validate`] caps each
//! iteration count and their sum over the active slots, and the key material is
//! `key-bytes * 4000` bytes, at most 250 KiB.

use zeroize::Zeroizing;

use super::crypto::{af_merge, CipherSpec, Hash, SectorCipher};
use super::error::LuksError;
use super::header::{Header, DIGEST_LEN, SECTOR, STRIPES};
use crate::error::{Error, Result};
use crate::storage::Storage;

/// The passphrase qemu derives from a secret: its bytes up to the first NUL (QEMU passes
/// the secret as a C string), which must be UTF-8.
pub fn passphrase<'a>(id: &str, secret: &'a [u8]) -> Result<&'a [u8], LuksError> {
    let end = secret.iter().position(|b| *b == 0).unwrap_or(secret.len());
    let pw = &secret[..end];
    std::str::from_utf8(pw).map_err(|_| LuksError::SecretNotUtf8(id.to_string()))?;
    Ok(pw)
}

/// Finds the volume key that `password` unlocks.
pub fn unlock(
    h: &Header,
    spec: CipherSpec,
    hash: Hash,
    storage: &dyn Storage,
    password: &[u8],
) -> Result<Zeroizing<Vec<u8>>> {
    for i in 0..h.slots.len() {
        if let Some(key) = try_slot(h, spec, hash, storage, i, password)? {
            return Ok(key);
        }
    }
    Err(LuksError::BadPassword.into())
}

/// The volume key when key slot `i` is active and `password` opens it (QEMU's
/// `qcrypto_block_luks_load_key`); `None` for an inactive slot or another passphrase.
pub fn try_slot(
    h: &Header,
    spec: CipherSpec,
    hash: Hash,
    storage: &dyn Storage,
    i: usize,
    password: &[u8],
) -> Result<Option<Zeroizing<Vec<u8>>>> {
    let Some(slot) = h.slots.get(i).filter(|s| s.is_active()) else {
        return Ok(None);
    };
    let kb = spec.key_bytes;
    let mut material = Zeroizing::new(vec![0u8; h.material_len() as usize]);
    let mut slot_key = Zeroizing::new(vec![0u8; kb]);
    hash.pbkdf2(password, &slot.salt, slot.iterations, &mut slot_key);
    let at = u64::from(slot.key_offset) * SECTOR;
    storage.read_exact_at(&mut material, at).map_err(|e| {
        Error::io(
            format_args!("read key slot {i}'s key material at {at:#x}"),
            e,
        )
    })?;
    // The area is whole sectors (cryptsetup pads the split key to a sector); the
    // stripes are its first key-bytes * 4000 bytes.
    SectorCipher::new(spec, &slot_key).apply(0, &mut material, false);
    let key = af_merge(
        hash,
        &material[..kb * STRIPES as usize],
        kb,
        STRIPES as usize,
    );
    let mut digest = [0u8; DIGEST_LEN];
    hash.pbkdf2(&key, &h.mk_digest_salt, h.mk_digest_iter, &mut digest);
    Ok((digest == h.mk_digest).then_some(key))
}

/// The passphrase of secret `id`, or the error qemu-img gives. `prefix` is the option
/// prefix qemu names in its message (`encrypt.` for qcow2).
pub fn secret_passphrase(
    id: Option<&str>,
    prefix: &'static str,
) -> Result<(String, std::sync::Arc<Zeroizing<Vec<u8>>>)> {
    let id = id.ok_or(LuksError::NoSecret { prefix })?;
    let s = crate::secret::lookup(id).ok_or_else(|| LuksError::UnknownSecret(id.to_string()))?;
    passphrase(id, &s)?;
    Ok((id.to_string(), s))
}
