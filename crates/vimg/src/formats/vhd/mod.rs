//! vpc: Microsoft Virtual Hard Disk (VHD), as the "Virtual Hard Disk Image Format
//! Specification" (Microsoft, October 2006, version 1.0) defines it. qemu-img calls the
//! format `vpc`; vimg accepts `vhd` as well.
//!
//! # Layout
//! - A **fixed** disk is the guest's bytes followed by a 512-byte footer ("Hard Disk Footer
//!   Format").
//! - A **dynamic** disk is a copy of the footer at offset 0, a 1024-byte dynamic disk header
//!   ("Dynamic Disk Header Format"), the block allocation table (BAT: one big-endian sector
//!   number per block, `0xFFFFFFFF` when unallocated), the blocks (each a sector bitmap
//!   padded to whole sectors, then the block's data), and the footer at the end.
//! - A **differencing** disk is a dynamic disk whose clear bitmap bits (and unallocated
//!   blocks) show its parent, named by up to eight parent locators.
//!
//! # Reading
//! - **Footer.** The footer at the end is the footer; the copy at offset 0 of dynamic disks
//!   exists for redundancy, and (as the specification says Virtual PC does) vimg uses it only
//!   when the footer's checksum fails. A footer whose checksum fails with no valid copy is an
//!   error naming both checksums: qemu refuses such files too (corpus `dfvfs/image.vhd`),
//!   while libvhdi reads them; vimg follows the specification ("the file should be assumed
//!   to be corrupt"). The dynamic header's checksum is verified as well (qemu does not).
//! - **Virtual size** (see [`geometry::virtual_sectors`]): exactly qemu-img 10's rule.
//!   Images whose creator application is "vpc " (Virtual PC) or "qemu" (qemu without
//!   `force_size`) are sized by their CHS geometry (cylinders × heads × sectors per track ×
//!   512), which is what a Virtual PC guest sees; every other creator ("win " Hyper-V,
//!   "wa\0\0" Azure, "d2v\0" Disk2VHD, "qem2" qemu with `force_size`, "tap\0", "CTXS",
//!   unknown ones), and any image with the largest geometry (65535/16/255, which marks disks
//!   too big for CHS), by `current_size` rounded down to sectors. Corpus
//!   `qemu-iotests/virtualpc-dynamic.vhd` therefore reads as 136363130880 bytes, as qemu
//!   reads it; libvhdi, which always takes `current_size`, says 136365211648. The extra
//!   2080768 bytes are space the Virtual PC guest never saw (and that holds no data in
//!   that image), so vimg keeps qemu's answer.
//! - **Sector bitmaps** are honoured, most significant bit first: a clear bit means the
//!   sector is not in this file (zero in a dynamic disk, the parent's in a differencing
//!   disk). qemu ignores the bitmaps of dynamic disks and reads the block's bytes, which the
//!   specification requires to be zero under clear bits, so the two agree on every
//!   conforming image.
//! - **Parent locators** of differencing disks are decoded — `W2ru` (relative, UTF-16LE),
//!   `W2ku` (absolute, UTF-16LE), `MacX` (a `file://` URL) and, last, the header's parent
//!   name (UTF-16BE); "Mac " alias blobs and the deprecated code-page "Wi2r"/"Wi2k" are
//!   skipped — and returned as one [`crate::mapping::BackingRef`]: the relative
//!   name first, the others as alternatives. [`crate::Image`] opens the parent only through
//!   the gate, so by default only a parent inside the image's folder is read. A
//!   differencing disk whose parent cannot be opened fails (qemu silently reads it as if it
//!   had no parent: corpus `dfvfs/fat-differential.vhd`). The parent's UUID is not compared
//!   with the child's record of it.
//! - **Checked at open**, each with an error naming the structure, the offset and the value:
//!   cookies, checksums, versions (major 1), disk type, virtual size (at most 2040 GiB, as
//!   qemu), block size (a power of two of at least 512 bytes), max table entries (must
//!   cover the virtual size; the BAT must lie inside the file and within
//!   [`crate::limits::MAX_TABLE_BYTES`]), the BAT not overlapping other metadata, and every
//!   BAT entry: its block inside the file (qemu checks this too), not over the footers, the
//!   header, the BAT or a parent locator, and not over another entry's block (entries are
//!   sector numbers, so always sector-aligned). The check is linear in the entries plus a
//!   sort of the allocated ones, whose number the file length bounds.
//! - A stored block whose bytes sit in a hole of the host file maps as zero (qemu asks the
//!   file the same question), so sparse copies of dynamic disks convert quickly.
//! - Not supported: split VHDs (`.v01`...) and pre-2004 511-byte footers (neither does
//!   qemu).
//!
//! # Probing
//! A file is `vpc` when it starts with "conectix" (the footer copy of dynamic disks, as
//! qemu probes), and also when its last 512 bytes are a valid fixed-disk footer (cookie,
//! checksum, type 2, `current_size + 512` equal to the file length). qemu-img probes fixed
//! disks as raw, so a converted fixed VHD carries 512 stray bytes; vimg does not.
//!
//! # Writing
//! `subformat=dynamic` (default) or `fixed`, and `force_size`, with qemu-img's meaning and
//! layout: without `force_size` the size is rounded up to the nearest CHS geometry (so a
//! conversion never truncates) and the creator is "qemu"; with it the size is kept exactly
//! (rounded to sectors only), the geometry is the largest one and the creator "qem2". The
//! Azure recipe `convert -O vpc -o subformat=fixed,force_size=on` therefore keeps a
//! MiB-aligned size. Dynamic disks use 2 MiB blocks. The fixed writer also writes to a
//! stream (data in order, then the footer).
//!
//! # Checking
//! qemu-img cannot check vpc images (exit 63). `check` here reports the allocation
//! statistics qemu-img prints for formats it checks, and a footer whose two copies
//! disagree (or whose copy is corrupt) as a corruption; everything else is refused at open.

mod error;
pub mod geometry;
pub mod header;
mod open;
mod read;
pub mod update;
mod write;

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::formats::{printed, Capabilities, Choice, ChoiceRefusal, Streaming, Support};
use crate::formats::{DataSummary, Format, Measure, OpenContext};
use crate::mapping::ImageReader;
use crate::options::{CreateOptions, OptionSpec, OptionType};
use crate::output::Output;
use crate::storage::Storage;
use crate::writer::ImageWriter;

pub use error::VhdError;
pub use open::has_fixed_footer;
pub use read::{DiskKind, VhdReader};
pub use write::{DynamicWriter, FixedWriter};

use header::{bitmap_size, FOOTER_SIZE};
use write::{bat_bytes, BAT_OFFSET, BLOCK_SIZE};

/// The vpc driver.
pub struct Driver;

const OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        name: "subformat",
        ty: OptionType::Str,
        help: "Type of virtual hard disk format. Supported formats are {dynamic (default) | fixed} ",
    },
    OptionSpec {
        name: "force_size",
        ty: OptionType::Bool,
        help: "Force disk size calculation to use the actual size specified, rather than using the nearest CHS-based calculation",
    },
    // The file protocol's (qemu-img accepts it; the image is the same as without it).
    crate::options::PROTOCOL_OPTIONS[2],
];

/// A new image's `-o` options, parsed and checked once (for `create` and `measure`).
struct Settings {
    fixed: bool,
    force_size: bool,
    chs: geometry::Chs,
    size: u64,
}

fn settings(size: u64, opts: &CreateOptions) -> Result<Settings> {
    let fixed = CAPABILITIES.choice("subformat", opts)? == "fixed";
    let force_size = opts.get_bool("force_size", false)?;
    crate::formats::check_file_preallocation(opts)?;
    let (chs, size) = geometry::create_geometry(size, force_size).ok_or_else(|| {
        Error::invalid_argument(
            "The image size is too large for file format 'vpc' (the VHD maximum is 2040 GiB)",
        )
    })?;
    Ok(Settings {
        fixed,
        force_size,
        chs,
        size,
    })
}

/// What the driver does ([`crate::formats::Capabilities`]).
const CAPABILITIES: Capabilities = Capabilities {
    create: true,
    compressed: Support::No,
    // `convert -n` writes guest data through the updater (update.rs).
    in_place: Support::Yes,
    backing_file: false,
    bitmaps: false,
    printed: &[
        printed("size", None),
        printed("subformat", None),
        printed("force_size", None),
    ],
    choices: &[Choice {
        option: "subformat",
        values: &["dynamic", "fixed"],
        default: "dynamic",
        refusal: ChoiceRefusal::DoesNotAccept("subformat"),
    },
    crate::formats::FILE_PREALLOCATION,
    ],
    streaming: Streaming::When {
        option: "subformat",
        values: &["fixed"],
        otherwise: "a dynamic VHD keeps its block table in front of the data and cannot be written to a stream; use subformat=fixed",
    },
};

impl crate::formats::Driver for Driver {
    fn format(&self) -> Format {
        Format::Vpc
    }

    fn probe(&self, head: &[u8], storage: &dyn Storage) -> bool {
        head.starts_with(&header::FOOTER_COOKIE) || has_fixed_footer(storage)
    }

    fn open(&self, storage: Arc<dyn Storage>, _ctx: &OpenContext) -> Result<Box<dyn ImageReader>> {
        Ok(Box::new(VhdReader::open(storage)?))
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
                "an existing vpc image is written through its updater, not re-created (convert -n)",
            ));
        }
        let p = settings(size, opts)?;
        let file = out.create_main()?;
        Ok(if p.fixed {
            Box::new(FixedWriter::new(file, p.size, p.chs, p.force_size)?)
        } else {
            Box::new(DynamicWriter::new(file, p.size, p.chs, p.force_size)?)
        })
    }

    fn measure(
        &self,
        size: u64,
        opts: &CreateOptions,
        data: Option<&dyn DataSummary>,
    ) -> Result<Measure> {
        let p = settings(size, opts)?;
        let footer = FOOTER_SIZE as u64;
        if p.fixed {
            let n = p.size + footer;
            return Ok(Measure {
                required: n,
                fully_allocated: n,
                bitmaps: None,
            });
        }
        let slot = BLOCK_SIZE + bitmap_size(BLOCK_SIZE);
        let meta = BAT_OFFSET + bat_bytes(p.size) + footer;
        let blocks = p.size.div_ceil(BLOCK_SIZE);
        let used = match data {
            Some(d) => d.data_units(BLOCK_SIZE)?.min(blocks),
            None => 0,
        };
        Ok(Measure {
            required: meta + used * slot,
            fully_allocated: meta + blocks * slot,
            bitmaps: None,
        })
    }
}

#[cfg(test)]
mod tests;
