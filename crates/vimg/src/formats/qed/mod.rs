//! qed: the QEMU Enhanced Disk format, as QEMU's docs/interop/qed_spec.txt defines it (see
//! [`header`] for the structures). qemu-img still reads and creates it; OpenStack's format
//! inspector treats every QED image as unsafe, because QEMU would follow a backing file
//! named inside it. vimg follows that name only through the gate, like every other
//! image-named file.
//!
//! # Reading
//! Refused with an error naming field, offset and value when: unknown feature bits are set;
//! the cluster size is not a power of two from 4 KiB to 64 MiB, or the table size not one
//! from 1 to 16 clusters; the image size is not whole sectors or larger than two levels of
//! tables address; the header size is zero or past the end of the file; the L1 table, an L2
//! table or a data cluster is not cluster-aligned, lies inside the header or past the end of
//! the file, or is named twice (tables and clusters together); the backing file name lies
//! outside the header or is longer than QEMU reads.
//!
//! L2 entry 1 reads as zeros; 0 reads from the backing file (or as zeros). The backing file
//! is opened through the gate, as raw when the image says so (`F_BACKING_FORMAT_NO_PROBE`),
//! probed otherwise. An image with the need-check flag is read (its tables were checked at
//! open), flagged dirty in `info` and warned about.
//!
//! # Writing
//! The image `qemu-img create -f qed` and `convert -O qed` write (`cluster_size`,
//! `table_size`, `backing_file`, `backing_fmt`; QEMU's limits and messages), see [`write`].
//!
//! # Changing in place
//! `resize` (grow only), the backing file (`rebase`), guest data (`commit`, safe `rebase`)
//! and `check -r`, as QEMU's qed driver does them and in its order of writes, see
//! [`update`]; the consistency check of qed-check.c is in `check.rs`.

mod check;
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

pub use error::QedError;
pub use open::MAX_BACKING_NAME;
pub use read::QedReader;
pub use write::{new_header, QedWriter};

const OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        name: "backing_file",
        ty: OptionType::Str,
        help: "File name of a base image",
    },
    OptionSpec {
        name: "backing_fmt",
        ty: OptionType::Str,
        help: "Image format of the base image",
    },
    OptionSpec {
        name: "cluster_size",
        ty: OptionType::Size,
        help: "Cluster size (in bytes)",
    },
    OptionSpec {
        name: "table_size",
        ty: OptionType::Size,
        help: "L1/L2 table size (in clusters)",
    },
    // The file protocol's (qemu-img accepts it; the image is the same as without it).
    crate::options::PROTOCOL_OPTIONS[2],
];

/// The qed driver.
pub struct Driver;

/// What the driver does ([`crate::formats::Capabilities`]).
const CAPABILITIES: Capabilities = Capabilities {
    create: true,
    compressed: Support::No,
    // `convert -n` writes guest data through the updater (crate::convert routes it there).
    in_place: Support::Yes,
    backing_file: true,
    bitmaps: false,
    printed: &[
        printed("size", None),
        printed("backing_file", None),
        printed("backing_fmt", None),
        printed("cluster_size", Some("65536")),
        printed("table_size", None),
    ],
    choices: &[crate::formats::FILE_PREALLOCATION],
    streaming: Streaming::No(
        "a QED image keeps its tables in front of the data and cannot be written to a stream",
    ),
};

impl crate::formats::Driver for Driver {
    fn format(&self) -> Format {
        Format::Qed
    }

    fn probe(&self, head: &[u8], storage: &dyn Storage) -> bool {
        crate::formats::unread::probe_qed(head, storage)
    }

    fn open(&self, storage: Arc<dyn Storage>, _ctx: &OpenContext) -> Result<Box<dyn ImageReader>> {
        Ok(Box::new(QedReader::open(storage)?))
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
                "an existing qed image is written through its updater, not re-created (convert -n)",
            ));
        }
        crate::formats::check_file_preallocation(opts)?;
        let cs = opts
            .get_size("cluster_size")?
            .unwrap_or(header::DEFAULT_CLUSTER_SIZE.into());
        let ts = opts
            .get_size("table_size")?
            .unwrap_or(header::DEFAULT_TABLE_SIZE.into());
        let backing = opts.get_str("backing_file");
        let raw = match opts.get_str("backing_fmt") {
            None => false,
            Some("raw") => true,
            Some(f) if Format::from_name(f).is_some() => false,
            Some(f) => {
                return Err(Error::invalid_argument(format!(
                    "Unknown backing file format '{f}'"
                )))
            }
        };
        let h = new_header(size, cs, ts, backing.map(|b| (b, raw)))?;
        let file = out.create_main()?;
        Ok(Box::new(QedWriter::new(
            file,
            h,
            backing.map(str::to_string),
        )?))
    }
}

#[cfg(test)]
mod tests;
