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

/// Decoded bytes a fuzz run of [`open_container_bytes`] reads at most (a decompression bomb
/// must not make a run slow).
const DECODE_BUDGET: u64 = 64 << 20;

/// Untrusted bytes as a pipeline source: the container size metadata (xz index, zstd frame
/// walk), decoding up to a budget, and the OVA parser. Errors are fine; panics are the bug.
pub fn open_container_bytes(data: &[u8]) {
    use crate::container::{self, Decoder};
    let storage = Arc::new(MemStorage::new(data.to_vec()));
    let _ = container::xz_decoded_size(&*storage, "fuzz");
    let _ = container::zstd_decoded_size(&*storage, "fuzz");
    let _ = container::zstd_size_from_head(data);
    let _ = crate::ova::Ova::parse(storage.clone(), "fuzz");
    let _ = crate::glance::is_iso9660(&*storage);
    if let Some(c) = container::detect(data) {
        let input = Box::new(std::io::Cursor::new(data.to_vec()));
        let Ok(mut dec) = Decoder::new(Some(c), input, "fuzz", 1) else {
            return;
        };
        let mut buf = vec![0u8; 1 << 16];
        while dec.pos() < DECODE_BUDGET {
            match dec.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn container_fuzz_entry_survives_garbage() {
        let mut seeds: Vec<Vec<u8>> = vec![
            vec![],
            vec![
                0xfd, b'7', b'z', b'X', b'Z', 0, 0, 1, 0x69, 0x22, 0xde, 0x36,
            ],
            vec![0x28, 0xb5, 0x2f, 0xfd, 0xff, 0xff, 0xff],
            vec![0x1f, 0x8b, 0x08, 0, 0, 0, 0, 0, 0, 0, 0xff],
        ];
        let mut tar = vec![0u8; 1024];
        tar[257..262].copy_from_slice(b"ustar");
        seeds.push(tar);
        let mut x = 1u64;
        for _ in 0..50 {
            let mut v = Vec::new();
            for _ in 0..600 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                v.push(x as u8);
            }
            v[..4].copy_from_slice(&[0x28, 0xb5, 0x2f, 0xfd]);
            seeds.push(v);
        }
        for s in &seeds {
            super::open_container_bytes(s);
        }
    }
}
