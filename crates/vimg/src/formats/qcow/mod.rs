//! qcow: QEMU's original copy-on-write format (version 1), read as QEMU's block/qcow.c
//! reads it (see [`header`] for the structures).
//!
//! # Reading
//! Refused with an error naming field, offset and value when: the version is not 1; the
//! size is below 2 bytes or too large to address; the cluster size is outside 512 B..64 KiB
//! or the L2 size outside 512 B..64 KiB; the image is encrypted (AES: "unsupported") or
//! names an unknown encryption method; the L1 table, an L2 table, a data cluster, a
//! compressed cluster or the backing file name runs past the end of the file or overlaps
//! the header or any other of them; the backing file name is longer than QEMU reads.
//!
//! Compressed clusters are raw deflate streams that must inflate to exactly one cluster.
//! The backing file is opened through the gate and probed. The virtual size is the header's
//! size in whole sectors, as QEMU counts it.
//!
//! # Writing
//! The image qemu-img creates and converts into, with its `backing_file`, AES encryption,
//! and compressed clusters (`-c`, not with encryption) (see [`write`]). Existing images
//! take guest writes in place (`convert -n`, `commit`) through [`update`].

pub mod aes;
pub mod error;
pub mod header;
mod open;
mod read;
pub mod update;
mod write;

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::formats::{printed, Capabilities, Streaming, Support};
use crate::formats::{Format, OpenContext};
use crate::mapping::ImageReader;
use crate::options::{CreateOptions, OptionSpec, OptionType};
use crate::output::Output;
use crate::storage::Storage;
use crate::writer::ImageWriter;

pub use error::QcowError;
pub use open::MAX_BACKING_NAME;
pub use read::QcowReader;
pub use write::{new_header, QcowWriter};

const OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        name: "backing_file",
        ty: OptionType::Str,
        help: "File name of a base image",
    },
    OptionSpec {
        name: "backing_fmt",
        ty: OptionType::Str,
        help: "Format of the backing image",
    },
    OptionSpec {
        name: "encrypt.format",
        ty: OptionType::Str,
        help: "Encrypt the image, format choices: 'aes'",
    },
    OptionSpec {
        name: "encrypt.key-secret",
        ty: OptionType::Str,
        help: "ID of the secret that provides the AES encryption key",
    },
    OptionSpec {
        name: "encryption",
        ty: OptionType::Bool,
        help: "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
    },
    // The file protocol's (qemu-img accepts it; the image is the same as without it).
    crate::options::PROTOCOL_OPTIONS[2],
];

/// The qcow driver.
pub struct Driver;

/// What the driver does ([`crate::formats::Capabilities`]).
const CAPABILITIES: Capabilities = Capabilities {
    create: true,
    compressed: Support::Yes,
    in_place: Support::Yes,
    backing_file: true,
    bitmaps: false,
    printed: &[
        printed("size", None),
        printed("backing_file", None),
        printed("backing_fmt", None),
        printed("encryption", None),
        printed("encrypt.format", None),
        printed("encrypt.key-secret", None),
    ],
    choices: &[crate::formats::FILE_PREALLOCATION],
    streaming: Streaming::No(
        "a qcow image keeps its tables in front of the data and cannot be written to a stream",
    ),
};

impl crate::formats::Driver for Driver {
    fn format(&self) -> Format {
        Format::Qcow
    }

    fn probe(&self, head: &[u8], storage: &dyn Storage) -> bool {
        crate::formats::unread::probe_qcow(head, storage)
    }

    fn open(&self, storage: Arc<dyn Storage>, ctx: &OpenContext) -> Result<Box<dyn ImageReader>> {
        let r = QcowReader::open_with(storage, true)?;
        if r.header().crypt_method == aes::CRYPT_AES {
            let r = aes::reader(
                Box::new(r),
                ctx.key_secret.as_deref(),
                ctx.metadata_only,
                None,
            )?;
            return Ok(Box::new(r));
        }
        Ok(Box::new(r))
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
        crate::formats::check_file_preallocation(opts)?;
        let key = aes::create_key(opts)?;
        if let Some(f) = opts.get_str("backing_fmt") {
            if Format::from_name(f).is_none() {
                return Err(Error::invalid_argument(format!(
                    "Unknown backing file format '{f}'"
                )));
            }
        }
        let backing = opts.get_str("backing_file");
        let (h, l1_size) = new_header(size, backing)?;
        let file = out.create_main()?;
        let w = QcowWriter::new(file, h, l1_size, backing.map(str::to_string))?;
        let w = match key {
            Some(k) => w.with_key(k),
            None => w,
        };
        Ok(Box::new(if opts.compress { w.compressed()? } else { w }))
    }
}

#[cfg(test)]
mod tests;
