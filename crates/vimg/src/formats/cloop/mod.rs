//! cloop: the compressed loop image (V2.0) of the Linux cloop driver, read as QEMU's
//! block/cloop.c reads it (see [`header`] for the layout). Read only, as in qemu-img.
//!
//! # Reading
//! Refused with an error naming field, offset and value when: the V2.0 shell preamble is
//! missing; the block size is zero, not a multiple of 512 or above 64 MiB; the offsets
//! table is larger than QEMU reads (512 MiB) or than vimg's table limit, or runs past the
//! end of the file; an offset lies inside the header and table or past the end of the
//! file, goes backwards, or leaves a compressed block longer than twice the largest block
//! size. Each block is one zlib stream that must inflate to exactly the block size (checked
//! when it is read, as QEMU does).

pub mod error;
pub mod header;
mod read;

use std::sync::Arc;

use crate::error::Result;
use crate::formats::{Format, OpenContext};
use crate::mapping::ImageReader;
use crate::storage::Storage;

pub use error::CloopError;
pub use read::{CloopReader, MAX_BLOCK_SIZE};

/// The cloop driver.
pub struct Driver;

impl crate::formats::Driver for Driver {
    fn format(&self) -> Format {
        Format::Cloop
    }

    fn probe(&self, head: &[u8], storage: &dyn Storage) -> bool {
        crate::formats::unread::probe_cloop(head, storage)
    }

    fn open(&self, storage: Arc<dyn Storage>, _ctx: &OpenContext) -> Result<Box<dyn ImageReader>> {
        Ok(Box::new(CloopReader::open(storage)?))
    }
}

#[cfg(test)]
mod tests;
