//! A blkdebug layer the user names, opened as an image (see [`crate::blkdebug`] for the
//! names and rules): between a format and its file, the file read through the rules; above
//! an image, the image's guest disk read through them, its block status asked of the image
//! below (`map` looks through it, as qemu-img looks through filters).
//!
//! And a quorum node the user names (see [`crate::quorum`] for the names and the voting):
//! the node itself as the disk, or as the file of a format above it.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Image, OpenOptions};
use crate::blkdebug::{Blkdebug, BlkdebugName, BlkdebugStorage, Event, IoType, Level};
use crate::error::{Error, ErrorKind, Result};
use crate::formats::Format;
use crate::mapping::{Extent, FileId, GuestOffset, HostOffset, ImageReader, MapKind};
use crate::quorum::{
    ChildName, Level as QuorumLevel, Quorum, QuorumChild, QuorumName, QuorumReader, QuorumStorage,
};
use crate::source::Source;
use crate::storage::{FileStorage, Storage};

/// Opens what a blkdebug name describes.
pub(crate) fn open(n: &BlkdebugName, opts: &OpenOptions) -> Result<Image> {
    let dbg = Arc::new(Blkdebug::new(n.rules.clone(), n.align).map_err(|e| e.with_path(&n.shown))?);
    match n.level {
        Level::File => {
            let path = PathBuf::from(&n.inner);
            let file = FileStorage::open(&path)
                .map_err(|e| Error::new(ErrorKind::Io, e).with_path(&n.shown))?;
            let storage: Arc<dyn Storage> = Arc::new(BlkdebugStorage::new(Arc::new(file), dbg));
            let inner = OpenOptions {
                format: opts.format.or(n.format),
                open_backing: opts.open_backing && n.open_backing,
                image_opts: false,
                ..opts.clone()
            };
            Image::open_shown(storage, &path, n.shown.clone(), &inner)
        }
        Level::Guest => {
            let inner_opts = OpenOptions {
                format: None,
                image_opts: false,
                ..opts.clone()
            };
            let inner = Image::open_source(&Source::Path(PathBuf::from(&n.inner)), &inner_opts)?;
            let inner = Arc::new(inner);
            let guest: Arc<dyn Storage> = Arc::new(GuestStorage {
                inner: inner.clone(),
                dbg: dbg.clone(),
                name: PathBuf::from(&n.shown),
            });
            let reader = BlkdebugReader {
                inner: inner.clone(),
                dbg,
                files: vec![guest.clone()],
            };
            let mut image = Image::from_reader(Box::new(reader), n.shown.clone(), guest);
            image.filtered = Some(inner);
            Ok(image)
        }
    }
}

/// The guest disk of an image, read through blkdebug's rules (`read` requests).
#[derive(Debug)]
struct GuestStorage {
    inner: Arc<Image>,
    dbg: Arc<Blkdebug>,
    name: PathBuf,
}

impl Storage for GuestStorage {
    fn len(&self) -> u64 {
        self.inner.virtual_size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let size = self.len();
        if offset >= size {
            return Ok(0);
        }
        let n = (size - offset).min(buf.len() as u64) as usize;
        self.dbg.check(offset, n as u64, IoType::Read)?;
        self.inner.read_at(&mut buf[..n], offset).map_err(|e| {
            match crate::blkdebug::os_error(&e) {
                Some(errno) => io::Error::from_raw_os_error(errno),
                None => io::Error::other(e),
            }
        })?;
        Ok(n)
    }

    fn path(&self) -> Option<&Path> {
        Some(&self.name)
    }

    fn identity(&self) -> Option<(u64, u64)> {
        self.inner.storage().identity()
    }

    fn debug_event(&self, event: Event) {
        self.dbg.event(event);
    }
}

/// blkdebug above an image: block-status queries pass the rules, then ask the image; data
/// is read from the image through [`GuestStorage`].
struct BlkdebugReader {
    inner: Arc<Image>,
    dbg: Arc<Blkdebug>,
    files: Vec<Arc<dyn Storage>>,
}

impl ImageReader for BlkdebugReader {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }

    fn cluster_size(&self) -> Option<u64> {
        self.inner.reader().cluster_size()
    }

    fn map(&self, offset: GuestOffset, max_len: u64) -> Result<Extent> {
        let pos = offset.get();
        if !crate::blkdebug::Reading::active() {
            self.dbg
                .check(pos, max_len, IoType::BlockStatus)
                .map_err(|e| Error::io(format_args!("read block status at {pos}"), e))?;
        }
        let (e, _, _) = self.inner.map_flat(pos, max_len)?;
        let kind = if e.kind.has_data() {
            MapKind::Data {
                file: FileId(0),
                offset: HostOffset(pos),
            }
        } else {
            MapKind::Zero
        };
        Ok(Extent {
            start: offset,
            len: e.len,
            kind,
        })
    }

    fn file(&self, id: FileId) -> Option<&Arc<dyn Storage>> {
        self.files.get(usize::from(id.0))
    }

    fn files(&self) -> Vec<Arc<dyn Storage>> {
        let mut v = self.files.clone();
        for layer in self.inner.chain() {
            v.extend(layer.reader().files());
        }
        v
    }
}

/// Opens what a quorum name describes.
pub(crate) fn open_quorum(q: &QuorumName, opts: &OpenOptions) -> Result<Image> {
    let mut children = Vec::with_capacity(q.children.len());
    let mut is_file = Vec::with_capacity(q.children.len());
    for c in &q.children {
        let child = match c {
            ChildName::File(path) => {
                is_file.push(true);
                let raw = OpenOptions {
                    format: Some(Format::Raw),
                    open_backing: false,
                    image_opts: false,
                    key_secret: None,
                    ..opts.clone()
                };
                open_file(path, &raw)?
            }
            ChildName::Probe(path) => {
                is_file.push(false);
                let probe = OpenOptions {
                    format: None,
                    image_opts: false,
                    key_secret: None,
                    ..opts.clone()
                };
                open_file(path, &probe)?
            }
            ChildName::Node(name) => {
                is_file.push(false);
                let inner = OpenOptions {
                    format: None,
                    image_opts: false,
                    key_secret: None,
                    ..opts.clone()
                };
                Image::open_source(&Source::Path(name.into()), &inner)?
            }
        };
        children.push(Arc::new(child) as Arc<dyn QuorumChild>);
    }
    if opts.metadata_only {
        if let Some(i) = is_file.iter().position(|f| !f) {
            // qemu-img's info describes each child as a whole node (format, size, its own
            // children); vimg describes file children only and says so rather than half.
            return Err(Error::unsupported(format!(
                "vimg describes a quorum node whose children are files; child {i} is an \
                 image ('{}')",
                children[i].name()
            )));
        }
    }
    let quorum = Arc::new(Quorum::new(q, children, is_file)?);
    let storage: Arc<dyn Storage> = Arc::new(QuorumStorage::new(quorum.clone()));
    match q.level {
        QuorumLevel::Top => {
            let reader = QuorumReader {
                q: quorum,
                file: storage.clone(),
            };
            Ok(Image::from_reader(
                Box::new(reader),
                q.shown(Format::Raw),
                storage,
            ))
        }
        QuorumLevel::File(format) => {
            let inner = OpenOptions {
                format: opts.format.or(format),
                open_backing: opts.open_backing && q.open_backing,
                image_opts: false,
                ..opts.clone()
            };
            let mut image = Image::open_chain(
                storage,
                None,
                quorum.name().to_string(),
                &inner,
                inner.format,
                0,
                &mut Vec::new(),
            )?;
            image.filename = q.shown(image.format());
            Ok(image)
        }
    }
}

/// A child the user named by its file name: opened as given (the user's name, no gate).
fn open_file(path: &Path, opts: &OpenOptions) -> Result<Image> {
    let file = FileStorage::open(path).map_err(|e| {
        Error::msg(
            ErrorKind::Io,
            format!(
                "Could not open '{}': {}",
                path.display(),
                crate::blkdebug::strerror(e.raw_os_error().unwrap_or(libc::EIO))
            ),
        )
    })?;
    Image::open_storage(Arc::new(file), Some(path), opts)
}

impl QuorumChild for Image {
    fn size(&self) -> u64 {
        self.virtual_size()
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_at(buf, offset)
    }

    fn status(&self, pos: u64, len: u64) -> Result<(bool, u64)> {
        let (e, _, _) = self.map_flat(pos, len)?;
        Ok((!e.kind.has_data(), e.len))
    }

    fn name(&self) -> &str {
        self.filename()
    }

    fn storage(&self) -> &Arc<dyn Storage> {
        Image::storage(self)
    }

    fn allocated(&self) -> u64 {
        self.reader().allocated_size().unwrap_or(0)
    }

    fn all_files(&self) -> Vec<Arc<dyn Storage>> {
        self.chain()
            .iter()
            .flat_map(|l| l.reader().files())
            .collect()
    }
}
