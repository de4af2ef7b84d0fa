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
//! The format's readers map the image as for a plain one; [`reader`] puts them behind the
//! one decrypting reader ([`crate::formats::cluster_crypt::DecryptingReader`]), with guest
//! sectors as IVs. Compressed extents pass through unchanged.
//!
//! QEMU keeps this method only to get data out of old images ("broken by design"); vimg
//! reads and writes it for compatibility with qemu-img, which still does.

use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::formats::cluster_crypt::{ClusterCipher, DecryptingReader};
use crate::formats::luks::crypto::{CipherSpec, IvGen, Mode, SectorCipher, SECTOR};
use crate::mapping::ImageReader;

/// Header `crypt_method` of the legacy AES encryption (qcow and qcow2).
pub const CRYPT_AES: u32 = 1;

/// Bytes of a sector (the unit of encryption and of the IV count), as u64.
const SECTOR64: u64 = SECTOR as u64;

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

/// A legacy AES-encrypted qcow or qcow2 image: `inner` (a reader that maps the image as a
/// plain one) behind the one decrypting reader, with guest sectors as IVs. Without
/// `metadata_only`, the key is required now, as qemu-img requires it at open. `info` is
/// the `encrypt` block qcow2's format-specific information shows.
pub fn reader(
    inner: Box<dyn ImageReader>,
    key_secret: Option<&str>,
    metadata_only: bool,
    info: Option<serde_json::Map<String, serde_json::Value>>,
) -> Result<DecryptingReader> {
    let cipher = match metadata_only {
        true => None,
        false => Some(ClusterCipher::Guest(AesKey::from_secret(key_secret)?)),
    };
    Ok(DecryptingReader::new(inner, cipher, info))
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
