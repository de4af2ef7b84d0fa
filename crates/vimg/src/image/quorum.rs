//! A quorum node the user names, opened as an image (see [`crate::quorum`] for the names
//! and the voting): the node itself as the disk, or as the file of a format above it.

use std::path::Path;
use std::sync::Arc;

use super::{Image, OpenOptions};
use crate::error::{Error, ErrorKind, Result};
use crate::formats::Format;
use crate::quorum::{ChildName, Level, Quorum, QuorumName, QuorumReader, QuorumStorage};
use crate::source::Source;
use crate::storage::{FileStorage, Storage};

/// Opens what a quorum name describes.
pub(crate) fn open(q: &QuorumName, opts: &OpenOptions) -> Result<Image> {
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
        children.push(Arc::new(child));
    }
    if opts.metadata_only {
        if let Some(i) = is_file.iter().position(|f| !f) {
            // qemu-img's info describes each child as a whole node (format, size, its own
            // children); vimg describes file children only and says so rather than half.
            return Err(Error::unsupported(format!(
                "vimg describes a quorum node whose children are files; child {i} is an \
                 image ('{}')",
                children[i].filename()
            )));
        }
    }
    let quorum = Arc::new(Quorum::new(q, children, is_file)?);
    let storage: Arc<dyn Storage> = Arc::new(QuorumStorage::new(quorum.clone()));
    match q.level {
        Level::Top => {
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
        Level::File(format) => {
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
