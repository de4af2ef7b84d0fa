//! Untrusted bytes opened as qcow (version 1): open, info, map the whole range, read every
//! mapped byte; then the reader alone maps in range (data inside the file), and the
//! header's parse -> write round trip gives the same bytes.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vimg::formats::qcow::header::{Header, HEADER_SIZE};
use vimg::formats::qcow::QcowReader;
use vimg::storage::MemStorage;
use vimg::{Format, GuestOffset, ImageReader, MapKind};

fuzz_target!(|data: &[u8]| {
    vimg::fuzzing::open_and_read_all(data, Some(Format::Qcow));

    if let Ok(r) = QcowReader::open(Arc::new(MemStorage::new(data.to_vec()))) {
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
            match e.kind {
                MapKind::Data { offset, .. } => {
                    assert!(offset.get() + e.len <= data.len() as u64, "data past the end of the file")
                }
                MapKind::Compressed { offset, len, .. } => {
                    assert!(offset.get() + len <= data.len() as u64, "compressed data past the end of the file")
                }
                _ => {}
            }
            pos = e.end();
        }
    }

    if let Ok(h) = Header::parse(data) {
        let mut again = vec![0u8; HEADER_SIZE];
        h.write_to(&mut again);
        assert_eq!(&again[..], &data[..HEADER_SIZE]);
    }
});
