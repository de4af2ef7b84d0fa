//! Untrusted bytes opened as LUKS: the generic open/read property (without a secret, so
//! open fails cleanly or shows metadata); the header's parse -> write -> parse is stable;
//! a header that validates gives `info`; and, where its PBKDF2 work is small, unlocking
//! with a passphrase either fails cleanly or gives a reader whose payload decrypts.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vimg::formats::luks::header::{Header, HEADER_LEN};
use vimg::formats::luks::{LuksReader, Parsed};
use vimg::storage::{MemStorage, Storage};
use vimg::{Format, GuestOffset, ImageReader, MapKind};

fuzz_target!(|data: &[u8]| {
    vimg::fuzzing::open_and_read_all(data, Some(Format::Luks));

    if let Ok(h) = Header::parse(data) {
        let mut again = vec![0u8; HEADER_LEN];
        h.write_to(&mut again);
        assert_eq!(Header::parse(&again).ok().as_ref(), Some(&h));
    }

    let Ok(p) = Parsed::from_bytes(data, data.len() as u64) else {
        return;
    };
    let _ = p.info(Some(false));
    let work: u64 = p
        .header
        .slots
        .iter()
        .filter(|s| s.is_active())
        .map(|s| u64::from(s.iterations) + u64::from(p.header.mk_digest_iter))
        .sum();
    if work > 20_000 {
        return;
    }
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new(data.to_vec()));
    if let Ok(r) = LuksReader::open(storage, Some(b"fuzz")) {
        let size = r.virtual_size();
        if size == 0 {
            return;
        }
        let e = r.map(GuestOffset(0), size).expect("an unlocked volume maps");
        assert_eq!(e.len, size);
        if let MapKind::Data { file, .. } = e.kind {
            let f = r.file(file).expect("the payload file exists");
            let mut buf = vec![0u8; size.min(1 << 16) as usize];
            f.read_exact_at(&mut buf, 0).expect("the payload reads");
        }
    }
});
