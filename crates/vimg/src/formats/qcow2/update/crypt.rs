//! Encrypted qcow2 images open for writing (docs/interop/qcow2.txt, "Data encryption";
//! QEMU's block/qcow2.c and qcow2-threads.c `qcow2_co_encdec`): the updater unlocks the
//! image's key at open and every data cluster it writes is encrypted with it, 512-byte
//! sectors with IVs counting host sectors (LUKS, QEMU's `crypt_physical_offset`) or guest
//! sectors (the legacy AES). Zero clusters stay zero flags, as QEMU writes them (they read
//! as zeros without decryption); a partly written cluster is read decrypted, merged and
//! written whole, encrypted for where it lands.
//!
//! The key (unlocked in `crypt_rules.rs`, with what vimg refuses on encrypted images):
//! the secret the user's command line bound to this file
//! ([`crate::secret::file_key`]: `encrypt.key-secret` in `--image-opts` or `json:` names,
//! `backing.encrypt.key-secret` for a backing file). Without it an encrypted image is
//! refused with qemu-img's words, before anything is written.

use std::sync::Arc;

use super::Qcow2Update;
use crate::error::Result;
use crate::formats::cluster_crypt::DecryptingReader;
use crate::formats::qcow2::Qcow2Reader;
use crate::formats::OpenContext;
use crate::gate::ExternalPolicy;
use crate::mapping::ImageReader;
use crate::storage::Storage;

impl Qcow2Update {
    /// A context in which the qcow2 reader opens this image (its tables; data reads of an
    /// encrypted image go through [`Self::reader_over`]).
    pub(super) fn reader_ctx(&self, policy: ExternalPolicy) -> OpenContext {
        let mut ctx = OpenContext::new(Some(&self.path), policy);
        ctx.qcow2_luks = self.header.crypt_method == 2;
        ctx.legacy_aes = self.header.crypt_method == 1;
        ctx.qcow2_snapshot_repair = self.snapshot_scan.as_ref().is_some_and(|s| s.dropped > 0);
        ctx
    }

    /// A reader of the image in `storage` (this file) that decrypts with this image's key.
    pub(super) fn reader_over(&self, storage: Arc<dyn Storage>) -> Result<Box<dyn ImageReader>> {
        let ctx = self.reader_ctx(ExternalPolicy::Deny);
        let r = Qcow2Reader::open(storage, &ctx)?;
        Ok(match &self.cipher {
            Some(c) => Box::new(DecryptingReader::shared(Box::new(r), c.clone())),
            None => Box::new(r),
        })
    }

    /// `data` (whole clusters) as stored at host offset `host` for guest offset `guest`:
    /// encrypted for an encrypted image, as it is otherwise.
    pub(super) fn stored<'a>(
        &self,
        host: u64,
        guest: u64,
        data: &'a [u8],
    ) -> Result<std::borrow::Cow<'a, [u8]>> {
        match &self.cipher {
            None => Ok(std::borrow::Cow::Borrowed(data)),
            Some(c) => {
                let mut buf = data.to_vec();
                c.apply(host, guest, &mut buf, true)?;
                Ok(std::borrow::Cow::Owned(buf))
            }
        }
    }

    /// True when the image is encrypted (its key unlocked).
    pub fn encrypted(&self) -> bool {
        self.cipher.is_some()
    }
}
