//! vimg reads, writes and converts virtual disk images: raw, qcow2, vmdk, vhd (vpc), vhdx
//! and vdi.
//!
//! - Every format answers one block-mapping trait, [`ImageReader`]: for a guest offset,
//!   what is there (data at a host offset, compressed data, zero, unallocated). [`Image`]
//!   reads through it for all formats and follows backing chains.
//! - Every format writes through [`ImageWriter`]; the [`engine`] copies any image into any
//!   writer, never reading or writing zero and unallocated ranges, in parallel with bounded
//!   memory.
//! - Files an image names (backing files, extents, data files, parent locators) are opened
//!   only through the [`gate`]: by default, relative names inside the image's own folder.
//! - Output is all or nothing ([`Output`]).
//!
//! ```no_run
//! use vimg::{Image, OpenOptions, ConvertOptions, Format};
//! let src = Image::open("disk.vmdk", &OpenOptions::default())?;
//! println!("{} bytes of {}", src.virtual_size(), src.format());
//! vimg::convert(&src, "disk.qcow2", &ConvertOptions::new(Format::Qcow2))?;
//! # Ok::<(), vimg::Error>(())
//! ```

#![warn(missing_docs)]

pub mod check;
pub mod checksum;
pub mod codec;
pub mod container;
pub mod convert;
pub mod engine;
pub mod error;
pub mod formats;
pub mod fuzzing;
pub mod gate;
pub mod glance;
pub mod image;
pub mod info;
pub mod limits;
pub mod mapping;
pub mod options;
pub mod output;
pub mod ova;
pub mod source;
pub mod storage;
pub mod writer;

pub use checksum::{Checksum, HashAlg};
pub use convert::{convert, convert_report, create, ConvertOptions, ConvertReport};
pub use engine::{CopyMode, CopyOptions, CopyStats, Progress};
pub use error::{Error, ErrorKind, Result};
pub use formats::Format;
pub use gate::ExternalPolicy;
pub use image::{Image, OpenOptions};
pub use info::ImageInfo;
pub use mapping::{Extent, GuestOffset, HostOffset, ImageReader, MapKind};
pub use options::CreateOptions;
pub use output::{Output, OutputMode};
pub use source::{Origin, Source, SourceOptions};
pub use writer::{ImageWriter, WriterCaps};
