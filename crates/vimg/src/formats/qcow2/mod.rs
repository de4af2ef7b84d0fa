//! qcow2, QEMU's copy-on-write format, versions 2 and 3, as QEMU's
//! `docs/interop/qcow2.txt` specifies it.
//!
//! - `header.rs`: on-disk structures (header, extensions, table entries, refcounts).
//! - `open.rs`: opening (header, extensions, L1, refcount, snapshot and bitmap tables, checked).
//! - `read.rs`: the reader (L1/L2 walk with a bounded, checked L2 cache).
//! - `check.rs`: `vimg check` (refcount verification as `qemu-img check` counts it).
//! - `check_snapshots.rs`: the snapshot table as `qemu-img check` reads and repairs it.
//! - `refcount.rs`: the refcount allocator of a file being written.
//! - `write.rs`: the writer (parallel uncompressed writes, ordered compressed writes).
//! - `measure.rs`: `vimg measure` (QEMU's `qcow2_measure` arithmetic).
//! - `encrypt_write.rs`: writing with `encrypt.format=luks`.
//! - `update.rs`: changing an image in place (`check -r`, `resize`), crash-safe;
//!   `update/snapshot.rs` (internal snapshots) and `update/bitmap.rs` (persistent bitmaps).
//! - `update_data.rs`: guest-data writes into an image open for writing (`rebase`, `commit`).
//!
//! Strictness: every table size and offset is checked against the file and QEMU's limits;
//! an L1 or L2 entry with reserved bits, an unaligned offset, an offset past the end of the
//! file or inside the image's own metadata, or a host cluster that another guest cluster
//! already uses, is an error that names the table, the index and the value. QEMU accepts
//! several of these; vimg does not.

mod aes;
mod check;
pub mod check_snapshots;
mod crypt_prealloc;
mod encrypt_write;
pub mod error;
pub mod header;
mod measure;
mod meta;
mod open;
mod read;
mod refcount;
pub mod update;
mod write;

use std::sync::Arc;

use crate::error::Result;
use crate::formats::{printed, Capabilities, Streaming, Support};
use crate::formats::{DataSummary, Format, Measure, OpenContext};
use crate::mapping::ImageReader;
use crate::options::{CreateOptions, OptionSpec, OptionType};
use crate::output::Output;
use crate::storage::Storage;
use crate::writer::ImageWriter;

pub use read::{Bitmap, Qcow2Reader, Snapshot};
pub use update::bitmap::BitmapOp;
pub use update::snapshot::SNAPSHOT_NOT_FOUND;
pub use update::{Amend, ClusterOp, DataWriter, Prealloc, Qcow2Update, Repair, RepairReport};
pub use write::{Qcow2Writer, WriteOptions, DEFLATE_LEVEL, ZSTD_LEVEL};

/// The qcow2 driver.
pub struct Driver;

const fn opt(name: &'static str, ty: OptionType, help: &'static str) -> OptionSpec {
    OptionSpec { name, ty, help }
}

/// The options `qemu-img create -f qcow2 -o help` lists (QEMU 10.0), with its help text.
const OPTIONS: &[OptionSpec] = &[
    opt("backing_file", OptionType::Str, "File name of a base image"),
    opt(
        "backing_fmt",
        OptionType::Str,
        "Image format of the base image",
    ),
    opt("cluster_size", OptionType::Size, "qcow2 cluster size"),
    opt(
        "compat",
        OptionType::Str,
        "Compatibility level (v2 [0.10] or v3 [1.1])",
    ),
    opt(
        "compression_type",
        OptionType::Str,
        "Compression method used for image cluster compression",
    ),
    opt(
        "data_file",
        OptionType::Str,
        "File name of an external data file",
    ),
    opt(
        "data_file_raw",
        OptionType::Bool,
        "The external data file must stay valid as a raw image",
    ),
    opt(
        "encrypt.cipher-alg",
        OptionType::Str,
        "Name of encryption cipher algorithm",
    ),
    opt(
        "encrypt.cipher-mode",
        OptionType::Str,
        "Name of encryption cipher mode",
    ),
    opt(
        "encrypt.format",
        OptionType::Str,
        "Encrypt the image, format choices: 'aes', 'luks'",
    ),
    opt(
        "encrypt.hash-alg",
        OptionType::Str,
        "Name of encryption hash algorithm",
    ),
    opt(
        "encrypt.iter-time",
        OptionType::Number,
        "Time to spend in PBKDF in milliseconds",
    ),
    opt(
        "encrypt.ivgen-alg",
        OptionType::Str,
        "Name of IV generator algorithm",
    ),
    opt(
        "encrypt.ivgen-hash-alg",
        OptionType::Str,
        "Name of IV generator hash algorithm",
    ),
    opt(
        "encrypt.key-secret",
        OptionType::Str,
        "ID of secret providing qcow AES key or LUKS passphrase",
    ),
    opt(
        "encryption",
        OptionType::Bool,
        "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
    ),
    opt("extended_l2", OptionType::Bool, "Extended L2 tables"),
    opt(
        "lazy_refcounts",
        OptionType::Bool,
        "Postpone refcount updates",
    ),
    opt(
        "preallocation",
        OptionType::Str,
        "Preallocation mode (allowed values: off, metadata, falloc, full)",
    ),
    opt(
        "refcount_bits",
        OptionType::Number,
        "Width of a reference count entry in bits",
    ),
];

/// What the driver does ([`crate::formats::Capabilities`]).
const CAPABILITIES: Capabilities = Capabilities {
    create: true,
    compressed: Support::Yes,
    // `convert -n` writes guest data through the updater (crate::convert routes it there).
    in_place: Support::Yes,
    backing_file: true,
    bitmaps: true,
    printed: &[
        printed("encryption", None),
        printed("encrypt.format", None),
        printed("encrypt.key-secret", None),
        printed("encrypt.cipher-alg", None),
        printed("encrypt.cipher-mode", None),
        printed("encrypt.ivgen-alg", None),
        printed("encrypt.ivgen-hash-alg", None),
        printed("encrypt.hash-alg", None),
        printed("encrypt.iter-time", None),
        printed("cluster_size", Some("65536")),
        printed("extended_l2", Some("off")),
        printed("preallocation", None),
        printed("compression_type", Some("zlib")),
        printed("size", None),
        printed("compat", None),
        printed("backing_file", None),
        printed("backing_fmt", None),
        printed("data_file", None),
        printed("data_file_raw", None),
        printed("lazy_refcounts", Some("off")),
        printed("refcount_bits", Some("16")),
    ],
    choices: write::CHOICES,
    streaming: Streaming::No(
        "qcow2 images cannot be written to a stream (the header is written last)",
    ),
};

impl crate::formats::Driver for Driver {
    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn probe(&self, head: &[u8], _storage: &dyn Storage) -> bool {
        // As QEMU probes: the magic and a version of at least 2. Versions past 3 are then
        // refused by `open` with a clear error instead of being read as raw bytes.
        head.len() >= 8
            && head.starts_with(&header::MAGIC)
            && u32::from_be_bytes([head[4], head[5], head[6], head[7]]) >= 2
    }

    fn open(&self, storage: Arc<dyn Storage>, ctx: &OpenContext) -> Result<Box<dyn ImageReader>> {
        // encrypt.format=luks: the LUKS wrapper unlocks and decrypts (formats/luks/qcow2.rs).
        if let Some(loc) = crate::formats::luks::qcow2::luks_header_location(&*storage)? {
            let r = crate::formats::luks::qcow2::open(storage, ctx, loc)?;
            return Ok(Box::new(r));
        }
        if aes::is_aes(&*storage)? {
            return aes::open(storage, ctx);
        }
        Ok(Box::new(Qcow2Reader::open(storage, ctx)?))
    }

    fn create_options(&self) -> &'static [OptionSpec] {
        OPTIONS
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    fn create(
        &self,
        out: &Output,
        size: u64,
        opts: &CreateOptions,
    ) -> Result<Box<dyn ImageWriter>> {
        // A new image's writer never overwrites an existing image (`convert -n` goes
        // through the updater).
        if out.mode() == crate::OutputMode::InPlace {
            return Err(crate::Error::unsupported(
                "an existing qcow2 image is written through its updater, not re-created (convert -n)",
            ));
        }
        let w = WriteOptions::from_options(opts, size)?;
        let crypt = match w.encrypt {
            true => Some(encrypt_write::Crypt::new(opts)?),
            false => None,
        };
        Ok(Box::new(Qcow2Writer::create_encrypted(
            out, size, w, crypt,
        )?))
    }

    fn measure(
        &self,
        size: u64,
        opts: &CreateOptions,
        data: Option<&dyn DataSummary>,
    ) -> Result<Measure> {
        measure::measure(size, opts, data)
    }
}
