//! `vimg map`: the allocation of an image's guest range, in qemu-img's entries and with its
//! merging rule (neighbours with equal flags, depth and file, and contiguous offsets, merge).

use std::path::PathBuf;

use crate::error::Result;
use crate::image::Image;
use crate::mapping::MapKind;

/// One run of `map` output, with qemu-img's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntry {
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

impl MapEntry {
    fn merges_with(&self, next: &MapEntry) -> bool {
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
pub fn entry_at(image: &Image, pos: u64, end: u64) -> Result<MapEntry> {
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
    let (present, zero, data, compressed, offset, filename) = match e.kind {
        MapKind::Data { file, offset } => {
            // As qemu asks the file under a format: data over a hole in the host file (a
            // `preallocation=metadata` image) or past its end reads as zero, and is reported
            // so ("zero": true, "data": true), split at the hole's edges.
            let mut zero = false;
            if let Some(st) = r.file(file) {
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
            // Encrypted data has no host offset qemu would print (its bytes are not the
            // guest's).
            let offset = (!r.encrypted()).then(|| offset.get());
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
    Ok(MapEntry {
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

/// The merged map of `[start, start + len)` (clipped to the virtual size).
pub fn map_image(image: &Image, start: u64, len: Option<u64>) -> Result<Vec<MapEntry>> {
    let size = image.virtual_size();
    let end = match len {
        Some(l) => start.saturating_add(l).min(size),
        None => size,
    };
    let mut out: Vec<MapEntry> = Vec::new();
    let mut pos = start;
    while pos < end {
        let entry = entry_at(image, pos, end)?;
        pos += entry.length;
        match out.last_mut() {
            Some(last) if last.merges_with(&entry) => last.length += entry.length,
            _ => out.push(entry),
        }
    }
    Ok(out)
}
