//! Untrusted bytes opened as vhd: open, info, map the whole range, read every mapped byte.
//! Then the VHD reader on its own (so differencing disks, whose parent the generic harness
//! cannot open, are walked too), and the on-disk structs' parse -> write round trip.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vimg::formats::vhd::header::{DynHeader, Footer};
use vimg::formats::vhd::VhdReader;
use vimg::storage::MemStorage;
use vimg::{Format, GuestOffset, ImageReader, MapKind};

fuzz_target!(|data: &[u8]| {
    vimg::fuzzing::open_and_read_all(data, Some(Format::Vpc));

    if let Ok(r) = VhdReader::open(Arc::new(MemStorage::new(data.to_vec()))) {
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
        let _ = r.check();
    }

    if let Ok(f) = Footer::parse(data) {
        assert_eq!(&f.to_bytes()[..], &data[..512]);
    }
    if let Some(h) = data.get(512..1536) {
        if let Ok(d) = DynHeader::parse(h) {
            assert_eq!(&d.to_bytes()[..], h);
        }
    }
});
