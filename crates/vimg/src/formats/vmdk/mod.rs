//! vmdk: VMware virtual disks (VMware "Virtual Disk Format 1.1").
//!
//! - [`descriptor`]: the descriptor text ("The Descriptor File"), separate or embedded.
//! - [`header`]: hosted sparse extent header and stream-optimized markers ("Hosted Sparse
//!   Extent Header", "Stream-Optimized Compressed Sparse Extents"), COWD and seSparse.
//! - `sparse`: the grain directory / grain table walk shared by every sparse kind.
//! - `open`: opening, with headers, descriptor and extents checked; `read`: the mapping
//!   (monolithic, split, flat, VMFS, ZERO, vmfsSparse, seSparse extents;
//!   delta links as a backing chain). A delta link's `parentCID` must equal the opened
//!   parent's `CID` ("The Descriptor File": a parent changed since the child was made gets
//!   a new CID); a mismatch refuses the chain as corrupt, naming both files and CIDs, as
//!   VMware and libvmdk refuse it. qemu-img opens such a chain but fails every read that
//!   reaches the parent (`Invalid argument`). `parentCID=ffffffff` ("no parent") next to a
//!   `parentFileNameHint` is compared like any value, as qemu and libvmdk do.
//! - `write`: the writers (monolithicSparse, streamOptimized, monolithicFlat,
//!   twoGbMaxExtentSparse, twoGbMaxExtentFlat), laid out as qemu-img lays them out except
//!   streamOptimized, which uses VMware's true stream layout (footer, markers).

pub mod descriptor;
pub mod error;
pub mod header;
mod open;
mod read;
mod sparse;
pub mod update;
mod write;

use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};
use crate::formats::{printed, Capabilities, Choice, ChoiceRefusal, Streaming, Support};
use crate::formats::{Format, OpenContext};
use crate::mapping::ImageReader;
use crate::options::{CreateOptions, OptionSpec, OptionType};
use crate::output::Output;
use crate::storage::Storage;
use crate::writer::ImageWriter;

pub use error::VmdkError;
pub use read::VmdkReader;
pub use write::{Settings, Subformat, DEFLATE_LEVEL};

use header::SECTOR;
use write::{SparseLayout, SPLIT_SIZE};

/// The vmdk driver.
pub struct Driver;

const OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        name: "adapter_type",
        ty: OptionType::Str,
        help: "Virtual adapter type, can be one of ide (default), lsilogic, buslogic or legacyESX",
    },
    OptionSpec {
        name: "backing_file",
        ty: OptionType::Str,
        help: "File name of a base image",
    },
    OptionSpec {
        name: "backing_fmt",
        ty: OptionType::Str,
        help: "Must be 'vmdk' if present",
    },
    OptionSpec {
        name: "compat6",
        ty: OptionType::Bool,
        help: "VMDK version 6 image",
    },
    OptionSpec {
        name: "hwversion",
        ty: OptionType::Str,
        help: "VMDK hardware version",
    },
    OptionSpec {
        name: "subformat",
        ty: OptionType::Str,
        help: "VMDK flat extent format, can be one of {monolithicSparse (default) | monolithicFlat | twoGbMaxExtentSparse | twoGbMaxExtentFlat | streamOptimized} ",
    },
    OptionSpec {
        name: "toolsversion",
        ty: OptionType::Str,
        help: "VMware guest tools version",
    },
    OptionSpec {
        name: "zeroed_grain",
        ty: OptionType::Bool,
        help: "Enable efficient zero writes using the zeroed-grain GTE feature",
    },
    // The file protocol's (qemu-img accepts it; the image is the same as without it).
    crate::options::PROTOCOL_OPTIONS[2],
];

/// True when `head` looks like a descriptor file: qemu's rule (comment and blank lines,
/// then `version=N`), or a `# Disk DescriptorFile` first line, or a `createType=` line in
/// the first 4 KiB of NUL-free text.
fn looks_like_descriptor(head: &[u8]) -> bool {
    let head = &head[..head.len().min(4096)];
    let text_end = head.iter().position(|&b| b == 0).unwrap_or(head.len());
    let Ok(text) = std::str::from_utf8(&head[..text_end]) else {
        return false;
    };
    // The strong signals stand on their own: qemu-img pads a separate descriptor with
    // whatever its buffer held after the text (a "\0\n" is common), so what follows the first
    // NUL must not matter for them.
    if text.trim_start().starts_with("# Disk DescriptorFile") {
        return true;
    }
    for line in text.lines() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        if matches!(l, "version=1" | "version=2" | "version=3") {
            return true;
        }
        break;
    }
    // The weak signal (a createType line anywhere) only for a file that is text and NUL
    // padding, so a raw disk that happens to hold such a line is not taken for a descriptor.
    if head[text_end..].iter().any(|&b| b != 0) {
        return false;
    }
    text.lines().any(|l| {
        l.trim_start()
            .strip_prefix("createType")
            .is_some_and(|r| r.trim_start().starts_with('='))
    })
}

/// Reads the create options into checked settings, with qemu-img's messages.
pub fn settings(size: u64, opts: &CreateOptions) -> Result<Settings> {
    let arg = |m: String| -> Error { VmdkError::Argument(m).into() };
    if let Some(f) = opts.get_str("backing_fmt") {
        if f != "vmdk" {
            return Err(arg("backing_file must be a vmdk image".into()));
        }
    }
    let s = CAPABILITIES.choice("subformat", opts)?;
    let subformat =
        Subformat::parse(s).ok_or_else(|| arg(format!("invalid parameter value: {s}")))?;
    let adapter = CAPABILITIES.choice("adapter_type", opts)?;
    let compat6 = opts.get_bool("compat6", false)?;
    let hw = opts.get_str("hwversion").filter(|h| *h != "undefined");
    let hwversion = match (compat6, hw) {
        (true, Some(_)) => return Err(arg("compat6 cannot be enabled with hwversion set".into())),
        (true, None) => "6".to_string(),
        (false, Some(h)) => h.to_string(),
        (false, None) => "4".to_string(),
    };
    let zeroed_grain = opts.get_bool("zeroed_grain", false)?;
    crate::formats::check_file_preallocation(opts)?;
    if subformat.flat() && zeroed_grain {
        return Err(arg("Flat image can't enable zeroed grain".into()));
    }
    if subformat.flat() && opts.get_str("backing_file").is_some() {
        return Err(arg("Flat image can't have backing file".into()));
    }
    if opts.compress && subformat.flat() {
        // qemu-img convert -c refuses flat targets with this message.
        return Err(Error::refusal(
            ErrorKind::InvalidArgument,
            "invalid cluster size",
        ));
    }
    let size = size
        .checked_next_multiple_of(SECTOR)
        .ok_or_else(|| arg("Image size is too large".into()))?;
    check_size(subformat, size)?;
    Ok(Settings {
        subformat,
        adapter: adapter.to_string(),
        hwversion,
        toolsversion: opts
            .get_str("toolsversion")
            .unwrap_or("2147483647")
            .to_string(),
        zeroed_grain,
        size,
        parent: None,
    })
}

/// Grain directory entries QEMU opens at most (`vmdk_add_extent`: "L1 size too big").
const QEMU_MAX_GD_ENTRIES: u64 = 32 << 20;

/// Refuses, before anything is written or allocated, a virtual size the subformat cannot
/// describe: more than vimg's reader opens ([`crate::limits::MAX_VIRTUAL_SIZE`]), a grain
/// directory QEMU would not open ("L1 size too big", past 1 PiB) or that
/// vimg's reader would not hold ([`crate::limits::MAX_TABLE_BYTES`], 256 TiB), or more
/// extent files than a descriptor may name.
fn check_size(subformat: Subformat, size: u64) -> Result<()> {
    let arg = |m: String| -> Error { VmdkError::Argument(m).into() };
    if size > crate::limits::MAX_VIRTUAL_SIZE {
        // What vimg's reader opens (a flat extent could otherwise be written, sparse, and
        // then refused).
        return Err(arg(format!(
            "Image size is too large: {size} bytes, more than vimg's limit of {}",
            crate::limits::MAX_VIRTUAL_SIZE
        )));
    }
    if subformat.split() {
        let extents = size.div_ceil(SPLIT_SIZE);
        if extents > descriptor::MAX_EXTENTS as u64 {
            return Err(arg(format!(
                "Image size is too large: a {} image of {size} bytes needs {extents} extent files, more than the {} a descriptor may name",
                subformat.name(),
                descriptor::MAX_EXTENTS
            )));
        }
        return Ok(());
    }
    if subformat.flat() {
        return Ok(());
    }
    let gd = SparseLayout::new(size).gt_count;
    if gd > QEMU_MAX_GD_ENTRIES {
        return Err(arg(format!(
            "L1 size too big (a vmdk image of {size} bytes needs a grain directory of {gd} entries; qemu opens at most {QEMU_MAX_GD_ENTRIES})"
        )));
    }
    let max = crate::limits::MAX_TABLE_BYTES / 4;
    if gd > max {
        return Err(arg(format!(
            "L1 size too big (a vmdk image of {size} bytes needs a grain directory of {gd} entries; vimg's limit is {max})"
        )));
    }
    Ok(())
}

/// Reads the CID of the parent named by `backing_file`, relative to the new image's folder
/// (the user named it on the command line, so no gate applies; it must be a vmdk).
fn parent_cid(out: &Output, opts: &CreateOptions, name: &str) -> Result<u32> {
    let path = if std::path::Path::new(name).is_absolute() {
        std::path::PathBuf::from(name)
    } else {
        out.folder().join(name)
    };
    let img = opts
        .open_named(&path)
        .map_err(|e| e.context(format!("Could not open backing file '{}'", path.display())))?;
    if img.format() != Format::Vmdk {
        return Err(VmdkError::Argument(format!(
            "Invalid backing file format: {}. Must be vmdk",
            img.format().name()
        ))
        .into());
    }
    let fs = img
        .format_specific()
        .ok_or_else(|| Error::invalid("Failed to read parent CID"))?;
    fs.data
        .get("cid")
        .and_then(|v| v.as_u64())
        .and_then(|c| u32::try_from(c).ok())
        .ok_or_else(|| Error::invalid("Failed to read parent CID"))
}

/// What the driver does ([`crate::formats::Capabilities`]).
const CAPABILITIES: Capabilities = Capabilities {
    create: true,
    compressed: Support::Yes,
    in_place: Support::Yes,
    backing_file: true,
    bitmaps: false,
    printed: &[
        printed("size", None),
        printed("adapter_type", None),
        printed("backing_file", None),
        printed("backing_fmt", None),
        printed("compat6", Some("off")),
        printed("hwversion", Some("undefined")),
        printed("toolsversion", None),
        printed("subformat", None),
        printed("zeroed_grain", None),
    ],
    choices: &[
        Choice {
            option: "subformat",
            values: &[
                "monolithicSparse",
                "monolithicFlat",
                "twoGbMaxExtentSparse",
                "twoGbMaxExtentFlat",
                "streamOptimized",
            ],
            default: "monolithicSparse",
            refusal: ChoiceRefusal::InvalidValue,
        },
        Choice {
            option: "adapter_type",
            values: &["ide", "lsilogic", "buslogic", "legacyESX"],
            default: "ide",
            refusal: ChoiceRefusal::InvalidValue,
        },
        crate::formats::FILE_PREALLOCATION,
    ],
    streaming: Streaming::When {
        option: "subformat",
        values: &["streamOptimized"],
        otherwise:
            "this vmdk subformat cannot be written to a stream; use subformat=streamOptimized",
    },
};

impl crate::formats::Driver for Driver {
    fn format(&self) -> Format {
        Format::Vmdk
    }

    fn probe(&self, head: &[u8], _storage: &dyn Storage) -> bool {
        head.starts_with(b"KDMV") || head.starts_with(b"COWD") || looks_like_descriptor(head)
    }

    fn open(&self, storage: Arc<dyn Storage>, ctx: &OpenContext) -> Result<Box<dyn ImageReader>> {
        Ok(Box::new(VmdkReader::open(storage, ctx)?))
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
        let mut s = settings(size, opts)?;
        if let Some(b) = opts.get_str("backing_file") {
            s.parent = Some((b.to_string(), parent_cid(out, opts, b)?));
        }
        Ok(match s.subformat {
            Subformat::MonolithicSparse | Subformat::TwoGbSparse => {
                Box::new(write::SparseWriter::create(out, &s)?)
            }
            Subformat::MonolithicFlat | Subformat::TwoGbFlat => {
                Box::new(write::FlatWriter::create(out, &s)?)
            }
            Subformat::StreamOptimized => Box::new(write::StreamWriter::create(out, &s)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_descriptors() {
        assert!(looks_like_descriptor(b"# Disk DescriptorFile\nversion=1\n"));
        assert!(looks_like_descriptor(b"\n# c\nversion=1\nCID=1\n"));
        assert!(looks_like_descriptor(b"x=1\ncreateType = \"vmfs\"\n"));
        assert!(!looks_like_descriptor(b"hello world\n"));
        assert!(!looks_like_descriptor(b"createType=\"x\"\n\0\0\x01"));
        // qemu-img's separate descriptors can carry a stray newline after the NUL padding.
        assert!(looks_like_descriptor(
            b"# Disk DescriptorFile\nversion=1\n\0\n\0\0"
        ));
        assert!(looks_like_descriptor(b"version=1\nCID=1\n\0\n\0"));
    }

    #[test]
    fn options_like_qemu() {
        let o = |s: &str| {
            let mut c = CreateOptions::new();
            c.parse_into(s).unwrap();
            settings(1 << 20, &c)
        };
        assert_eq!(o("").unwrap().hwversion, "4");
        assert_eq!(o("compat6=on").unwrap().hwversion, "6");
        assert_eq!(
            o("compat6=on,hwversion=7").unwrap_err().to_string(),
            "compat6 cannot be enabled with hwversion set"
        );
        assert_eq!(
            o("adapter_type=foo").unwrap_err().to_string(),
            "invalid parameter value: foo"
        );
        assert_eq!(
            o("subformat=foo").unwrap_err().to_string(),
            "invalid parameter value: foo"
        );
        assert_eq!(
            o("subformat=monolithicFlat,zeroed_grain=on")
                .unwrap_err()
                .to_string(),
            "Flat image can't enable zeroed grain"
        );
        assert_eq!(
            o("backing_fmt=qcow2").unwrap_err().to_string(),
            "backing_file must be a vmdk image"
        );
    }

    /// Found by the `write_size` fuzz target: a monolithicFlat image of 2^62 bytes was
    /// written (sparse, on tmpfs) and then refused by vimg's own reader.
    #[test]
    fn sizes_past_what_the_reader_opens_are_refused() {
        let c = CreateOptions::new();
        let flat = c.clone().with("subformat", "monolithicFlat");
        let e = settings(6_917_529_027_641_093_105, &flat).unwrap_err();
        assert!(e.to_string().contains("more than vimg's limit"), "{e}");
        assert!(settings(crate::limits::MAX_VIRTUAL_SIZE, &flat).is_ok());
        let e = settings(1 << 54, &c).unwrap_err();
        assert!(e.to_string().starts_with("L1 size too big"), "{e}");
        assert!(settings(1 << 48, &c).is_ok());
        assert!(settings((1 << 48) + 1, &c).is_err());
        let split = c.clone().with("subformat", "twoGbMaxExtentSparse");
        assert!(settings(16384 * (2047 << 20), &split).is_ok());
        assert!(settings(1 << 50, &split).is_err());
    }
}
