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

pub use error::QcowError;
pub use read::{QcowReader, MAX_BACKING_NAME};

/// The qcow driver.
pub struct Driver;

impl crate::formats::Driver for Driver {
    fn format(&self) -> Format {
        Format::Qcow
    }

    fn probe(&self, head: &[u8], storage: &dyn Storage) -> bool {
        crate::formats::unread::probe_qcow(head, storage)
    }

    fn open(&self, storage: Arc<dyn Storage>, _ctx: &OpenContext) -> Result<Box<dyn ImageReader>> {
        Ok(Box::new(QcowReader::open(storage)?))
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
        Err(Error::unsupported("vimg does not write qcow images yet"))
    }
}

#[cfg(test)]
mod tests;
