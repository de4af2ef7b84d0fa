//! LUKS: the Linux Unified Key Setup volume format, read and written as QEMU's `luks`
//! driver (crypto/block-luks.c) does: LUKS1 (LUKS1 On-Disk Format Specification 1.2.3),
//! eight PBKDF2 key slots with 4000 anti-forensic stripes, the payload encrypted in
//! 512-byte sectors.
//!
//! - [`header`]: the partition header and key slots (spec section 2.4), parse/write, and
//!   the checks every number from disk passes before it sizes a read or a loop.
//! - [`crypto`]: hashes, PBKDF2, AFsplit/AFmerge (section 2.4), AES in XTS/CBC/ECB with
//!   plain, plain64 and ESSIV IVs, all from RustCrypto crates.
//! - [`open`]: finding the volume key from a passphrase (section 2.5).
//! - [`read`]: the reader, which decrypts the payload on the fly.
//! - [`write`]: creating a volume as `qemu-img create -f luks` does (section 2.3).
//!
//! The passphrase comes from `--object secret,id=ID,...` named by `key-secret=ID` (in
//! `--image-opts`/`json:` to read, `-o` to create). Without one, the volume opens for
//! `info` only; reading fails with qemu-img's "Parameter 'key-secret' is required for
//! cipher".
//!
//! # Bounds on untrusted headers
//! Stripes must be 4000 and the key at most 64 bytes, so a slot's key material is at most
//! 250 KiB; it must lie after the header, before the payload and apart from the other
//! slots. PBKDF2 iteration counts are capped at [`MAX_ITERATIONS`] per slot and for the
//! master-key digest, and at [`MAX_TOTAL_ITERATIONS`] for every active slot together
//! (each attempt costs its slot's iterations plus the digest's): a wrong passphrase
//! against a hostile header costs at most about a minute on a 2020s core, not the hours
//! eight slots of 2^32 iterations would. qemu-img's own default (2 s of PBKDF2 per slot on
//! the creating machine) is a few million iterations, far inside the bound.
//!
//! LUKS2 headers are recognised and refused by name: QEMU does not read them either.

pub mod amend;
pub mod crypto;
pub mod error;
pub mod header;
pub mod open;
pub mod qcow2;
pub mod read;
pub mod update;
pub mod write;

use std::sync::Arc;

use crate::error::Result;
use crate::formats::{Format, OpenContext};
use crate::mapping::ImageReader;
use crate::options::{CreateOptions, OptionSpec, OptionType};
use crate::output::Output;
use crate::storage::Storage;
use crate::writer::ImageWriter;

pub use error::LuksError;
pub use header::{MAX_ITERATIONS, MAX_TOTAL_ITERATIONS};
pub use open::secret_passphrase;
pub use read::{DecryptedPayload, LuksReader, Parsed};

/// `luks`'s create options, in qemu-img's order.
pub const CREATE_OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        name: "cipher-alg",
        ty: OptionType::Str,
        help: "Name of encryption cipher algorithm",
    },
    OptionSpec {
        name: "cipher-mode",
        ty: OptionType::Str,
        help: "Name of encryption cipher mode",
    },
    OptionSpec {
        name: "detached-header",
        ty: OptionType::Bool,
        help: "Create a detached LUKS header",
    },
    OptionSpec {
        name: "hash-alg",
        ty: OptionType::Str,
        help: "Name of encryption hash algorithm",
    },
    OptionSpec {
        name: "iter-time",
        ty: OptionType::Number,
        help: "Time to spend in PBKDF in milliseconds",
    },
    OptionSpec {
        name: "ivgen-alg",
        ty: OptionType::Str,
        help: "Name of IV generator algorithm",
    },
    OptionSpec {
        name: "ivgen-hash-alg",
        ty: OptionType::Str,
        help: "Name of IV generator hash algorithm",
    },
    OptionSpec {
        name: "key-secret",
        ty: OptionType::Str,
        help: "ID of the secret that provides the keyslot passphrase",
    },
    OptionSpec {
        name: "preallocation",
        ty: OptionType::Str,
        help: "Preallocation mode (allowed values: off, falloc, full)",
    },
];

/// The luks driver.
pub struct Driver;

impl crate::formats::Driver for Driver {
    fn format(&self) -> Format {
        Format::Luks
    }

    fn probe(&self, head: &[u8], storage: &dyn Storage) -> bool {
        crate::formats::unread::probe_luks(head, storage)
    }

    fn open(&self, storage: Arc<dyn Storage>, ctx: &OpenContext) -> Result<Box<dyn ImageReader>> {
        let mut head = [0u8; 8];
        if storage.read_exact_at(&mut head, 0).is_ok()
            && crate::formats::unread::luks_version(&head) == Some(2)
        {
            return Err(crate::Error::unsupported(
                "this is a LUKS2 image; vimg reads LUKS version 1 (as QEMU does); only '-f raw' copies its bytes as they are",
            ));
        }
        // `info` (metadata only) never unlocks, as qemu-img opens without I/O: a wrong
        // passphrase does not stop it.
        let secret = match ctx.metadata_only {
            true => None,
            false => Some(secret_passphrase(ctx.key_secret.as_deref(), "")?),
        };
        let pw = match &secret {
            Some((id, s)) => Some(open::passphrase(id, s)?),
            None => None,
        };
        Ok(Box::new(LuksReader::open(storage, pw)?))
    }

    fn create_options(&self) -> &'static [OptionSpec] {
        CREATE_OPTIONS
    }

    fn create(
        &self,
        out: &Output,
        size: u64,
        opts: &CreateOptions,
    ) -> Result<Box<dyn ImageWriter>> {
        Ok(Box::new(write::LuksWriter::create(out, size, opts)?))
    }

    fn measure(
        &self,
        size: u64,
        opts: &CreateOptions,
        _data: Option<&dyn crate::formats::DataSummary>,
    ) -> Result<crate::formats::Measure> {
        write::measure(size, opts)
    }
}
