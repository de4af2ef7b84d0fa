//! vdi: VirtualBox Disk Image, as VirtualBox defines it (src/VBox/Storage/VDICore.h and
//! VDI.cpp; see [`header`] for the structures).
//!
//! # Layout
//! A 512-byte block holds the pre-header (text, signature `0xbeda107f`, version 1.1) and the
//! header; the block map follows (one little-endian u32 per 1 MiB block), then the data
//! blocks. A block map entry is the block's index in the data area, `0xffffffff` for a block
//! never written (reads as zero), or `0xfffffffe` for a discarded block (reads as zero).
//!
//! # Reading
//! Normal (dynamic) and fixed (static) images of header version 1.1, with qemu's limits and
//! more, each refused with an error naming the field, its offset and its value:
//! - signature, version 1.1 (1.0 images are refused: neither qemu nor any current
//!   VirtualBox writes them), header size 0x180..0x1b8, image type 1 or 2;
//! - differencing and undo images (type 3 or 4, or a non-zero link or parent UUID) are
//!   "unsupported", as in qemu (corpus `bwlehrpool/image-default_snapshot.vdi`);
//! - sector size 512, block size 1 MiB, no extra bytes per block, block and data offsets on
//!   sectors, the block count covering the disk size (rounded up to sectors, as qemu does),
//!   at most qemu's block count and within [`crate::limits::MAX_TABLE_BYTES`] of block map
//!   (8 Mi blocks: 8 TiB virtual);
//! - header, block map and data area in that order without overlap, the block map inside
//!   the file;
//! - every block map entry below the block count (qemu-img check's "too large"), its block
//!   entirely inside the file (qemu reads zeros there), and used by one entry only (qemu-img
//!   check's "also used by"). qemu opens such images and fails only under `check`; vimg
//!   refuses them at open.
//!
//! `format_specific` is none and `cluster_size` is the block size, as qemu-img shows them.
//! `check` reports the one inconsistency open tolerates, a wrong allocated-blocks count,
//! with qemu-img's wording.
//!
//! # Writing
//! `static=off` (default, dynamic) and `static=on`, as `qemu-img create -f vdi` writes them
//! (the same layout and header text, new random image and modification UUIDs, no parent).
//! The dynamic writer takes data from many threads in any order and writes the block map at
//! `finish`; the static writer writes header and block map first and so can write to a
//! stream.

mod error;
pub mod header;
mod open;
mod read;
pub mod update;
mod write;

use std::sync::Arc;

use crate::error::Result;
use crate::formats::{printed, Capabilities, Streaming, Support};
use crate::formats::{Format, OpenContext};
use crate::mapping::ImageReader;
use crate::options::{CreateOptions, OptionSpec, OptionType};
use crate::output::Output;
use crate::storage::Storage;
use crate::writer::ImageWriter;

pub use error::VdiError;
pub use open::{MAX_BLOCKS, MAX_DISK_SIZE};
pub use read::VdiReader;
pub use write::VdiWriter;

/// The vdi driver.
pub struct Driver;

const OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        name: "static",
        ty: OptionType::Bool,
        help: "VDI static (pre-allocated) image",
    },
    // The file protocol's (qemu-img accepts it; the image is the same as without it).
    crate::options::PROTOCOL_OPTIONS[2],
];

/// A new image's `-o` options, parsed and checked once.
struct Settings {
    /// `static=on`: every block allocated up front.
    fixed: bool,
}

impl Settings {
    fn from_options(size: u64, opts: &CreateOptions) -> Result<Settings> {
        let fixed = opts.get_bool("static", false)?;
        if size > MAX_DISK_SIZE {
            return Err(VdiError::Option(format!(
                "Unsupported VDI image size (size is {size:#x}, max supported is {MAX_DISK_SIZE:#x})"
            ))
            .into());
        }
        crate::formats::check_file_preallocation(opts)?;
        Ok(Settings { fixed })
    }
}

/// What the driver does ([`crate::formats::Capabilities`]).
const CAPABILITIES: Capabilities = Capabilities {
    create: true,
    compressed: Support::No,
    // `convert -n` writes guest data through the updater (update.rs).
    in_place: Support::Yes,
    backing_file: false,
    bitmaps: false,
    printed: &[printed("size", None), printed("static", Some("off"))],
    choices: &[crate::formats::FILE_PREALLOCATION],
    streaming: Streaming::When {
        option: "static",
        values: &["on", "true", "yes"],
        otherwise: "a dynamic VDI keeps its block map in front of the data and cannot be written to a stream; use static=on",
    },
};

impl crate::formats::Driver for Driver {
    fn format(&self) -> Format {
        Format::Vdi
    }

    fn probe(&self, head: &[u8], _storage: &dyn Storage) -> bool {
        head.get(0x40..0x44)
            .is_some_and(|s| s == header::SIGNATURE.to_le_bytes())
    }

    fn open(&self, storage: Arc<dyn Storage>, _ctx: &OpenContext) -> Result<Box<dyn ImageReader>> {
        Ok(Box::new(VdiReader::open(storage)?))
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
        // `convert -n` writes into the existing image through its updater
        // (crate::convert routes it there); a new image's writer never overwrites one.
        if out.mode() == crate::OutputMode::InPlace {
            return Err(crate::Error::unsupported(
                "an existing vdi image is written through its updater, not re-created (convert -n)",
            ));
        }
        let s = Settings::from_options(size, opts)?;
        let file = out.create_main()?;
        Ok(Box::new(VdiWriter::new(file, size, s.fixed)?))
    }
}

#[cfg(test)]
mod tests;
