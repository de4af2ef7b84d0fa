//! Several images read one after another as one disk: `qemu-img convert a b c out` copies
//! the guest data of `a`, then `b`, then `c` into one output (iotest 122). Each part is
//! read through its own backing chain; the output sees one virtual disk whose size is the
//! sum of the parts'.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::formats::Format;
use crate::image::Image;
use crate::mapping::{Extent, FileId, GuestOffset, ImageReader, MapKind};
use crate::storage::Storage;

impl Image {
    /// Several images read one after another as one disk (`convert a b c out`); see
    /// the `concat` module. Shown under the first part's name.
    pub fn concat(parts: Vec<Image>) -> Result<Image> {
        let reader = ConcatReader::new(parts)?;
        let first = reader.first();
        let (filename, storage) = (first.filename().to_string(), first.storage().clone());
        Ok(Image::from_reader(Box::new(reader), filename, storage))
    }
}

/// The reader of a concatenation. Its files are every file of every layer of every part,
/// numbered in that order.
pub struct ConcatReader {
    /// The parts with the guest offset each starts at.
    parts: Vec<(u64, Image)>,
    size: u64,
    files: Vec<Arc<dyn Storage>>,
    /// `ids[part][depth][local file id]`: the file's number here.
    ids: Vec<Vec<Vec<Option<FileId>>>>,
}

impl ConcatReader {
    /// Joins `parts` in order. Refuses an empty list, a total size that overflows, and more
    /// files than a [`FileId`] numbers.
    pub fn new(parts: Vec<Image>) -> Result<ConcatReader> {
        if parts.is_empty() {
            return Err(Error::invalid_argument("no source images to concatenate"));
        }
        let mut files: Vec<Arc<dyn Storage>> = Vec::new();
        let mut ids = Vec::new();
        let mut at = Vec::new();
        let mut size = 0u64;
        for img in parts {
            let mut per_layer = Vec::new();
            for layer in img.chain() {
                // A reader numbers its files densely from 0 (image, data file, extents).
                let count = layer.reader().files().len() + 2;
                let mut local = Vec::with_capacity(count);
                for k in 0..count {
                    let id = u16::try_from(k).ok().map(FileId);
                    match id.and_then(|id| layer.reader().file(id)) {
                        Some(f) => {
                            let n = u16::try_from(files.len())
                                .map_err(|_| Error::unsupported("too many files to concatenate"))?;
                            files.push(f.clone());
                            local.push(Some(FileId(n)));
                        }
                        None => local.push(None),
                    }
                }
                per_layer.push(local);
            }
            ids.push(per_layer);
            let start = size;
            size = size
                .checked_add(img.virtual_size())
                .ok_or_else(|| Error::invalid_argument("the concatenated sources are too large"))?;
            at.push((start, img));
        }
        Ok(ConcatReader {
            parts: at,
            size,
            files,
            ids,
        })
    }

    /// The first part (its format and storage stand for the whole).
    pub fn first(&self) -> &Image {
        &self.parts[0].1
    }

    fn global(&self, part: usize, depth: usize, id: FileId) -> Result<FileId> {
        self.ids
            .get(part)
            .and_then(|l| l.get(depth))
            .and_then(|f| f.get(usize::from(id.0)))
            .copied()
            .flatten()
            .ok_or_else(|| Error::corrupt("a concatenated image mapped to a file it does not list"))
    }
}

impl ImageReader for ConcatReader {
    fn format(&self) -> Format {
        self.first().format()
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn map(&self, offset: GuestOffset, max_len: u64) -> Result<Extent> {
        let pos = offset.get();
        let i = self
            .parts
            .partition_point(|(start, _)| *start <= pos)
            .saturating_sub(1);
        // Skip empty parts that start where this one does.
        let (i, (start, img)) = self.parts[i..]
            .iter()
            .enumerate()
            .map(|(k, p)| (i + k, p))
            .find(|(_, (s, img))| pos < s + img.virtual_size())
            .ok_or_else(|| {
                Error::invalid_argument(format!("map at {pos:#x} is outside the virtual disk"))
            })?;
        let local = pos - start;
        let len = max_len.min(img.virtual_size() - local);
        let (e, _, depth) = img.map_flat(local, len)?;
        let kind = match e.kind {
            MapKind::Data { file, offset } => MapKind::Data {
                file: self.global(i, depth, file)?,
                offset,
            },
            MapKind::Compressed {
                file,
                offset,
                len,
                codec,
                unit_start,
                unit_len,
            } => MapKind::Compressed {
                file: self.global(i, depth, file)?,
                offset,
                len,
                codec,
                unit_start: GuestOffset(unit_start.get() + start),
                unit_len,
            },
            k => k,
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
        self.files.clone()
    }
}
