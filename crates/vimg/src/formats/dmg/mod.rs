//! dmg: Apple's UDIF disk image, read as QEMU's block/dmg.c reads it (see [`header`] for the
//! structures). Read only, as in qemu-img.
//!
//! # Reading
//! The "koly" trailer in the last 512 bytes locates the XML property list, whose `<data>`
//! elements hold the base64 "mish" blocks (decoded as GLib decodes them, which QEMU uses);
//! their chunks map runs of sectors to zero (UDZE, UDIG), raw (UDRW), zlib (UDZO) or bzip2 (UDBZ)
//! data.
//! Comment, end and unknown chunk types are skipped, as QEMU skips them. Refused, naming
//! what and where, when: the trailer is missing or its forks run past it; the chunk tables
//! are only in a resource fork (an old layout); the property list is empty or above 16 MiB;
//! a `<data>` element is not closed; a chunk is lzfse or ADC compressed (vimg does
//! not decode them: "unsupported"); a data chunk is longer than QEMU reads, lies past the
//! end of the file, or is raw with a length other than its sectors; chunks overlap; or a
//! sector of the disk is in no chunk (qemu-img fails reading it). zlib and bzip2 chunks must
//! decode to exactly their sectors (bzip2: a whole stream), checked when read.

pub mod error;
pub mod header;
mod open;
mod read;

use std::sync::Arc;

use crate::error::Result;
use crate::formats::{Format, OpenContext};
use crate::mapping::ImageReader;
use crate::storage::Storage;

pub use error::DmgError;
pub use open::{MAX_LENGTH, MAX_PLIST, MAX_SECTORS};
pub use read::DmgReader;

/// The dmg driver.
pub struct Driver;

impl crate::formats::Driver for Driver {
    fn format(&self) -> Format {
        Format::Dmg
    }

    fn probe(&self, head: &[u8], storage: &dyn Storage) -> bool {
        crate::formats::unread::probe_dmg(head, storage)
    }

    fn open(&self, storage: Arc<dyn Storage>, _ctx: &OpenContext) -> Result<Box<dyn ImageReader>> {
        Ok(Box::new(DmgReader::open(storage)?))
    }
}

#[cfg(test)]
mod tests;
