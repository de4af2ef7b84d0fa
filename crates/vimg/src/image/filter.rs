//! A blkdebug layer the user names, opened as an image (see [`crate::blkdebug`] for the
//! names and rules): between a format and its file, the file read through the rules; above
//! an image, the image's guest disk read through them, its block status asked of the image
//! below (`map` looks through it, as qemu-img looks through filters).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Image, OpenOptions};
use crate::blkdebug::{Blkdebug, BlkdebugName, BlkdebugStorage, Event, IoType, Level};
use crate::error::{Error, ErrorKind, Result};
use crate::formats::Format;
use crate::mapping::{Extent, FileId, GuestOffset, HostOffset, ImageReader, MapKind};
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
