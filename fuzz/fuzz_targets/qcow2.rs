//! Untrusted bytes opened as qcow2: open, info, map the whole range, read every mapped byte.
//! Then the header's parse -> write -> parse round trip: what parses, written back, parses
//! to the same header.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vimg::formats::qcow2::header::Header;
use vimg::Format;

fuzz_target!(|data: &[u8]| {
    vimg::fuzzing::open_and_read_all(data, Some(Format::Qcow2));

    if let Ok(h) = Header::parse(data) {
        let mut buf = vec![0u8; h.len()];
        h.write_to(&mut buf);
        let again = Header::parse(&buf).expect("a written header must parse");
        assert_eq!(again, h, "qcow2 header: parse -> write -> parse changed it");
    }
});
