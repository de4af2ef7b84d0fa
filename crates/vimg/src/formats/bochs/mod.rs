//! bochs: the Bochs "growing" redolog image bximage writes, read as QEMU's block/bochs.c
//! reads it (see [`header`] for the layout). Read only, as in qemu-img.
//!
//! # Reading
//! Versions 2.0 and 1.0 of the header, refused with an error naming field, offset and
//! value when: the signature, type or subtype differ; the catalog would overlap the header,
//! has more entries than QEMU reads (1 Mi), or fewer than the disk needs; the extent size
//! is below 512, not a power of two or above 8 MiB; the bitmap cannot cover an extent; the
//! catalog runs past the end of the file; an entry's extent (bitmap and sectors) lies past
//! the end of the file, or two entries name one extent.
//!
//! A sector reads as data when its extent is allocated and its bit is set in the extent's
//! bitmap, otherwise as zero.

pub mod error;
pub mod header;
mod read;

use std::sync::Arc;

use crate::error::Result;
use crate::formats::{Format, OpenContext};
use crate::mapping::ImageReader;
use crate::storage::Storage;

pub use error::BochsError;
pub use read::{BochsReader, MAX_CATALOG, MAX_EXTENT};

/// The bochs driver.
pub struct Driver;

impl crate::formats::Driver for Driver {
    fn format(&self) -> Format {
        Format::Bochs
    }

    fn probe(&self, head: &[u8], storage: &dyn Storage) -> bool {
        crate::formats::unread::probe_bochs(head, storage)
    }

    fn open(&self, storage: Arc<dyn Storage>, _ctx: &OpenContext) -> Result<Box<dyn ImageReader>> {
        Ok(Box::new(BochsReader::open(storage)?))
    }
}

#[cfg(test)]
mod tests;
