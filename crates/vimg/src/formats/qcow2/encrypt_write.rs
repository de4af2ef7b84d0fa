//! Writing qcow2 with `encrypt.format=luks` as `qemu-img create/convert -O qcow2` does
//! (QEMU's docs/interop/qcow2.txt: header `crypt_method` 2, the "Full disk encryption
//! header pointer" extension 0x0537be77, "Data encryption"):
//!
//! - the LUKS1 header area (header, eight key slot areas, slot 0's key material) is made
//!   by the luks writer ([`crate::formats::luks::write::new_volume`], options under
//!   `encrypt.`, QEMU's defaults: aes-256, xts, plain64, sha256, 2000 ms) and stored in
//!   whole clusters of its own, the ones right after the L1 table, zero-padded;
//! - the header extension points at it (offset, length of the LUKS area unrounded), after
//!   the backing format and data file extensions, before the feature table;
//! - every data cluster is encrypted in 512-byte sectors whose IV is the sector number of
//!   the *host* offset (QEMU sets `crypt_physical_offset` for LUKS; only the legacy AES
//!   method counts guest sectors), in the data file when there is one;
//! - zeros written over an allocated cluster are encrypted like data; zero clusters of v3
//!   images stay zero flags (they read as zeros without decryption).
//!
//! The legacy `encrypt.format=aes` / `encryption=on` (header `crypt_method` 1, no header
//! extension, no key area) is written as qemu-img writes it: AES-128-CBC with the secret's
//! text as key and the **guest** sector as IV ([`crate::formats::qcow::aes`]).
//!
//! Refused, as qemu-img refuses: `-c` with encryption ("Compression and encryption not
//! supported at the same time"), `encryption` together with `encrypt.format` ("'encrypt.format'
//! and its alias 'encryption' can't be used at the same time"), LUKS options with AES.
//! `preallocation` with encryption: a preallocated cluster decrypts to noise until written,
//! so such an image does not start out reading zeros (QEMU's `qcow2_has_zero_init`).
//! `convert` then zeroes every range the source leaves unwritten as qemu-img's convert
//! does (zero flags, the preallocated clusters freed; iotest 188), and `finish` gives what
//! stays unwritten (all of it after `create`, where qemu-img leaves noise) the zero flag
//! over its allocation, or encrypted zeros in version 2 (`crypt_prealloc.rs`). Refused:
//! that with extended L2 entries, and `data_file_raw` with encryption.

use zeroize::Zeroizing;

use super::header::EXT_CRYPTO;
use super::write::{Prealloc, WriteOptions};
use crate::error::{Error, ErrorKind, Result};
use crate::formats::cluster_crypt::ClusterCipher;
use crate::formats::luks::write::{header_area_len, new_volume};
use crate::formats::qcow::aes::{AesKey, CRYPT_AES};
use crate::options::CreateOptions;

/// Header `crypt_method` of LUKS encryption.
pub const CRYPT_LUKS: u32 = 2;

/// Which encryption `-o` asks for: `Ok(true)` for LUKS or the legacy AES, `Ok(false)` for
/// none; unknown formats are refused.
pub fn requested(opts: &CreateOptions) -> Result<bool> {
    if is_aes(opts)? {
        return Ok(true);
    }
    requested_luks(opts)
}

/// True when `-o` asks for the legacy AES encryption (`encryption=on` or
/// `encrypt.format=aes`), checked as qemu-img checks it.
pub fn is_aes(opts: &CreateOptions) -> Result<bool> {
    let on = opts.get_bool("encryption", false)?;
    if on && opts.get_str("encrypt.format").is_some() {
        return Err(Error::invalid_argument(
            "'encrypt.format' and its alias 'encryption' can't be used at the same time",
        ));
    }
    let aes = on || opts.get_str("encrypt.format") == Some("aes");
    if aes {
        if let Some(k) = opts.keys().find(|k| {
            k.starts_with("encrypt.") && !matches!(*k, "encrypt.format" | "encrypt.key-secret")
        }) {
            return Err(Error::invalid_argument(format!(
                "Parameter '{k}' is unexpected"
            )));
        }
    }
    Ok(aes)
}

fn requested_luks(opts: &CreateOptions) -> Result<bool> {
    match opts.get_str("encrypt.format") {
        None => {
            if opts.keys().any(|k| k.starts_with("encrypt.")) {
                return Err(Error::invalid_argument(
                    "Parameter 'encrypt.format' is missing",
                ));
            }
            Ok(false)
        }
        Some("luks") => Ok(true),
        Some(other) => Err(Error::invalid_argument(format!(
            "Parameter 'format' does not accept value '{other}'"
        ))),
    }
}

/// Refuses option combinations that cannot go with encryption (after the other checks).
pub fn check_combination(o: &WriteOptions) -> Result<()> {
    if !o.encrypt {
        return Ok(());
    }
    if o.compress.is_some() {
        return Err(Error::refusal(
            ErrorKind::InvalidArgument,
            "Compression and encryption not supported at the same time",
        ));
    }
    if o.data_file_raw {
        return Err(Error::unsupported(
            "vimg does not write an encrypted qcow2 image over a raw data file (data_file_raw: \
             the data file would not hold the guest's bytes, and its preallocated clusters \
             would read as noise)",
        ));
    }
    if o.prealloc != Prealloc::Off && o.extended_l2 {
        return Err(Error::unsupported(
            "vimg does not preallocate encrypted qcow2 images with extended L2 entries \
             (qemu-img's convert zeroes their subclusters one by one, which vimg's writer \
             does not)",
        ));
    }
    Ok(())
}

/// Bytes `measure` adds for the LUKS area: its clusters (QEMU's `qcow2_measure`).
pub fn measure_extra(opts: &CreateOptions, cluster_size: u64) -> Result<u64> {
    if is_aes(opts)? {
        return Ok(0);
    }
    let len = header_area_len(opts, "encrypt.")?;
    Ok(len.div_ceil(cluster_size) * cluster_size)
}

/// The encryption of an image being written.
pub struct Crypt {
    /// The LUKS header area, until it is written.
    head: Option<Zeroizing<Vec<u8>>>,
    /// Its length (the extension's length field).
    len: u64,
    cipher: ClusterCipher,
}

impl Crypt {
    /// Makes the LUKS header area and volume key from the `encrypt.` options.
    pub fn new(opts: &CreateOptions) -> Result<Crypt> {
        if is_aes(opts)? {
            return Ok(Crypt {
                head: None,
                len: 0,
                cipher: ClusterCipher::Guest(AesKey::from_secret(
                    opts.get_str("encrypt.key-secret"),
                )?),
            });
        }
        let v = new_volume(opts, "encrypt.")?;
        Ok(Crypt {
            head: Some(v.head),
            len: v.payload,
            cipher: ClusterCipher::Host(v.cipher),
        })
    }

    /// The header's `crypt_method`.
    pub fn method(&self) -> u32 {
        match self.cipher {
            ClusterCipher::Host(_) => CRYPT_LUKS,
            ClusterCipher::Guest(_) => CRYPT_AES,
        }
    }

    /// Clusters the LUKS area takes.
    pub fn clusters(&self, cluster_size: u64) -> u64 {
        self.len.div_ceil(cluster_size)
    }

    /// The LUKS area, zero-padded to whole clusters, to write once; `None` afterwards.
    pub fn take_area(&mut self, cluster_size: u64) -> Option<Zeroizing<Vec<u8>>> {
        let mut h = self.head.take()?;
        let n = (self.clusters(cluster_size) * cluster_size) as usize;
        h.resize(n, 0);
        Some(h)
    }

    /// The header extension's payload: the area's offset and length.
    /// `None` for the legacy AES, which has no extension.
    pub fn extension(&self, offset: u64) -> Option<(u32, [u8; 16])> {
        if let ClusterCipher::Guest(_) = self.cipher {
            return None;
        }
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&offset.to_be_bytes());
        b[8..].copy_from_slice(&self.len.to_be_bytes());
        Some((EXT_CRYPTO, b))
    }

    /// `data`, guest bytes from guest offset `guest` to be stored at host offset `host`,
    /// encrypted (both sector aligned: data clusters are, and every write covers whole
    /// sectors). LUKS counts host sectors, the legacy AES guest sectors.
    pub fn encrypt(&self, host: u64, guest: u64, data: &[u8]) -> Result<Vec<u8>> {
        let mut buf = data.to_vec();
        self.cipher.apply(host, guest, &mut buf, true)?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_aes_is_requested_and_unknown_formats_are_refused() {
        let o = CreateOptions::new().with("encrypt.format", "aes");
        assert!(requested(&o).unwrap());
        assert!(is_aes(&o).unwrap());
        let o = CreateOptions::new().with("encryption", "on");
        assert!(requested(&o).unwrap());
        let o = CreateOptions::new()
            .with("encryption", "on")
            .with("encrypt.format", "aes");
        assert!(requested(&o).unwrap_err().to_string().contains("alias"));
        let o = CreateOptions::new()
            .with("encrypt.format", "aes")
            .with("encrypt.cipher-alg", "aes-128");
        assert!(requested(&o)
            .unwrap_err()
            .to_string()
            .contains("unexpected"));
        let o = CreateOptions::new().with("encrypt.format", "foo");
        assert!(requested(&o).unwrap_err().to_string().contains("'foo'"));
        let o = CreateOptions::new().with("encrypt.key-secret", "s");
        assert!(requested(&o).is_err());
        let o = CreateOptions::new().with("encryption", "off");
        assert!(!requested(&o).unwrap());
        let o = CreateOptions::new().with("encrypt.format", "luks");
        assert!(requested(&o).unwrap());
    }
}
