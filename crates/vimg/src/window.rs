//! A window of an image read as a disk of its own: `qemu-img dd skip=N count=M` copies
//! guest bytes `[start, start + len)` of its input to offset 0 of a new image whose size
//! may be rounded up past `len` (qemu-img's raw and qcow2 create round to sectors); the
//! rounding reads as zeros. The source is read through its whole backing chain, flattened
//! as [`Image::concat`] flattens it, so the copy engine sees one layer with no backing.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::formats::Format;
use crate::image::Image;
use crate::mapping::{Extent, FileId, GuestOffset, ImageReader, MapKind};
use crate::storage::Storage;

impl Image {
    /// Guest bytes `[start, start + len)` of `self` as a disk of `size` bytes (`size >=
    /// len`; the bytes past `len` read as zeros). Refuses a window outside the image.
    pub fn window(self, start: u64, len: u64, size: u64) -> Result<Image> {
        let flat = Image::concat(vec![self])?;
        let end = start
            .checked_add(len)
            .filter(|&e| e <= flat.virtual_size())
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "window [{start}, +{len}) is outside the {}-byte disk",
                    flat.virtual_size()
                ))
            })?;
        if size < len {
            return Err(Error::invalid_argument(format!(
                "window size {size} is smaller than its {len} bytes of data"
            )));
        }
        let _ = end;
        let (filename, storage) = (flat.filename().to_string(), flat.storage().clone());
        let reader = WindowReader {
            inner: flat,
            start,
            len,
            size,
        };
        Ok(Image::from_reader(Box::new(reader), filename, storage))
    }
}

/// The reader of a window: guest offset `x` is the inner image's `start + x` for
/// `x < len`, zeros up to `size`.
struct WindowReader {
    /// One flat layer (a one-part concatenation), so file ids pass through unchanged.
    inner: Image,
    start: u64,
    len: u64,
    size: u64,
}

impl ImageReader for WindowReader {
    fn format(&self) -> Format {
        self.inner.format()
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn map(&self, offset: GuestOffset, max_len: u64) -> Result<Extent> {
        let pos = offset.get();
        if pos >= self.size {
            return Err(Error::invalid_argument(format!(
                "map at {pos:#x} is outside the virtual disk"
            )));
        }
        let max_len = max_len.min(self.size - pos);
        if pos >= self.len {
            return Ok(Extent {
                start: offset,
                len: max_len,
                kind: MapKind::Zero,
            });
        }
        let e = self
            .inner
            .reader()
            .map(GuestOffset(self.start + pos), max_len.min(self.len - pos))?;
        let kind = match e.kind {
            MapKind::Compressed {
                file,
                offset: host,
                len,
                codec,
                unit_start,
                unit_len,
            } => {
                // A unit that begins before the window: its start is below 0 here, so it
                // is kept as the distance back from this extent (read_extent only needs
                // the extent's place inside its unit, which this preserves).
                let inner_skip = (self.start + pos)
                    .checked_sub(unit_start.get())
                    .ok_or_else(|| Error::corrupt("compressed extent starts before its unit"))?;
                MapKind::Compressed {
                    file,
                    offset: host,
                    len,
                    codec,
                    unit_start: GuestOffset(pos.wrapping_sub(inner_skip)),
                    unit_len,
                }
            }
            k => k,
        };
        Ok(Extent {
            start: offset,
            len: e.len,
            kind,
        })
    }

    fn file(&self, id: FileId) -> Option<&Arc<dyn Storage>> {
        self.inner.reader().file(id)
    }

    fn files(&self) -> Vec<Arc<dyn Storage>> {
        self.inner.reader().files()
    }
}
