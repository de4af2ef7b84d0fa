//! vimg reads, writes and converts virtual disk images: raw, qcow2, vmdk, vhd (vpc), vhdx,
//! vdi, parallels (ploop), qed and qcow (v1); it reads bochs, cloop and dmg too. A format it
//! recognises but cannot read (LUKS) is refused by name, never copied as raw.
//!
//! The library in one screen:
//!
//! | | |
//! |---|---|
//! | [`Image::open`] with [`OpenOptions`] | any image, its backing chain, through a compressed container or an OVA |
//! | [`ImageReadSeek`] | the guest bytes as `Read + Seek` (and `read_at`) |
//! | [`map`] → [`Extent`]s | what is allocated where (`qemu-img map`) |
//! | [`info`], [`check`], [`compare`], [`measure`] | `qemu-img info`, `check`, `compare`, `measure` |
//! | [`convert`] with [`ConvertOptions`], [`create`] | write any [`Format`], all or nothing |
//! | [`Error`] with [`ErrorKind`] | every failure: what kind, which file, why |
//!
//! - Every format answers one block-mapping question (for a guest offset: data at a host
//!   offset, compressed data, zero, unallocated); [`Image`] reads through it for all formats
//!   and follows backing chains. A copy engine writes any image into any format, never
//!   reading or writing zero and unallocated ranges, in parallel with bounded memory.
//! - Files an image names (backing files, extents, data files, parent locators) are opened
//!   only through the [`gate`]: by default, relative names inside the image's own folder.
//! - Output is all or nothing: a failed or cancelled conversion leaves nothing behind.
//! - The top image may sit inside an xz, gzip or zstd container or an OVA, or come from
//!   stdin ([`Source`], [`SourceOptions`]); outputs can be hashed ([`HashAlg`]) and
//!   described for an image service ([`glance`]).
//!
//! Cargo features (all on by default): `zstd` (zstd-compressed qcow2 clusters and `.zst`
//! containers), `xz` (`.xz` containers), `libdeflate` (deflate and zlib units decoded about
//! twice as fast, and streamOptimized vmdk grains compressed by libdeflate; without it
//! `flate2` does both, so such vmdk output has other, equally valid bytes). Without `zstd`
//! or `xz`, such an input or output is refused with an error of kind
//! [`ErrorKind::Unsupported`].
//!
//! # Open any image and read its info
//!
//! ```
//! use vimg::{Image, ImageInfo, OpenOptions};
//! # let dir = tempfile::tempdir()?;
//! # let path = dir.path().join("disk.img");
//! # std::fs::write(&path, vec![1u8; 1 << 20])?;
//! let image = Image::open(&path, &OpenOptions::default())?;
//! let info = ImageInfo::of(&image);
//! assert_eq!(info.format, "raw");
//! assert_eq!(info.virtual_size, 1 << 20);
//! // What an image service needs, and whether the image is self-contained.
//! let svc = vimg::glance::ImageServiceInfo::of(&image, None);
//! assert_eq!((svc.disk_format, svc.min_disk, svc.safe), ("raw", 1, true));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Convert with a progress callback and a checksum
//!
//! ```
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use std::sync::Arc;
//! use vimg::{ConvertOptions, Format, HashAlg, Image, OpenOptions, Progress};
//! # let dir = tempfile::tempdir()?;
//! # let src_path = dir.path().join("disk.img");
//! # std::fs::write(&src_path, vec![7u8; 4 << 20])?;
//! let src = Image::open(&src_path, &OpenOptions::default())?;
//! let done = Arc::new(AtomicU64::new(0));
//! let seen = done.clone();
//! let mut opts = ConvertOptions::new(Format::Raw);
//! opts.copy.progress = Some(Arc::new(move |p: Progress| seen.store(p.done, Ordering::Relaxed)));
//! opts.checksum = Some(HashAlg::Sha256);
//! let report = vimg::convert_report(&src, dir.path().join("copy.raw"), &opts)?;
//! assert_eq!(done.load(Ordering::Relaxed), 4 << 20);
//! println!("sha256 {}", report.checksum.expect("asked for"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Check an untrusted image's references before opening its backing files
//!
//! Open without the backing chain, look at what the image names, and only then decide.
//!
//! ```
//! use vimg::{Image, OpenOptions};
//! # let dir = tempfile::tempdir()?;
//! # let path = dir.path().join("upload.img");
//! # std::fs::write(&path, vec![0u8; 65536])?;
//! let opts = OpenOptions::default().open_backing(false);
//! let image = Image::open(&path, &opts)?;
//! let refs = image.reader().external_refs();
//! if !refs.is_empty() {
//!     for r in &refs {
//!         eprintln!("refused: {} names '{}'", r.field, r.name);
//!     }
//!     return Err("image is not self-contained".into());
//! }
//! // Self-contained: safe to open for reading (and there is no backing file to open).
//! let image = Image::open(&path, &OpenOptions::default())?;
//! # let _ = image;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Convert from a compressed stream
//!
//! A compressed source is recognised by its magic bytes and decoded on the fly; a raw image
//! inside is streamed, without a temporary file.
//!
//! ```
//! use std::io::Write;
//! use vimg::{ConvertOptions, Format, Image, OpenOptions};
//! # let dir = tempfile::tempdir()?;
//! # let xz_path = dir.path().join("disk.raw.xz");
//! # let mut enc = liblzma::write::XzEncoder::new(Vec::new(), 1);
//! # enc.write_all(&vec![9u8; 2 << 20])?;
//! # std::fs::write(&xz_path, enc.finish()?)?;
//! let src = Image::open(&xz_path, &OpenOptions::default())?;
//! let container = src.origin().container.as_ref().expect("an xz container");
//! assert_eq!(container.compression.name(), "xz");
//! assert_eq!(src.virtual_size(), 2 << 20);
//! vimg::convert(&src, dir.path().join("disk.raw"), &ConvertOptions::new(Format::Raw))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! `crates/vimg/examples/` holds the same tasks as small programs (`info`, `convert`,
//! `check_refs`, `decompress`).

#![warn(missing_docs)]

// The documented API: the items re-exported below, and two modules.
pub mod gate;
pub mod glance;

// Internals. The `#[doc(hidden)]` ones are public only for vimg's own binary, fuzz targets,
// benches and tests; they are not part of the API and may change in any release.
#[doc(hidden)]
pub mod blkdebug;
pub(crate) mod check;

pub mod checksum;
#[doc(hidden)]
pub mod codec;
pub(crate) mod compare;
pub(crate) mod concat;
#[doc(hidden)]
pub mod container;
#[doc(hidden)]
pub mod convert;
#[doc(hidden)]
pub mod engine;
pub(crate) mod error;
#[doc(hidden)]
pub mod escape;
#[doc(hidden)]
pub mod formats;
#[doc(hidden)]
pub mod fuzzing;
#[doc(hidden)]
pub mod image;
#[doc(hidden)]
pub mod info;
/// In-place `rebase` (safe mode) and `commit`.
pub mod inplace;
#[doc(hidden)]
pub mod limits;
pub(crate) mod map;
#[doc(hidden)]
pub mod mapping;
pub(crate) mod measure;
/// Lines format drivers print as they work (QEMU's stderr lines), for a sink the program installs.
pub mod notice;
#[doc(hidden)]
pub mod options;
#[doc(hidden)]
pub mod output;
pub(crate) mod ova;
/// QEMU's `quorum` driver, read-only, for names the user types.
pub mod quorum;
mod read_seek;
#[doc(hidden)]
pub mod secret;
#[doc(hidden)]
pub mod source;
#[doc(hidden)]
pub mod storage;
/// External data files named on the command line (`data-file.filename`).
pub mod user_data_file;
pub(crate) mod window;
#[doc(hidden)]
pub mod writer;

pub use check::CheckReport;
pub use checksum::{Checksum, HashAlg};
pub use compare::{compare, CompareReport, Comparison, ReadError as CompareReadError};
pub use convert::{convert, convert_report, create, ConvertOptions, ConvertReport};
pub use engine::{CopyMode, CopyOptions, CopyStats, Progress, ProgressFn, WarnFn};
pub use error::{Error, ErrorKind, Result};
pub use formats::{Format, Measure};
pub use gate::ExternalPolicy;
pub use image::{check, Image, OpenOptions};
pub use info::{info, ImageInfo};
pub use map::{map, map_range, Extent, Map};
pub use measure::measure;
pub use options::CreateOptions;
pub use output::OutputMode;
pub use read_seek::ImageReadSeek;
pub use source::{Origin, Source, SourceOptions};

/// The README's Rust examples, compiled as doctests so they keep up with the API.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

// Internal types the hidden modules' users reach from the root.
#[doc(hidden)]
pub use mapping::{GuestOffset, HostOffset, ImageReader, MapKind};
#[doc(hidden)]
pub use output::Output;
#[doc(hidden)]
pub use writer::{ImageWriter, WriterCaps};
