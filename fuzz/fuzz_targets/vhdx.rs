//! Untrusted bytes opened as vhdx: open, info, map the whole range, read every mapped byte.
//! Then the reader alone (no backing chain), so that differencing images, whose parent
//! cannot be opened from memory, still have their sector-bitmap mapping exercised.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vimg::formats::{Format, OpenContext};
use vimg::storage::{MemStorage, Storage};
use vimg::{ExternalPolicy, GuestOffset};

fuzz_target!(|data: &[u8]| {
    vimg::fuzzing::open_and_read_all(data, Some(Format::Vhdx));

    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new(data.to_vec()));
    let ctx = OpenContext::new(None, ExternalPolicy::Deny);
    let Ok(reader) = Format::Vhdx.driver().open(storage, &ctx) else {
        return;
    };
    let size = reader.virtual_size();
    let mut pos = 0u64;
    for _ in 0..100_000 {
        if pos >= size {
            break;
        }
        let Ok(e) = reader.map(GuestOffset(pos), size - pos) else {
            return;
        };
        assert_eq!(e.start.get(), pos);
        assert!(e.len > 0 && e.end() <= size);
        if let vimg::MapKind::Data { file, offset } = e.kind {
            let f = reader.file(file).expect("a data extent names a known file");
            let mut b = vec![0u8; e.len.min(4096) as usize];
            let _ = f.read_at(&mut b, offset.get());
        }
        pos = e.end();
    }
    let _ = reader.check();
});
