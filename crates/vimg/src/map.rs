//! [`map`]: the allocation of an image's guest range (`qemu-img map`), in qemu-img's
//! entries and with its merging rule (neighbours with equal flags, depth and file, and
//! contiguous offsets, merge).

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::image::Image;
use crate::mapping::MapKind;

/// One run of [`map`] output, with qemu-img's fields (`qemu-img map --output=json`).
///
/// ```
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("disk.img");
/// # std::fs::write(&path, vec![9u8; 65536])?;
/// let image = vimg::Image::open(&path, &vimg::OpenOptions::default())?;
/// let first: vimg::Extent = vimg::map(&image).next().expect("one extent")?;
/// assert_eq!((first.start, first.length, first.data, first.offset), (0, 65536, true, Some(0)));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Extent {
    /// First guest byte.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Which layer of the backing chain holds it (0 = the image itself).
    pub depth: usize,
    /// Some layer stores the range (data or explicit zeros).
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Stored data.
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset, where the bytes sit at one place in a file.
    pub offset: Option<u64>,
    /// The file holding the bytes (for human output).
    pub filename: Option<PathBuf>,
}

impl Extent {
    fn merges_with(&self, next: &Extent) -> bool {
        self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && self.filename == next.filename
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a.checked_add(self.length) == Some(b),
                _ => false,
            }
    }
}

/// The map entry of the run that starts at `pos`, at most `end - pos` long (not merged).
pub fn entry_at(image: &Image, pos: u64, end: u64) -> Result<Extent> {
    if let Some(inner) = image.filtered() {
        // The filter's own status query first (a blkdebug rule may fail it).
        image.map_flat(pos, end - pos)?;
        return entry_at(inner, pos, end);
    }
    let (e, layer, depth) = image.map_flat(pos, end - pos)?;
    let r = layer.reader();
    // The layer's own file is named as the user (or the overlay) named it, as qemu does;
    // other files (extents, data files) by their path.
    let own = layer.storage().identity();
    let file_path = |id| {
        let f = r.file(id)?;
        if f.identity().is_some() && f.identity() == own {
            return Some(PathBuf::from(layer.filename()));
        }
        f.path().map(|p| p.to_path_buf())
    };
    let mut length = e.len;
    if !r.reports_allocation() {
        // qemu's generic answer for a driver without block status: data, no offset.
        return Ok(Extent {
            start: pos,
            length,
            depth,
            present: true,
            zero: false,
            data: true,
            compressed: false,
            offset: None,
            filename: None,
        });
    }
    let (present, zero, data, compressed, offset, filename) = match e.kind {
        MapKind::Data { file, offset } => {
            // As qemu asks the file under a format: data over a hole in the host file (a
            // `preallocation=metadata` image) or past its end reads as zero, and is reported
            // so ("zero": true, "data": true), split at the hole's edges.
            let mut zero = false;
            if let Some(st) = r.file(file).filter(|_| r.map_probes_host_holes()) {
                match st.next_data(offset.get()) {
                    Ok(Some((ds, _))) if ds > offset.get() => {
                        zero = true;
                        length = length.min(ds - offset.get());
                    }
                    Ok(Some((_, de))) if de > offset.get() => {
                        length = length.min(de - offset.get());
                    }
                    Ok(None) => zero = true,
                    _ => {}
                }
            }
            // Under O_DIRECT qemu's file driver rounds a data run that ends in a partial
            // sector at the end of the file up to the sector's end.
            let align = r.status_alignment();
            if let Some(st) = r.file(file).filter(|_| align > 1 && !zero) {
                let flen = st.len();
                if offset.get().checked_add(length) == Some(flen) && flen % align != 0 {
                    let to = flen.div_ceil(align).saturating_mul(align) - offset.get();
                    length = to.min(end - pos);
                }
            }
            // Encrypted data has no host offset qemu would print (its bytes are not the
            // guest's); nor has a quorum node's.
            let offset = (!r.encrypted() && r.host_offsets()).then(|| offset.get());
            (true, zero, true, false, offset, file_path(file))
        }
        MapKind::Compressed { file, .. } => (true, false, true, true, None, file_path(file)),
        MapKind::Zero => {
            let loc = r.zero_location(&e);
            (
                true,
                true,
                false,
                false,
                loc.map(|(_, o)| o.get()),
                loc.and_then(|(f, _)| file_path(f)),
            )
        }
        MapKind::Unallocated => (false, true, false, false, None, None),
    };
    Ok(Extent {
        start: pos,
        length,
        depth,
        present,
        zero,
        data,
        compressed,
        offset,
        filename,
    })
}

/// The merged map of the whole of `image`, in guest order: an iterator that maps as it goes
/// (memory does not grow with the disk), yielding an error at most once, last.
///
/// ```
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("disk.img");
/// # let mut bytes = vec![0u8; 8 << 20];
/// # bytes[1 << 20..(1 << 20) + 65536].fill(1);
/// # std::fs::write(&path, bytes)?;
/// let image = vimg::Image::open(&path, &vimg::OpenOptions::default())?;
/// for extent in vimg::map(&image) {
///     let e = extent?;
///     println!("{:#x} +{:#x} data={} zero={}", e.start, e.length, e.data, e.zero);
/// }
/// // Data and zero runs cover the disk, back to back.
/// let all = vimg::map(&image).collect::<vimg::Result<Vec<_>>>()?;
/// assert_eq!(all.iter().map(|e| e.length).sum::<u64>(), image.virtual_size());
/// assert!(all.iter().any(|e| e.data && e.start <= 1 << 20));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn map(image: &Image) -> Map<'_> {
    map_range(image, 0, None)
}

/// [`map`] of `[start, start + len)` (clipped to the virtual size; `None`: to the end).
pub fn map_range(image: &Image, start: u64, len: Option<u64>) -> Map<'_> {
    let size = image.virtual_size();
    let end = match len {
        Some(l) => start.saturating_add(l).min(size),
        None => size,
    };
    Map {
        image,
        pos: start,
        end,
        pending: None,
        failed: None,
    }
}

/// The iterator [`map`] returns.
#[derive(Debug)]
pub struct Map<'a> {
    image: &'a Image,
    pos: u64,
    end: u64,
    /// The extent being merged with its successors.
    pending: Option<Extent>,
    /// An error met after `pending`, returned once `pending` is out.
    failed: Option<Error>,
}

impl Iterator for Map<'_> {
    type Item = Result<Extent>;

    fn next(&mut self) -> Option<Result<Extent>> {
        if let Some(e) = self.failed.take() {
            return Some(Err(e));
        }
        while self.pos < self.end {
            let entry = match entry_at(self.image, self.pos, self.end) {
                Ok(entry) => entry,
                Err(e) => {
                    let e = e.with_path(self.image.filename());
                    self.pos = self.end;
                    return match self.pending.take() {
                        Some(p) => {
                            self.failed = Some(e);
                            Some(Ok(p))
                        }
                        None => Some(Err(e)),
                    };
                }
            };
            self.pos += entry.length;
            match &mut self.pending {
                Some(last) if last.merges_with(&entry) => last.length += entry.length,
                _ => {
                    if let Some(done) = self.pending.replace(entry) {
                        return Some(Ok(done));
                    }
                }
            }
        }
        self.pending.take().map(Ok)
    }
}
