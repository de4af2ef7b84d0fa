//! The property every fuzz target checks, in one place: untrusted bytes opened as an image
//! either fail with an error or give a reader whose whole mapping can be walked and read,
//! without panicking, hanging or allocating what a header claims.

use std::sync::Arc;

use crate::formats::Format;
use crate::image::{Image, OpenOptions};
use crate::info::ImageInfo;
use crate::storage::MemStorage;

/// Guest bytes a fuzz run reads at most (the rest of a huge virtual disk is only mapped).
const READ_BUDGET: u64 = 64 << 20;
/// Extents a fuzz run walks at most.
const EXTENT_BUDGET: usize = 100_000;

/// Opens `data` as `format` (or probes), collects `info`, walks the mapping and reads every
/// mapped byte up to a budget. Errors are fine; panics are the bug.
pub fn open_and_read_all(data: &[u8], format: Option<Format>) {
    open_at_and_read_all(data, None, format);
}

/// [`open_and_read_all`] for bytes that claim to live at `path`, so the files the image
/// names (extents, backing files) are looked up next to it, through the gate.
pub fn open_at_and_read_all(data: &[u8], path: Option<&std::path::Path>, format: Option<Format>) {
    let storage = Arc::new(MemStorage::new(data.to_vec()));
    let opts = OpenOptions {
        format,
        ..OpenOptions::default()
    };
    let Ok(image) = Image::open_storage(storage, path, &opts) else {
        return;
    };
    let _ = serde_json::to_string(&ImageInfo::of(&image));
    let _ = image.reader().check();
    let size = image.virtual_size();
    let mut pos = 0u64;
    let mut read = 0u64;
    let mut buf = Vec::new();
    for _ in 0..EXTENT_BUDGET {
        if pos >= size {
            break;
        }
        let Ok((e, _, _)) = image.map_flat(pos, size - pos) else {
            return;
        };
        assert_eq!(e.start.get(), pos, "extent must start where asked");
        assert!(
            e.len > 0 && e.end() <= size,
            "extent must be non-empty and in range"
        );
        if e.kind.has_data() && read < READ_BUDGET {
            let n = e.len.min(1 << 20).min(READ_BUDGET - read);
            buf.resize(n as usize, 0);
            if image.read_at(&mut buf, pos).is_err() {
                return;
            }
            read += n;
        }
        pos = e.end();
    }
}
