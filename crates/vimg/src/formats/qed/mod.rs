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

pub mod error;
pub mod header;
mod read;

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::formats::{Format, OpenContext};
use crate::mapping::ImageReader;
use crate::options::{CreateOptions, OptionSpec};
use crate::output::Output;
use crate::storage::Storage;
use crate::writer::ImageWriter;

pub use error::QedError;
pub use read::{QedReader, MAX_BACKING_NAME};

/// The qed driver.
pub struct Driver;

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
        &[]
    }

    fn create(
        &self,
        _out: &Output,
        _size: u64,
        _opts: &CreateOptions,
    ) -> Result<Box<dyn ImageWriter>> {
        Err(Error::unsupported("vimg does not write qed images yet"))
    }
}

#[cfg(test)]
mod tests;
