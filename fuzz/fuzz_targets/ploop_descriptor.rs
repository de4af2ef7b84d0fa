//! Untrusted bytes as a ploop DiskDescriptor.xml: the probe and the parser must not panic,
//! and a parsed descriptor's counts stay within what its bytes can hold; then the bytes
//! opened as parallels (through the descriptor path when they look like one) must fail
//! cleanly or read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vimg::formats::parallels::descriptor::{looks_like, parse};
use vimg::Format;

fuzz_target!(|data: &[u8]| {
    let _ = looks_like(data);
    if let Ok(d) = parse(data) {
        assert!(d.storages.len() + d.shots.len() <= data.len());
        for s in &d.storages {
            assert!(s.images.len() <= data.len());
        }
    }
    vimg::fuzzing::open_and_read_all(data, Some(Format::Parallels));
});
