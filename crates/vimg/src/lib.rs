//! vimg reads, writes and converts virtual disk images: raw, qcow2, vmdk, vhd (vpc), vhdx,
//! vdi, parallels (ploop), qed and qcow (v1); it reads bochs, cloop and dmg too. A format it
//! recognises but cannot read (LUKS) is refused by name, never copied as raw.
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
//! - The top image may sit inside an xz, gzip or zstd container or an OVA, or come from
//!   stdin ([`source`], [`container`], [`ova`]); outputs can be hashed ([`checksum`]) and
//!   described for an image service ([`glance`]).
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
//! use vimg::{ConvertOptions, Format, HashAlg, Image, OpenOptions, Progress};
//! # let dir = tempfile::tempdir()?;
//! # let src_path = dir.path().join("disk.img");
//! # std::fs::write(&src_path, vec![7u8; 4 << 20])?;
//! let src = Image::open(&src_path, &OpenOptions::default())?;
//! let done = AtomicU64::new(0);
//! let on_progress = |p: Progress| done.store(p.done, Ordering::Relaxed);
//! let mut opts = ConvertOptions::new(Format::Raw);
//! opts.copy.progress = Some(&on_progress);
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
//! let opts = OpenOptions { open_backing: false, ..OpenOptions::default() };
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

pub mod check;
pub mod checksum;
pub mod codec;
pub mod compare;
pub mod concat;
pub mod container;
pub mod convert;
pub mod engine;
pub mod error;
pub mod escape;
pub mod formats;
pub mod fuzzing;
pub mod gate;
pub mod glance;
pub mod image;
pub mod info;
pub mod limits;
pub mod map;
pub mod mapping;
pub mod measure;
pub mod options;
pub mod output;
pub mod ova;
pub mod secret;
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
