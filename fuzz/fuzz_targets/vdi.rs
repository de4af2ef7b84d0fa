//! Untrusted bytes opened as vdi: open, info, map the whole range, read every mapped byte;
//! then the header's parse -> write round trip and the block map bounds.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vimg::formats::vdi::header::Header;
use vimg::formats::vdi::VdiReader;
use vimg::storage::MemStorage;
use vimg::{Format, GuestOffset, ImageReader, MapKind};

fuzz_target!(|data: &[u8]| {
    vimg::fuzzing::open_and_read_all(data, Some(Format::Vdi));

    if let Ok(r) = VdiReader::open(Arc::new(MemStorage::new(data.to_vec()))) {
        let size = r.virtual_size();
        let mut pos = 0;
        for _ in 0..100_000 {
            if pos >= size {
                break;
            }
            let Ok(e) = r.map(GuestOffset(pos), size - pos) else {
                break;
            };
            assert_eq!(e.start.get(), pos);
            assert!(e.len > 0 && e.end() <= size);
            if let MapKind::Data { offset, .. } = e.kind {
                assert!(offset.get() + e.len <= data.len() as u64, "data past the end of the file");
            }
            pos = e.end();
        }
    }

    if let Ok(h) = Header::parse(data) {
        assert_eq!(&h.to_bytes()[..], &data[..512]);
    }
});
