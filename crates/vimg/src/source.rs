//! What the user names as an image, opened into bytes a format reader can parse: a file,
//! stdin, a compressed container (xz, gzip, zstd) around either, or a disk inside an OVA.
//!
//! Only the top image goes through here; files an image names (backing files, extents) are
//! opened as plain files through the gate.
//!
//! How a container is opened depends on what is inside and what is known:
//!
//! | inside | decoded size known | served by |
//! |---|---|---|
//! | raw | yes (xz index, zstd header, `stream_size`) | [`StreamStorage`]: no temporary file |
//! | raw | no, but the container is a file (gzip) | a counting pass, then [`StreamStorage`] |
//! | raw | no, from a pipe | [`SpoolStorage`], decoded whole first |
//! | another format | yes | [`SpoolStorage`], decoded as far as the reads need |
//! | another format | no | [`SpoolStorage`], decoded whole first |

pub mod cmdline;
pub(crate) mod qjson;

use std::fs::File;
use std::io::{self, IsTerminal, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::FromRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use crate::container::{
    self, Access, Compression, ContainerError, ContainerInfo, Decoder, OuterFile, SpoolLimits,
    SpoolStorage, StorageReader, StreamStorage, HEAD_BYTES,
};
use crate::error::{Error, ErrorKind, Result};
use crate::formats::Format;
use crate::ova::{self, OvaDisk};
use crate::storage::{FileStorage, MemStorage, SliceStorage, Storage};

/// What to open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A file (or block device, or FIFO).
    Path(PathBuf),
    /// The process's standard input.
    Stdin,
}

impl Source {
    /// `-` means stdin, anything else a path.
    pub fn from_arg(arg: &str) -> Source {
        if arg == "-" {
            Source::Stdin
        } else {
            Source::Path(PathBuf::from(arg))
        }
    }

    /// The name for messages (`-` for stdin).
    pub fn name(&self) -> String {
        match self {
            Source::Path(p) => p.display().to_string(),
            Source::Stdin => "-".to_string(),
        }
    }
}

/// How the top image's source is unpacked.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SourceOptions {
    /// Look inside compressed containers and OVAs (default). When false, the bytes are
    /// taken as they are.
    pub unpack: bool,
    /// Which disk of an OVA to open (0 = the first disk the OVF names).
    pub ova_disk: Option<usize>,
    /// The decoded size of a stream, when the caller knows it: lets a raw stream from a pipe
    /// through without a temporary file. The stream must decode to exactly this size.
    pub stream_size: Option<u64>,
    /// Where and how much a decoding temporary file may use.
    pub spool: SpoolLimits,
    /// Threads for decoding (xz); default: available cores.
    pub threads: Option<u32>,
    /// Decoded bytes a counting pass may read to learn the size of a raw stream whose
    /// container does not record it (gzip; zstd past its frame walk); `None`: no limit.
    /// `info` sets one, so a decompression bomb costs bounded time.
    pub count_budget: Option<u64>,
    /// Defer the whole-image probe of a container decoded into a temporary file (the
    /// polyglot rule: a fixed-VHD footer or a dmg trailer at the end of the decoded image)
    /// from open to [`crate::storage::Storage::settle`], so reading can start before the
    /// whole container is decoded. Default `false`; [`crate::convert::convert_report`]
    /// settles the storage of every layer of the image it is given before anything it wrote
    /// becomes visible, so `convert` sets it for a single source (never for the parts of
    /// [`crate::image::Image::concat`], which it would not reach).
    pub defer_whole_probe: bool,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            unpack: true,
            ova_disk: None,
            stream_size: None,
            spool: SpoolLimits::default(),
            threads: None,
            count_budget: None,
            defer_whole_probe: false,
        }
    }
}

/// How the top image was reached, for `info`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Origin {
    /// The compressed container around the image, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerInfo>,
    /// The OVA the image was taken from, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ova: Option<OvaOrigin>,
    /// The image came from a pipe (stdin or a FIFO).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub pipe: bool,
}

/// The OVA an image was taken from.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct OvaOrigin {
    /// The OVF descriptor's member name.
    pub ovf: String,
    /// Every disk the OVF names, in its order.
    pub disks: Vec<OvaDisk>,
    /// The index (into `disks`) of the opened disk.
    pub selected: usize,
    /// Every regular file in the archive.
    pub members: Vec<ova::Member>,
}

/// A source opened down to the image's bytes.
pub(crate) struct Opened {
    pub storage: Arc<dyn Storage>,
    /// The path names inside the image are resolved against (`None` for stdin).
    pub path: Option<PathBuf>,
    /// The format, when opening already had to decide it.
    pub format: Option<Format>,
    pub origin: Origin,
}

fn threads(opts: &SourceOptions) -> u32 {
    opts.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1)
    })
}

/// What opening the top image needs of [`crate::OpenOptions`].
pub(crate) struct TopOptions<'a> {
    /// The format the user gave (`None` probes).
    pub format: Option<Format>,
    /// How containers, OVAs and streams are unpacked.
    pub source: &'a SourceOptions,
}

/// Opens `src` down to the bytes of the image inside.
pub(crate) fn open_top(src: &Source, opts: &TopOptions<'_>) -> Result<Opened> {
    match src {
        Source::Path(path) => {
            let file =
                File::open(path).map_err(|e| Error::new(ErrorKind::Io, e).with_path(path))?;
            let meta = file
                .metadata()
                .map_err(|e| Error::new(ErrorKind::Io, e).with_path(path))?;
            let ft = meta.file_type();
            if ft.is_file() || ft.is_block_device() {
                let storage = FileStorage::from_file(file, path)
                    .map_err(|e| Error::new(ErrorKind::Io, e).with_path(path))?;
                open_seekable(Arc::new(storage), Some(path.clone()), opts, true)
            } else {
                let outer = OuterFile {
                    path: Some(path.clone()),
                    identity: Some((meta.dev(), meta.ino())),
                    disk_usage: None,
                };
                open_pipe(Box::new(file), Some(path.clone()), outer, opts)
            }
        }
        Source::Stdin => {
            // A duplicate of fd 0, so reading never competes with std's buffered stdin.
            // SAFETY: dup returns a new descriptor we own (or -1, checked).
            let fd = unsafe { libc::dup(0) };
            if fd < 0 {
                return Err(Error::io("read stdin", io::Error::last_os_error()));
            }
            // SAFETY: `fd` is a fresh descriptor owned by nobody else.
            let file = unsafe { File::from_raw_fd(fd) };
            if file.is_terminal() {
                return Err(Error::invalid_argument(
                    "refusing to read an image from a terminal: pipe it into stdin",
                ));
            }
            let meta = file.metadata().map_err(|e| Error::io("stat stdin", e))?;
            if meta.file_type().is_file() || meta.file_type().is_block_device() {
                // `< disk.img`: a seekable file, read like any other (names inside it
                // cannot be resolved: it has no folder).
                let storage =
                    FileStorage::from_file(file, "-").map_err(|e| Error::io("stat stdin", e))?;
                open_seekable(Arc::new(storage), None, opts, true)
            } else {
                open_pipe(Box::new(file), None, OuterFile::default(), opts)
            }
        }
    }
}

/// Opens a seekable source: plain, a container, or an OVA (when `allow_ova`).
fn open_seekable(
    storage: Arc<dyn Storage>,
    path: Option<PathBuf>,
    opts: &TopOptions<'_>,
    allow_ova: bool,
) -> Result<Opened> {
    let plain = |storage: Arc<dyn Storage>, path: Option<PathBuf>| Opened {
        storage,
        path,
        format: opts.format,
        origin: Origin::default(),
    };
    if !opts.source.unpack {
        return Ok(plain(storage, path));
    }
    let n = storage.len().min(HEAD_BYTES as u64) as usize;
    let mut head = vec![0u8; n];
    storage
        .read_exact_at(&mut head, 0)
        .map_err(|e| Error::io("read the image header", e))?;
    let name = path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "-".to_string());
    // A dmg keeps its signature in a trailer and its first chunk at offset 0: a UDBZ image
    // starts with a bzip2 stream (and a raw chunk with anything). Its trailer decides.
    if crate::formats::unread::probe_dmg(&head, &*storage) {
        return Ok(plain(storage, path));
    }
    if container::is_bzip2(&head) {
        return Err(Error::unsupported(format!(
            "'{name}' is bzip2-compressed, which vimg does not decode (xz, gzip and zstd are supported)"
        )));
    }
    if let Some(c) = container::detect(&head) {
        let outer = OuterFile {
            path: path.clone(),
            identity: storage.identity(),
            disk_usage: storage.disk_usage(),
        };
        return open_container(Some(c), Input::Seekable(storage), &[], path, outer, opts);
    }
    if allow_ova && ova::looks_like_tar(&head) {
        if let Some(archive) = ova::Ova::parse(storage.clone(), &name)? {
            let index = opts.source.ova_disk.unwrap_or(0);
            let disk = archive.disks.get(index).ok_or_else(|| {
                Error::invalid_argument(format!(
                    "OVA '{name}' has {} disk(s); there is no disk {index}",
                    archive.disks.len()
                ))
            })?;
            let slice = SliceStorage::new(
                storage.clone(),
                disk.member_offset,
                disk.member_size,
                path.clone().unwrap_or_else(|| PathBuf::from("-")),
            )
            .map_err(|e| Error::io(format_args!("open disk {index} of OVA '{name}'"), e))?;
            // A disk inside an OVA has no folder of its own: any file it names is refused by
            // the gate rather than looked up next to the archive.
            let mut opened = open_seekable(Arc::new(slice), None, opts, false)?;
            opened.origin.ova = Some(OvaOrigin {
                ovf: archive.ovf_name.clone(),
                disks: archive.disks.clone(),
                selected: index,
                members: archive.members.clone(),
            });
            return Ok(opened);
        }
    }
    Ok(plain(storage, path))
}

/// Opens a non-seekable source (stdin, a FIFO).
fn open_pipe(
    mut r: Box<dyn Read + Send>,
    path: Option<PathBuf>,
    outer: OuterFile,
    opts: &TopOptions<'_>,
) -> Result<Opened> {
    let mut head = vec![0u8; HEAD_BYTES];
    let mut n = 0;
    while n < head.len() {
        match r.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("read the stream", e)),
        }
    }
    head.truncate(n);
    let name = path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "-".to_string());
    let compression = if opts.source.unpack {
        if container::is_bzip2(&head) {
            return Err(Error::unsupported(format!(
                "'{name}' is bzip2-compressed, which vimg does not decode"
            )));
        }
        container::detect(&head)
    } else {
        None
    };
    if opts.source.unpack && compression.is_none() && ova::looks_like_tar(&head) {
        return Err(Error::unsupported(format!(
            "'{name}' is a tar archive (an OVA?) read from a pipe; OVAs need a file, since the disk is read in place"
        )));
    }
    let reader: Box<dyn Read + Send> = Box::new(io::Cursor::new(head.clone()).chain(r));
    let mut opened = open_container(compression, Input::Pipe(reader), &head, path, outer, opts)?;
    opened.origin.pipe = true;
    Ok(opened)
}

enum Input {
    Seekable(Arc<dyn Storage>),
    Pipe(Box<dyn Read + Send>),
}

/// Opens a compressed container (or, with `compression == None`, a plain pipe).
/// `raw_head` is the start of the compressed bytes when they were read already (pipes).
fn open_container(
    compression: Option<Compression>,
    input: Input,
    raw_head: &[u8],
    path: Option<PathBuf>,
    outer: OuterFile,
    opts: &TopOptions<'_>,
) -> Result<Opened> {
    let name = path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "-".to_string());
    let threads = threads(opts.source);
    let (reader, seekable): (Box<dyn Read + Send>, Option<Arc<dyn Storage>>) = match input {
        Input::Seekable(s) => (Box::new(StorageReader::new(s.clone())), Some(s)),
        Input::Pipe(r) => (r, None),
    };
    let mut dec = Decoder::new(compression, reader, &name, threads)
        .map_err(|e| Error::io(format_args!("decode '{name}'"), e))?;
    let mut head = vec![0u8; HEAD_BYTES];
    let n = dec.read_full(&mut head).map_err(|e| decode_err(&name, e))?;
    head.truncate(n);
    if let Some(outer_c) = compression {
        if let Some(inner) = container::detect(&head) {
            return Err(ContainerError::Nested {
                outer: outer_c,
                inner,
                name,
            }
            .into());
        }
    }
    let format = match opts.format {
        Some(f) => f,
        None => crate::formats::registry::probe(&MemStorage::new(head.clone()))?,
    };
    let (mut size, mut why) = match opts.source.stream_size {
        Some(s) => (Some(s), "the size given for the stream".to_string()),
        None => (None, String::new()),
    };
    if size.is_none() {
        let found = match (compression, &seekable) {
            (Some(Compression::Xz), Some(s)) => {
                Some(container::xz_decoded_size(&**s, &name)?).map(|v| (v, "its xz index"))
            }
            (Some(Compression::Zstd), Some(s)) => {
                container::zstd_decoded_size(&**s, &name)?.map(|v| (v, "its zstd frame headers"))
            }
            (Some(Compression::Zstd), None) => {
                container::zstd_size_from_head(raw_head).map(|v| (v, "its zstd frame header"))
            }
            _ => None,
        };
        if let Some((v, w)) = found {
            size = Some(v);
            why = w.to_string();
        }
    }
    if size.is_none() && format.is_plain() {
        if let (Some(c), Some(s)) = (compression, &seekable) {
            // A file whose container does not record the decoded size (gzip): one pass to
            // count is cheaper than writing the whole disk to a temporary file.
            let counter = Decoder::new(
                Some(c),
                Box::new(StorageReader::new(s.clone())),
                &name,
                threads,
            )
            .map_err(|e| Error::io(format_args!("decode '{name}'"), e))?;
            let budget = opts.source.count_budget;
            let counted = counter
                .count_within(budget)
                .map_err(|e| decode_err(&name, e))?;
            let Some(n) = counted else {
                return Err(Error::unsupported(format!(
                    "'{name}' holds a raw disk in a {c} container that does not record its decoded size; counting stopped after {} decoded bytes, so its virtual size is not determined (it is larger). Give the size with --source-size, or convert it",
                    budget.unwrap_or(0)
                )));
            };
            size = Some(n);
            why = "a first decoding pass".to_string();
        }
    }
    let compressed_size = seekable.as_ref().map(|s| s.len());
    let (storage, access): (Arc<dyn Storage>, Access) = match size {
        Some(len) if format.is_plain() => (
            Arc::new(
                StreamStorage::new(dec, head, len, &why, outer)
                    .map_err(|e| decode_err(&name, e))?,
            ),
            Access::Stream,
        ),
        _ => {
            let spool = SpoolStorage::new(dec, &head, size, &why, opts.source.spool.clone(), outer)
                .map_err(|e| decode_err(&name, e))?;
            if opts.format.is_none() {
                // The polyglot rule holds through the container: the decoded image is probed
                // whole (a fixed-VHD footer lives at its end), not only its first 64 KiB.
                // The spool decodes as far as the end for this (a pipe or gzip file was
                // decoded whole already): now, or at `settle` when the caller defers it.
                let check = move |s: &dyn Storage| whole_probe(s, format);
                if opts.source.defer_whole_probe {
                    spool.defer(Box::new(check));
                } else {
                    check(&spool)?;
                }
            }
            (Arc::new(spool), Access::TemporaryFile)
        }
    };
    let origin = Origin {
        container: compression.map(|c| ContainerInfo {
            compression: c,
            compressed_size,
            decoded_size: storage.len(),
            access,
        }),
        ova: None,
        pipe: false,
    };
    Ok(Opened {
        storage,
        path,
        format: Some(format),
        origin,
    })
}

/// The whole decoded image must probe as its first [`HEAD_BYTES`] did.
fn whole_probe(storage: &dyn Storage, format: Format) -> Result<()> {
    let whole = crate::formats::registry::probe(storage)?;
    if whole != format {
        return Err(Error::invalid(format!(
            "Image is ambiguous: its first {HEAD_BYTES} bytes parse as {format}, the whole decoded image as {whole}; specify the format with -f"
        )));
    }
    Ok(())
}

/// Turns a decode `io::Error` into a crate error, keeping a container error's kind.
fn decode_err(name: &str, e: io::Error) -> Error {
    let kind = match e.get_ref().and_then(|i| i.downcast_ref::<ContainerError>()) {
        Some(c) => crate::error::FormatError::kind(c),
        None => ErrorKind::Io,
    };
    let _ = name;
    Error::new(kind, e)
}
