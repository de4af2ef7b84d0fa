//! parallels: the Parallels / Virtuozzo expanding image (the image service's `ploop`), as
//! QEMU's docs/interop/parallels.txt describes it (see [`header`] for the structures).
//!
//! # Layout
//! A 64-byte header, the BAT (one little-endian u32 per cluster: the cluster's place in the
//! file, in sectors for "WithoutFreeSpace" images and in clusters for "WithouFreSpacExt"
//! ones; 0 for a cluster never written), the data area from `data_off`, and optionally a
//! Format Extension cluster (`ext_off`) whose features may hold dirty bitmaps.
//!
//! # Reading
//! Both signatures, version 2, refused with an error naming field, offset and value when:
//! - the cluster size is zero or larger than QEMU reads; the BAT has more entries than
//!   QEMU reads, runs past the end of the file, or exceeds
//!   [`crate::limits::MAX_TABLE_BYTES`];
//! - `data_off` lies inside the header and BAT or past the end of the file (zero is
//!   allowed for "WithoutFreeSpace" only, meaning right after the BAT);
//! - a BAT entry's cluster lies before the data area or past the end of the file, or two
//!   clusters (BAT entries, the extension cluster, dirty bitmap clusters) overlap. QEMU
//!   opens such images read-only and repairs them when opened read/write; vimg refuses.
//! - the Format Extension has a wrong magic or MD5 checksum, a feature running past its
//!   cluster, a malformed dirty bitmap, or an unknown feature marked NECESSARY.
//!
//! Dirty bitmaps are tolerated (they do not change the disk's content) and listed in
//! `info`'s format-specific block; an image whose in-use flag says it was not closed
//! correctly is read as its BAT says (as qemu-img reads it), with a warning, and `check`
//! reports it as qemu-img does. Clusters of any multiple of 512 bytes are read.
//!
//! A ploop directory opens through its `DiskDescriptor.xml` ([`descriptor`]): the image
//! file it names goes through the gate.
//!
//! # Writing
//! The "WithouFreSpacExt" image `qemu-img create -f parallels` writes, with its one option
//! `cluster_size` (default 1 MiB; sizes rounded up to sectors, QEMU's limits and errors).
//! qemu-img has no `preallocation` option for parallels, and neither has vimg.

pub mod descriptor;
pub mod error;
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

pub use error::ParallelsError;
pub use open::{MAX_BAT_ENTRIES, MAX_TRACKS};
pub use read::{BitmapInfo, ParallelsReader};
pub use write::{layout, Layout, ParallelsWriter};

/// The parallels driver.
pub struct Driver;

const OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        name: "cluster_size",
        ty: OptionType::Size,
        help: "Parallels image cluster size",
    },
    // The file protocol's (qemu-img accepts it; the image is the same as without it).
    crate::options::PROTOCOL_OPTIONS[2],
];

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
        printed("cluster_size", Some("1048576")),
    ],
    choices: &[crate::formats::FILE_PREALLOCATION],
    streaming: Streaming::No(
        "a Parallels image keeps its BAT in front of the data and cannot be written to a stream",
    ),
};

impl crate::formats::Driver for Driver {
    fn format(&self) -> Format {
        Format::Parallels
    }

    fn probe(&self, head: &[u8], _storage: &dyn Storage) -> bool {
        // As QEMU probes: a whole header, either signature, version 2.
        let binary = head.len() >= header::HEADER_SIZE
            && (head.starts_with(&header::MAGIC_V1) || head.starts_with(&header::MAGIC_V2))
            && head[16..20] == header::VERSION.to_le_bytes();
        // A ploop directory's DiskDescriptor.xml (descriptor.rs).
        binary || descriptor::looks_like(head)
    }

    fn open(&self, storage: Arc<dyn Storage>, ctx: &OpenContext) -> Result<Box<dyn ImageReader>> {
        let mut head = vec![0u8; storage.len().min(4096) as usize];
        storage
            .read_exact_at(&mut head, 0)
            .map_err(|e| crate::Error::io("read the parallels header", e))?;
        if descriptor::looks_like(&head) {
            return Ok(Box::new(descriptor::DescriptorReader::open(storage, ctx)?));
        }
        Ok(Box::new(ParallelsReader::open(storage)?))
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
                "an existing parallels image is written through its updater, not re-created (convert -n)",
            ));
        }
        crate::formats::check_file_preallocation(opts)?;
        let cs = opts
            .get_size("cluster_size")?
            .unwrap_or(header::DEFAULT_CLUSTER_SIZE);
        // Refuse before the file exists.
        layout(size, cs)?;
        let file = out.create_main()?;
        Ok(Box::new(ParallelsWriter::new(file, size, cs)?))
    }
}

#[cfg(test)]
mod tests;
