//! raw: the guest's bytes, one for one. Reads ask the filesystem for holes
//! (`SEEK_DATA`/`SEEK_HOLE`) so holes map as zero without being read; writes
//! leave holes for zero ranges and set the file length to the virtual size.
//!
//! vimg addition: `compress=xz|gz|zst` writes the image as one compressed stream
//! (`disk.raw.xz`), in order, on several threads where the codec allows
//! ([`crate::container::CompressedSink`]).

mod read;
pub mod update;
mod write;

use std::sync::Arc;

use crate::error::Result;
use crate::formats::{Capabilities, Streaming, Support, FILE_PREALLOCATION, PROTOCOL_PRINTED};
use crate::formats::{Format, OpenContext};
use crate::mapping::ImageReader;
use crate::options::{CreateOptions, OptionSpec, OptionType};
use crate::output::Output;
use crate::storage::Storage;
use crate::writer::ImageWriter;

pub use read::RawReader;
pub use write::RawWriter;

/// The raw driver.
pub struct Driver;

const OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        name: "preallocation",
        ty: OptionType::Str,
        help: "Preallocation mode (allowed values: off, falloc, full)",
    },
    OptionSpec {
        name: "compress",
        ty: OptionType::Str,
        help: "vimg: write the raw image as one compressed stream (allowed values: xz, gz, zst), e.g. disk.raw.xz",
    },
    OptionSpec {
        name: "compression_level",
        ty: OptionType::Number,
        help: "vimg: level for compress= (xz 0-9, gz 1-9, zst 1-19; default 6, 6, 3)",
    },
];

/// What the driver does ([`crate::formats::Capabilities`]).
const CAPABILITIES: Capabilities = Capabilities {
    create: true,
    compressed: Support::No,
    in_place: Support::Yes,
    backing_file: false,
    bitmaps: false,
    printed: PROTOCOL_PRINTED,
    choices: &[FILE_PREALLOCATION],
    streaming: Streaming::Yes,
};

impl crate::formats::Driver for Driver {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn probe(&self, _head: &[u8], _storage: &dyn Storage) -> bool {
        // Raw is what remains when nothing else matches.
        false
    }

    fn open(&self, storage: Arc<dyn Storage>, _ctx: &OpenContext) -> Result<Box<dyn ImageReader>> {
        Ok(Box::new(RawReader::new(storage)))
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
        Ok(Box::new(RawWriter::create(out, size, opts)?))
    }

    /// A raw image needs its virtual size in bytes, allocated or not (qemu-img's answer; a
    /// sparse file may use less on disk).
    fn measure(
        &self,
        size: u64,
        _opts: &CreateOptions,
        _data: Option<&dyn crate::formats::DataSummary>,
    ) -> Result<crate::formats::Measure> {
        Ok(crate::formats::Measure {
            required: size,
            fully_allocated: size,
            bitmaps: None,
        })
    }
}
