//! Untrusted bytes opened as vmdk: open, info, map the whole range, read every mapped byte.
//! Then the sparse extent header's parse -> write -> parse round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vimg::formats::vmdk::header::SparseHeader;
use vimg::Format;

fuzz_target!(|data: &[u8]| {
    vimg::fuzzing::open_and_read_all(data, Some(Format::Vmdk));

    if let Ok(h) = SparseHeader::parse(data, 0) {
        let mut buf = [0u8; SparseHeader::LEN];
        h.write_to(&mut buf);
        let again = SparseHeader::parse(&buf, 0).expect("a written header must parse");
        assert_eq!(again, h, "vmdk header: parse -> write -> parse changed it");
        assert_eq!(&buf[..0x4f], &data[..0x4f], "vmdk header: the fields did not survive");
    }
});
